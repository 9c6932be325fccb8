"""The forecast service: a FastAPI app around one model package (``fedldt serve PACKAGE_DIR``).

Endpoints: ``POST /forecast`` (observations -> forecasts, same semantics as ``fedldt predict``),
``GET /model`` (the model card), ``GET /sensors`` (sensor ids in model order, coordinates),
``GET /health``; the OpenAPI schema is at ``/openapi.json`` and browsable at ``/docs``.
Malformed requests get 422 with FastAPI's located validation errors; observations that cannot
give a correct forecast (unknown or missing sensor, too few steps, wrong interval, NaN...) get
422 with a message naming the problem. Nothing a client sends stops the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import fedldt
from fedldt.deploy.observations import InputError
from fedldt.deploy.package import ENGINES, ForecastPackage
from fedldt.deploy.schemas import ForecastRequest, ForecastResponse, OutputFormat, answer

NGSI_LD_MEDIA_TYPE = "application/ld+json"


class Health(BaseModel):
    status: str
    territory: str
    pilot: str
    num_sensors: int
    graph_hash: str
    engine: str
    fedldt_version: str


class Sensor(BaseModel):
    id: str
    index: int
    latitude: float | None = None
    longitude: float | None = None


class ErrorDetail(BaseModel):
    detail: str


def create_app(package: ForecastPackage | str | Path, engine: str = "torch") -> FastAPI:
    """The forecast service of one model package.

    Args:
        package: a loaded package or its folder (loaded and checked here).
        engine: ``"torch"`` (the reference path) or ``"onnx"`` (ONNX Runtime).

    Raises:
        PackageError: the folder is not a valid package; ValueError: unknown engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} must be one of {ENGINES}")
    pkg = package if isinstance(package, ForecastPackage) else ForecastPackage.load(package)
    if engine == "onnx":
        pkg.onnx_session()  # fail at start-up, not on the first request
    card = pkg.card()
    app = FastAPI(
        title="fedldt forecast service",
        version=fedldt.__version__,
        description=(f"Forecasts of territory {pkg.territory} (pilot {pkg.manifest['pilot']}): "
                     f"{pkg.horizon} steps of {int(pkg.interval.total_seconds())} s for its {len(pkg.node_ids)} sensors, "
                     f"from their {pkg.window} most recent observations. See GET /model for the model card."),
    )
    app.state.package = pkg

    @app.get("/health", response_model=Health, summary="Liveness and the package served")
    def health() -> Health:
        return Health(status="ok", territory=pkg.territory, pilot=str(pkg.manifest["pilot"]),
                      num_sensors=len(pkg.node_ids), graph_hash=pkg.manifest["graph_hash"], engine=engine,
                      fedldt_version=fedldt.__version__)

    @app.get("/model", summary="The model card: training, data provenance, test metrics, limits")
    def model_card() -> dict[str, Any]:
        return card

    @app.get("/sensors", response_model=list[Sensor], summary="Sensor ids in model order (and coordinates)")
    def sensors() -> list[Sensor]:
        return [Sensor(id=s, index=i, latitude=pkg.coords.get(s, (None, None))[0],
                       longitude=pkg.coords.get(s, (None, None))[1]) for i, s in enumerate(pkg.node_ids)]

    @app.post(
        "/forecast",
        response_model=ForecastResponse,
        response_model_exclude_none=True,
        summary="Forecast every sensor from the latest observations",
        responses={
            200: {"content": {NGSI_LD_MEDIA_TYPE: {"schema": {"type": "array", "items": {"type": "object"}}}},
                  "description": "JSON forecast, or NGSI-LD TrafficFlowObserved entities when output is 'ngsi-ld'"},
            422: {"model": ErrorDetail, "description": "observations that cannot give a correct forecast"},
        },
    )
    def forecast(
        request: ForecastRequest = Body(...),
        output: OutputFormat | None = Query(None, description="overrides the body's 'output'"),
    ) -> Any:
        try:
            body, _ = answer(pkg, request, engine=engine, output=output)
        except InputError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        if isinstance(body, list):
            return JSONResponse(content=body, media_type=NGSI_LD_MEDIA_TYPE)
        return body

    return app
