"""The forecast service (`fedldt serve`): the real FastAPI app, in-process and under uvicorn on 127.0.0.1."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from fedldt.cli import main
from fedldt.deploy import ForecastPackage
from fedldt.deploy.service import create_app
from fedldt.federation.launch import free_port

pytestmark = pytest.mark.slow  # needs the session's real federated run


@pytest.fixture(scope="module")
def client(package_dir):
    with TestClient(create_app(package_dir), base_url="http://localhost") as c:
        yield c


@pytest.fixture(scope="module")
def body(in_run) -> dict:
    """The 12 steps before 2012-03-07 08:00 of every sensor, in the JSON table form."""
    ds = in_run.task.dataset
    end = int(ds.timestamps.get_loc(pd.Timestamp("2012-03-07 08:00")))
    return {"timestamps": [t.isoformat() for t in ds.timestamps[end - 12:end]],
            "sensors": {s: ds.values[end - 12:end, j, 0].astype(float).tolist() for j, s in enumerate(ds.node_ids)}}


def cli_predict(package_dir: Path, body, tmp_path: Path, suffix=".json", *extra) -> object:
    (tmp_path / f"in{suffix}").write_text(json.dumps(body))
    assert main(["predict", str(package_dir), "--input", str(tmp_path / f"in{suffix}"),
                 "--output", str(tmp_path / f"out{suffix}"), *extra]) == 0
    return json.loads((tmp_path / f"out{suffix}").read_text())


def test_health_model_sensors_and_openapi(client, package_dir):
    pkg = ForecastPackage.load(package_dir)
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["territory"] == "t1" and h["num_sensors"] == len(pkg.node_ids)
    assert h["graph_hash"] == pkg.manifest["graph_hash"]
    assert client.get("/model").json() == json.loads((package_dir / "model_card.json").read_text())
    sensors = client.get("/sensors").json()
    assert [s["id"] for s in sensors] == pkg.node_ids and sensors[0]["latitude"] == pkg.coords[pkg.node_ids[0]][0]
    spec = client.get("/openapi.json").json()
    assert {"/forecast", "/model", "/health"} <= set(spec["paths"])
    req = spec["components"]["schemas"]["ForecastRequest"]["properties"]
    assert {"timestamps", "sensors", "entities", "output", "allow_missing"} <= set(req)


def test_forecast_equals_fedldt_predict(client, package_dir, body, tmp_path):
    r = client.post("/forecast", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == cli_predict(package_dir, body, tmp_path)  # the same numbers, to the last bit
    fc = r.json()
    assert len(fc["timestamps"]) == 12 and fc["timestamps"][0] == "2012-03-07T08:00:00-08:00"
    assert all(np.isfinite(v).all() and 0 < np.mean(v) < 100 for v in fc["forecasts"].values())
    ngsi = client.post("/forecast?output=ngsi-ld", json=body)
    assert ngsi.status_code == 200 and ngsi.headers["content-type"].startswith("application/ld+json")
    assert ngsi.json() == cli_predict(package_dir, body, tmp_path, ".jsonld")
    assert len(ngsi.json()) == 12 * len(body["sensors"])
    # the same observations as NGSI-LD entities (mph, unitCode HM; UTC times): a bare list, or a notification
    utc = pd.DatetimeIndex(body["timestamps"]).tz_localize("America/Los_Angeles").tz_convert("UTC")
    ents = [{"id": f"urn:ngsi-ld:TrafficFlowObserved:{s}:{i}", "type": "TrafficFlowObserved",
             "refRoadSegment": {"type": "Relationship", "object": f"urn:ngsi-ld:RoadSegment:{s}"},
             "dateObserved": {"type": "Property", "value": t.strftime("%Y-%m-%dT%H:%M:%SZ")},
             "averageVehicleSpeed": {"type": "Property", "value": v, "unitCode": "HM"}}
            for s, vals in body["sensors"].items() for i, (t, v) in enumerate(zip(utc, vals))]
    headers = {"content-type": "application/ld+json"}
    as_list = client.post("/forecast?output=json", content=json.dumps(ents), headers=headers)
    assert as_list.status_code == 200, as_list.text
    assert as_list.json() == fc
    notification = {"id": "urn:ngsi-ld:Notification:1", "type": "Notification", "subscriptionId": "urn:x", "data": ents}
    assert client.post("/forecast?output=json", json=notification).json() == fc


def test_bad_requests_get_422_naming_the_problem(client, body):
    def detail(payload=None, **kw):
        r = client.post("/forecast", json=payload, **kw)
        assert r.status_code == 422, r.text
        return json.dumps(r.json()["detail"])

    extra = {**body, "sensors": {**body["sensors"], "999999": [50.0] * 12}}
    assert "unknown sensor id(s) 999999" in detail(extra)
    short = {"timestamps": body["timestamps"][1:], "sensors": {s: v[1:] for s, v in body["sensors"].items()}}
    assert "11 time step(s) given; the model needs the 12 most recent steps" in detail(short)
    first = next(iter(body["sensors"]))
    gap = {**body, "sensors": {**body["sensors"], first: body["sensors"][first][:-1] + [None]}}
    assert f"missing value(s) (NaN or empty) in the 12 most recent steps: {first} at" in detail(gap)
    ok = client.post("/forecast", json={**gap, "allow_missing": True})
    assert ok.status_code == 200 and ok.json()["missing_inputs"] == {first: 1}
    wrong = {**body, "sensors": {**body["sensors"], first: ["fast"] + body["sensors"][first][1:]}}
    assert f"sensor {first} at 2012-03-07 07:00:00-08:00: \\\"fast\\\" (a string, not a number)" in detail(wrong)
    assert f"sensors: {first} has 11 value(s) for 12 timestamps" in detail({**body, "sensors": {**body["sensors"], first: [1.0] * 11}})
    assert "not both" in detail({**body, "entities": [{"type": "TrafficFlowObserved"}]})
    assert "no observations" in detail({})
    assert "Extra inputs are not permitted" in detail({**body, "horizon": 3})
    assert detail(content=b"{not json", headers={"content-type": "application/json"})
    assert client.get("/health").status_code == 200  # still serving


def test_onnx_engine_serves_the_same_forecasts_within_1e4(package_dir, client, body):
    with TestClient(create_app(package_dir, engine="onnx"), base_url="http://localhost") as onnx_client:
        assert onnx_client.get("/health").json()["engine"] == "onnx"
        a = onnx_client.post("/forecast", json=body).json()["forecasts"]
    b = client.post("/forecast", json=body).json()["forecasts"]
    assert max(np.abs(np.array(a[s]) - np.array(b[s])).max() for s in b) <= 1e-4


def test_fedldt_serve_under_uvicorn_on_loopback(package_dir, body, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedldt"), "serve", str(package_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fedldt serve did not answer within 180 s"
            time.sleep(0.5)
        r = httpx.post(f"{base}/forecast", json=body, timeout=60)
        assert r.status_code == 200
        assert r.json() == cli_predict(package_dir, body, tmp_path)
        bad = httpx.post(f"{base}/forecast", json={**body, "timestamps": body["timestamps"][::-1][:11] + ["x"]}, timeout=60)
        assert bad.status_code == 422 and "not ISO 8601" in bad.json()["detail"]
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
