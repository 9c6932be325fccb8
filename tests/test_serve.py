"""The forecast service (`fedldt serve`): the real FastAPI app, in-process and under uvicorn on 127.0.0.1."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn
from fastapi.testclient import TestClient

from fedldt.cli import main
from fedldt.delivery import ForecastPackage
from fedldt.delivery.service import create_app
from fedldt.launch.simulation import free_port



@pytest.fixture(scope="module")
def client(package_dir):
    with TestClient(create_app(package_dir), base_url="http://localhost") as c:
        yield c


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


# ------------------------------------------------------------------ plausible inputs, limits, no traces (issue 10)

def strict_json(r) -> object:
    """The reply parsed as strict JSON (no NaN/Infinity tokens)."""
    return json.loads(r.content, parse_constant=lambda c: pytest.fail(f"{c} in the reply"))


def test_impossible_values_get_422_naming_sensor_and_time(client, body):
    first = next(iter(body["sensors"]))
    for value, shown, output in [(1e300, "1e+300 (beyond float32's range, about 3.4e38)", "json"),
                                 (1e300, "1e+300 (beyond float32's range, about 3.4e38)", "ngsi-ld"),
                                 (-1000.0, "-1000 (outside the valid range 0 to 120 mph)", "json"),
                                 (1e6, "1e+06 (outside the valid range 0 to 120 mph)", "ngsi-ld"),
                                 (True, "true (a boolean, not a number)", "json")]:
        bad = {**body, "sensors": {**body["sensors"], first: body["sensors"][first][:4] + [value] + body["sensors"][first][5:]}}
        r = client.post(f"/forecast?output={output}", json=bad)
        assert r.status_code == 422, (value, output, r.text)
        assert strict_json(r)["detail"].startswith(f"invalid value(s) in the 12 most recent steps: sensor {first} at "
                                                   f"2012-03-07 07:20:00-08:00: {shown}; send plausible observations")
    nothing = {**body, "sensors": {s: [None] * 12 for s in body["sensors"]}, "allow_missing": True}
    r = client.post("/forecast", json=nothing)
    assert r.status_code == 422 and r.json()["detail"].startswith("no valid observation in the 12 most recent steps")
    for flag in ("yes", 1):
        r = client.post("/forecast", json={**body, "allow_missing": flag})
        assert r.status_code == 422 and r.json()["detail"] == "request: allow_missing: Input should be a valid boolean"
    r = client.post("/forecast", content=json.dumps(body).replace("[", "[NaN, ", 1), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"] == \
        "request body: not valid JSON (NaN is not a JSON number; send null for a missing value)"


def test_mask_policy_service_counts_masked_values(package_dir, body):
    first, second = list(body["sensors"])[:2]
    bad = {**body, "sensors": {**body["sensors"], first: [1e300] + body["sensors"][first][1:],
                               second: body["sensors"][second][:-2] + ["fast", -5]}}
    with TestClient(create_app(package_dir, invalid="mask"), base_url="http://localhost") as masking:
        r = masking.post("/forecast", json=bad)
        assert r.status_code == 200 and strict_json(r)["invalid_inputs"] == {first: 1, second: 2}
        ngsi = masking.post("/forecast?output=ngsi-ld", json=bad)
    assert ngsi.status_code == 200
    notes = {e["name"]["value"]: e["description"]["value"] for e in strict_json(ngsi)}
    assert notes[second].endswith("; 2 invalid input value(s) fed to the model as masked entries")


def test_oversized_bodies_get_a_short_413_or_422_quickly(package_dir, client, body):
    strings = json.dumps(["x"] * 300_000).encode()  # 1.5 MB of 300 000 strings
    assert len(strings) > 1_000_000
    t0 = time.monotonic()
    r = client.post("/forecast", content=strings, headers={"content-type": "application/json"})
    assert r.status_code == 413 and time.monotonic() - t0 < 1.0
    assert r.json() == {"detail": f"request body of {len(strings)} bytes; at most 1000000 bytes (send fewer time steps: "
                                  "the model reads only the most recent ones)"}
    with TestClient(create_app(package_dir, max_body_bytes=10_000_000), base_url="http://localhost") as roomy:
        for payload, detail in [
            (strings, "request: entities.0: Input should be a valid dictionary"),
            (json.dumps({**body, "timestamps": ["x"] * 300_000}).encode(), "request: 300000 time steps; at most 2016 per request"),
            (json.dumps({"timestamps": body["timestamps"], "sensors": {f"s{i}": ["x"] * 12 for i in range(6000)}}).encode(),
             "request: 6000 sensors; at most 5000 per request"),
            (json.dumps({**body, "sensors": {**body["sensors"], "9" * 100_000: [1.0] * 12}}).encode(),
             "unknown sensor id(s) " + "9" * 77 + "...: not among the"),
        ]:
            t0 = time.monotonic()
            r = roomy.post("/forecast", content=payload, headers={"content-type": "application/json"})
            assert r.status_code == 422 and time.monotonic() - t0 < 3.0, (detail, time.monotonic() - t0)
            assert len(r.content) < 1000 and r.json()["detail"].startswith(detail), r.text[:300]
    bogus = client.post("/forecast?output=" + "y" * 60_000, json=body)  # a bad query: FastAPI's check, capped, no echo
    assert bogus.status_code == 422 and len(bogus.content) < 600 and "yyyy" not in bogus.text
    assert bogus.json()["detail"][0]["loc"] == ["query", "output"] and bogus.json()["problems"] == 1


def test_host_header_allow_list(package_dir):
    app = create_app(package_dir)
    with TestClient(app, base_url="http://evil.example") as stranger:
        r = stranger.get("/health")
        assert r.status_code == 400 and r.text == "Invalid host header"
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/health").status_code == 200
    with TestClient(create_app(package_dir, allowed_hosts=["forecast.example.org"]), base_url="http://forecast.example.org") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"host": "localhost"}).status_code == 400


class Broken(ForecastPackage):
    def predict_window(self, win, engine="torch"):
        raise RuntimeError(f"secret internal state at {Path(__file__).resolve()}")


def test_internal_errors_carry_no_trace_or_path(package_dir, body):
    pkg = ForecastPackage.load(package_dir)
    broken = Broken(pkg.root, pkg.manifest, pkg.model, pkg.scaler, pkg.node_ids, pkg.edge_index, pkg.edge_weight, pkg.coords)
    with TestClient(create_app(broken), base_url="http://localhost", raise_server_exceptions=False) as c:
        r = c.post("/forecast", json=body)
    assert r.status_code == 500 and r.json() == {"detail": "internal error of the forecast service (logged on the server)"}


class Slow(ForecastPackage):
    """The package, with a model that takes 3 s per forecast (to hold a request in flight)."""

    started: threading.Event

    def predict_window(self, win, engine="torch"):
        self.started.set()
        time.sleep(3.0)
        return super().predict_window(win, engine)


def test_uvicorn_health_answers_during_a_slow_forecast_and_413_comes_before_the_body(package_dir, body):
    pkg = ForecastPackage.load(package_dir)
    slow = Slow(pkg.root, pkg.manifest, pkg.model, pkg.scaler, pkg.node_ids, pkg.edge_index, pkg.edge_weight, pkg.coords)
    slow.started = threading.Event()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(slow), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(f"{base}/forecast", json=body, timeout=60)))
        worker.start()
        assert slow.started.wait(30), "the forecast did not start"
        t0 = time.monotonic()
        health = httpx.get(f"{base}/health", timeout=5)
        waited = time.monotonic() - t0
        assert health.status_code == 200 and waited < 1.0, waited
        assert worker.is_alive()  # the forecast was still being computed
        worker.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["forecasts"]) == len(pkg.node_ids)
        # a body announced larger than the limit is refused before it is sent: 1 kB of 50 MB written, then 413
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /forecast HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 50000000\r\n\r\n" + b"[" * 1000)
            t0 = time.monotonic()
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 413 ") and time.monotonic() - t0 < 2.0, reply
            assert b"at most 1000000 bytes" in reply
    finally:
        server.should_exit = True
        thread.join(30)


def test_forecast_needs_a_json_content_type(client, body):
    """A browser page elsewhere can POST text/plain or a form cross-site without a CORS preflight;
    the service reads JSON bodies only (415 otherwise, before the body is read)."""
    raw = json.dumps(body)
    for given in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = client.post("/forecast", content=raw, headers={"content-type": given} if given else {})
        assert r.status_code == 415, (given, r.text)
        assert r.json() == {"detail": f"Content-Type {given or ''!r}: send the observations as JSON with Content-Type: "
                                      "application/json (or application/ld+json for NGSI-LD entities)"}
    ok = client.post("/forecast", content=raw, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200 and len(ok.json()["forecasts"]) == len(body["sensors"])


def test_a_sensor_given_twice_in_json_is_refused_not_last_one_wins(client, body):
    s = next(iter(body["sensors"]))
    raw = json.dumps(body)[:-2] + f', "{s}": ' + json.dumps([1.0] * 12) + "}}"
    r = client.post("/forecast", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json() == {"detail": f"request body: not valid JSON (key(s) {s} appear more than once in one object; "
                                  "give each key once)"}
