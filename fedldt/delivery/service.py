"""The forecast service: a FastAPI app around one model package (``fedldt serve PACKAGE_DIR``).

Endpoints: ``POST /forecast`` (observations -> forecasts, same semantics as ``fedldt predict``),
``GET /model`` (the model card), ``GET /sensors`` (sensor ids in model order, coordinates),
``GET /health``; the OpenAPI schema is at ``/openapi.json`` and browsable at ``/docs``.

Hostile by default: only requests whose ``Host`` header is allowed are served (400 otherwise;
default ``localhost`` and ``127.0.0.1``); a request body over the size limit gets 413 before it
is read whole (default 1 MB); more sensors or time steps than the limits, malformed JSON and
observations that cannot give a correct forecast (unknown or missing sensor, too few steps,
wrong interval, implausible or missing values...) get 422 with a short message naming the
problem; a ``Content-Type`` other than JSON gets 415. Replies never carry stack traces, internal paths or echoed input, and never NaN or
infinity. Forecasting runs in a worker thread, so ``/health`` answers while a forecast is being
computed. Nothing a client sends stops the server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

import fedldt
from fedldt.delivery.observations import INVALID_POLICIES, InputError, _short, load_json
from fedldt.delivery.package import ENGINES, ForecastPackage
from fedldt.delivery.schemas import MAX_PROBLEMS, ForecastRequest, ForecastResponse, OutputFormat, RequestLimits, answer

NGSI_LD_MEDIA_TYPE = "application/ld+json"
#: Content types ``POST /forecast`` reads (others get 415: a browser page elsewhere can send
#: ``text/plain`` or form bodies cross-site without asking, never these).
REQUEST_MEDIA_TYPES = ("application/json", NGSI_LD_MEDIA_TYPE)
#: Host header values served by default: this machine only.
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1")
#: Largest request body accepted by default, bytes.
DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Error details are cut to this many characters.
MAX_DETAIL = 2000

log = logging.getLogger("fedldt.serve")


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


def create_app(
    package: ForecastPackage | str | Path,
    engine: str = "torch",
    *,
    invalid: str = "error",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    limits: RequestLimits | None = None,
    allowed_hosts: Sequence[str] = DEFAULT_ALLOWED_HOSTS,
) -> FastAPI:
    """The forecast service of one model package.

    Args:
        package: a loaded package or its folder (loaded and checked here).
        engine: ``"torch"`` (the reference path) or ``"onnx"`` (ONNX Runtime).
        invalid: ``"error"`` (refuse implausible observations with 422) or ``"mask"`` (feed them
            to the model as masked entries; the reply counts them per sensor in ``invalid_inputs``).
        max_body_bytes: larger request bodies get 413.
        limits: most sensors and time steps per request (default :class:`RequestLimits`).
        allowed_hosts: ``Host`` header values served (starlette ``TrustedHostMiddleware``;
            ``"*.example.org"`` patterns allowed, ``"*"`` = any).

    Raises:
        PackageError: the folder is not a valid package; ValueError: unknown engine or policy,
            a limit below 1, or no or malformed allowed hosts.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} must be one of {ENGINES}")
    if invalid not in INVALID_POLICIES:
        raise ValueError(f"invalid={invalid!r} must be one of {INVALID_POLICIES}")
    limits = limits or RequestLimits()
    if min(max_body_bytes, limits.max_sensors, limits.max_steps) < 1:
        raise ValueError("max_body_bytes, max_sensors and max_steps must be at least 1")
    allowed_hosts = list(allowed_hosts)
    odd = [h for h in allowed_hosts if not h or "*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*."))]
    if odd or not allowed_hosts:
        raise ValueError(f"allowed hosts {odd or allowed_hosts}: give host names (forecast.example.org), patterns like "
                         "*.example.org, or * for any")
    pkg = package if isinstance(package, ForecastPackage) else ForecastPackage.load(package)
    if engine == "onnx":
        pkg.onnx_session()  # fail at start-up, not on the first request
    _ = pkg.valid_range  # a malformed range fails at start-up too
    card = pkg.card()
    app = FastAPI(
        title="fedldt forecast service",
        version=fedldt.__version__,
        description=(f"Forecasts of territory {pkg.territory} (pilot {pkg.manifest['pilot']}): "
                     f"{pkg.horizon} steps of {int(pkg.interval.total_seconds())} s for its {len(pkg.node_ids)} sensors, "
                     f"from their {pkg.window} most recent observations. See GET /model for the model card. "
                     f"Requests: at most {max_body_bytes} bytes, {limits.max_sensors} sensors and "
                     f"{limits.max_steps} time steps; implausible values: {invalid}."),
    )
    app.state.package = pkg
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        detail = [{"loc": [_short(p, 40) for p in e.get("loc", ())], "msg": _short(e.get("msg", ""), 200)}
                  for e in errors[:MAX_PROBLEMS]]
        return JSONResponse({"detail": detail, "problems": len(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("error answering %s %s", request.method, request.url.path, exc_info=exc)  # the trace stays here
        return JSONResponse({"detail": "internal error of the forecast service (logged on the server)"}, status_code=500)

    @app.get("/health", response_model=Health, summary="Liveness and the package served")
    async def health() -> Health:
        return Health(status="ok", territory=pkg.territory, pilot=str(pkg.manifest["pilot"]),
                      num_sensors=len(pkg.node_ids), graph_hash=pkg.manifest["graph_hash"], engine=engine,
                      fedldt_version=fedldt.__version__)

    @app.get("/model", summary="The model card: training, data provenance, test metrics, limits")
    async def model_card() -> dict[str, Any]:
        return card

    @app.get("/sensors", response_model=list[Sensor], summary="Sensor ids in model order (and coordinates)")
    async def sensors() -> list[Sensor]:
        return [Sensor(id=s, index=i, latitude=pkg.coords.get(s, (None, None))[0],
                       longitude=pkg.coords.get(s, (None, None))[1]) for i, s in enumerate(pkg.node_ids)]

    def compute(raw: bytes, output: OutputFormat | None) -> JSONResponse:
        """Decode, check and forecast (in a worker thread: the event loop keeps answering)."""
        request = ForecastRequest.parse(load_json(raw, "request body"), "request", limits)
        body, _ = answer(pkg, request, engine=engine, output=output, invalid=invalid, limits=limits)
        if isinstance(body, list):
            return JSONResponse(content=body, media_type=NGSI_LD_MEDIA_TYPE)
        return JSONResponse(content=body)

    request_schema = {"schema": {"$ref": "#/components/schemas/ForecastRequest"}}

    @app.post(
        "/forecast",
        summary="Forecast every sensor from the latest observations",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": request_schema,
                                                                     NGSI_LD_MEDIA_TYPE: request_schema}}},
        responses={
            200: {"model": ForecastResponse,
                  "content": {NGSI_LD_MEDIA_TYPE: {"schema": {"type": "array", "items": {"type": "object"}}}},
                  "description": "JSON forecast, or NGSI-LD TrafficFlowObserved entities when output is 'ngsi-ld'"},
            413: {"model": ErrorDetail, "description": f"request body over the size limit"},
            415: {"model": ErrorDetail, "description": "Content-Type other than application/json or application/ld+json"},
            422: {"model": ErrorDetail, "description": "observations that cannot give a correct forecast"},
        },
    )
    async def forecast(
        request: Request,
        output: OutputFormat | None = Query(None, description="overrides the body's 'output'"),
    ) -> JSONResponse:
        _check_media_type(request)
        raw = await _read_body(request, max_body_bytes)
        try:
            return await run_in_threadpool(compute, raw, output)
        except InputError as e:
            raise HTTPException(status_code=422, detail=_short(e, MAX_DETAIL)) from None

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["ForecastRequest"] = \
                ForecastRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _check_media_type(request: Request) -> None:
    """Refuse (415) a body whose ``Content-Type`` is not one of :data:`REQUEST_MEDIA_TYPES`
    (parameters such as ``; charset=utf-8`` are allowed; a missing header is refused too)."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() not in REQUEST_MEDIA_TYPES:
        raise HTTPException(status_code=415, detail=f"Content-Type {_short(given, 60)!r}: send the observations as "
                                                    "JSON with Content-Type: application/json (or application/ld+json "
                                                    "for NGSI-LD entities)")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over ``limit`` bytes: at once when ``Content-Length``
    says so, else as soon as the streamed bytes pass the limit (never read whole)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPException(status_code=400, detail="Content-Length is not a number")
        if len(length) > 15 or int(length) > limit:
            raise HTTPException(status_code=413, detail=f"request body of {_short(length, 20)} bytes; at most {limit} "
                                                        "bytes (send fewer time steps: the model reads only the most "
                                                        "recent ones)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
