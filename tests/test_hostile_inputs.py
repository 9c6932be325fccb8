"""Property: whatever observations arrive, `fedldt predict` and `POST /forecast` never give a
traceback, never an HTTP 500, and never succeed with invalid JSON or a NaN/infinite number in
their output (hypothesis over cells, sensor ids, flags and output formats)."""

import contextlib
import io
import json
import math

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedldt.cli import main
from fedldt.delivery.service import MAX_DETAIL, create_app


CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2000, max_value=2000),
    st.sampled_from([1e300, -1e300, 3.5e38, 3.4e38, -1000.0, 1e6, 0.0, 120.0, 120.0001, -0.0]),
    st.integers(min_value=-(10 ** 60), max_value=10 ** 60),
    st.text(max_size=30),
    st.booleans(),
    st.none(),
    st.just("9" * 5000),
)
IDS = st.one_of(st.text(min_size=1, max_size=50), st.just("7" * 20_000), st.just(""))


def strict(text: str | bytes) -> object:
    """Parse as strict JSON: NaN/Infinity tokens fail the test."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the output"))


def all_finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_finite(v) for v in obj)
    return True


@st.composite
def hostile(draw, base: dict) -> dict:
    """A valid body with up to 6 cells replaced, maybe a sensor renamed or dropped, and random flags."""
    sensors = {s: list(v) for s, v in base["sensors"].items()}
    ids = list(sensors)
    for _ in range(draw(st.integers(0, 6))):
        s = ids[draw(st.integers(0, len(ids) - 1))]
        sensors[s][draw(st.integers(0, 11))] = draw(CELLS)
    if draw(st.booleans()):
        s = ids[draw(st.integers(0, len(ids) - 1))]
        new = draw(IDS)
        values = sensors.pop(s)
        if draw(st.booleans()):
            sensors[new] = values
    if draw(st.integers(0, 9)) == 0:  # a whole sensor, or everything, missing
        for s in (sensors if draw(st.booleans()) else [ids[0]]):
            if s in sensors:
                sensors[s] = [None] * 12
    out = {"timestamps": list(base["timestamps"]), "sensors": sensors}
    if draw(st.integers(0, 5)) == 0:
        out["timestamps"][draw(st.integers(0, 11))] = draw(st.text(max_size=30))
    if draw(st.booleans()):
        out["allow_missing"] = True
    out["output"] = draw(st.sampled_from(["json", "ngsi-ld"]))
    return out


def encode(obj) -> str:
    """JSON text; NaN/Infinity cells are written as such (a hostile client would)."""
    return json.dumps(obj, allow_nan=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def clients(package_dir):
    """The service under both policies for implausible values."""
    with TestClient(create_app(package_dir), base_url="http://localhost", raise_server_exceptions=False) as refusing, \
            TestClient(create_app(package_dir, invalid="mask"), base_url="http://localhost",
                       raise_server_exceptions=False) as masking:
        yield {"error": refusing, "mask": masking}


def test_forecast_endpoint_never_fails_badly(clients, body):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        req = data.draw(hostile(body))
        client = clients[data.draw(st.sampled_from(["error", "mask"]))]
        r = client.post("/forecast", content=encode(req).encode(), headers={"content-type": "application/json"})
        assert r.status_code in (200, 413, 422), (r.status_code, r.text[:500])
        reply = strict(r.content)
        if r.status_code == 200:
            assert all_finite(reply)
            if req["output"] == "json":
                assert reply["forecasts"] and set(reply["forecasts"]) <= set(req["sensors"])
                assert set(reply["forecasts"]).isdisjoint(reply.get("unavailable", {}))
            else:
                assert reply and all(e["averageVehicleSpeed"]["value"] is not None for e in reply)
        else:
            assert isinstance(reply["detail"], str) and len(reply["detail"]) <= MAX_DETAIL
            assert "Traceback" not in r.text and "site-packages" not in r.text and "/fedldt/" not in r.text

    check()


def test_predict_never_fails_badly(package_dir, body, workdir):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data):
        req = data.draw(hostile(body))
        as_csv = data.draw(st.booleans())
        argv = ["predict", str(package_dir), "--output", str(workdir / ("fc.json" if req["output"] == "json" else "fc.jsonld"))]
        if as_csv:
            table = pd.DataFrame({s: pd.Series(v, dtype=object) for s, v in req["sensors"].items()})
            table.insert(0, "timestamp", req["timestamps"])
            table.to_csv(workdir / "in.csv", index=False)
            argv += ["--input", str(workdir / "in.csv")]
        else:
            (workdir / "in.json").write_text(encode(req))
            argv += ["--input", str(workdir / "in.json")]
        if req.get("allow_missing"):
            argv.append("--allow-missing")
        if data.draw(st.booleans()):
            argv += ["--invalid", "mask"]
        out = workdir / ("fc.json" if req["output"] == "json" else "fc.jsonld")
        out.unlink(missing_ok=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)  # an exception here (a traceback) fails the property
        assert rc in (0, 1)
        if rc == 0:
            reply = strict(out.read_text())
            assert all_finite(reply) and reply
            assert all(line.startswith("fedldt predict: warning: ") for line in err.getvalue().splitlines())
        else:
            lines = err.getvalue().splitlines()
            assert len(lines) == 1 and lines[0].startswith("fedldt predict: error: ") and not out.exists()

    check()
