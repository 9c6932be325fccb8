"""The JSON forecast request and response, shared by ``fedldt predict`` (JSON input files) and
the forecast service (``POST /forecast``), so that both read observations the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from fedldt.delivery import ngsi
from fedldt.delivery.observations import InputError, _short, table_from_columns
from fedldt.delivery.package import Forecast, ForecastPackage

OutputFormat = Literal["json", "ngsi-ld"]
#: At most this many validation problems are listed in one error message.
MAX_PROBLEMS = 8


@dataclass(frozen=True)
class RequestLimits:
    """How much one request may carry (the forecast service refuses more with 422).

    Attributes:
        max_sensors: sensor columns (``sensors`` keys, or distinct sensors of NGSI-LD entities).
        max_steps: time steps (``timestamps``, or distinct times of NGSI-LD entities).
    """

    max_sensors: int = 5000
    max_steps: int = 2016  # a week of 5-minute steps

    def check_counts(self, sensors: int, steps: int, where: str) -> None:
        """Raises InputError when ``sensors`` or ``steps`` exceed the limits."""
        if sensors > self.max_sensors:
            raise InputError(f"{where}: {sensors} sensors; at most {self.max_sensors} per request")
        if steps > self.max_steps:
            raise InputError(f"{where}: {steps} time steps; at most {self.max_steps} per request "
                             "(the model reads only the most recent ones)")


#: A sensor's values as received: numbers or null (anything else is refused, or masked, by
#: :func:`fedldt.delivery.observations.select_window`, naming sensor and timestamp).
SensorValues = Annotated[list[Any], WithJsonSchema({"type": "array", "items": {"type": ["number", "null"]}})]


class ForecastRequest(BaseModel):
    """Observations to forecast from: a table (``timestamps`` + ``sensors``) or NGSI-LD entities.

    Also accepted as the whole body: a list of NGSI-LD ``TrafficFlowObserved`` entities, one
    such entity, or an NGSI-LD notification (``{"type": "Notification", "data": [...]}``).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{  # shape only: a real request has `window` rows and every sensor
            "timestamps": ["2012-03-07T10:00:00", "2012-03-07T10:05:00"],
            "sensors": {"773869": [61.2, 60.8], "767541": [64.0, 63.5]},
            "output": "json",
        }]},
    )

    timestamps: Annotated[list[str], Field(fail_fast=True)] | None = Field(
        None, description="ISO 8601 time of each row (local time of the package's time zone if no offset); "
                          "at least `window` rows, the most recent `window` of them a fixed interval apart")
    sensors: dict[str, SensorValues] | None = Field(
        None, description="sensor id -> one value per timestamp, in the model's unit (see GET /model); "
                          "null = missing. Every sensor of the territory, no other.")
    entities: Annotated[list[dict[str, Any]], Field(fail_fast=True)] | None = Field(
        None, description="NGSI-LD TrafficFlowObserved entities instead of the table (see docs/ngsi_ld.md)")
    output: OutputFormat = Field("json", description="'json' (this API's forecast object) or 'ngsi-ld' (entities)")
    allow_missing: bool = Field(
        False, strict=True,  # true or false only: "yes" or 1 is not a yes
        description="feed missing values of the window to the model as masked entries instead of refusing")

    @model_validator(mode="before")
    @classmethod
    def _ngsi_bodies(cls, data: Any) -> Any:
        if isinstance(data, list):
            return {"entities": data}
        if isinstance(data, dict) and data.get("type") == "Notification" and "data" in data:
            return {"entities": data["data"]}
        if isinstance(data, dict) and str(data.get("type", "")).endswith(ngsi.ENTITY_TYPE):
            return {"entities": [data]}
        return data

    @model_validator(mode="after")
    def _one_form(self) -> "ForecastRequest":
        table = self.timestamps is not None or self.sensors is not None
        if table and self.entities is not None:
            raise ValueError("give either 'timestamps' + 'sensors' or 'entities', not both")
        if table and (self.timestamps is None or self.sensors is None):
            raise ValueError("'timestamps' and 'sensors' go together: give both")
        if not table and self.entities is None:
            raise ValueError("no observations: give 'timestamps' + 'sensors' or NGSI-LD 'entities'")
        return self

    @classmethod
    def parse(cls, data: Any, where: str = "request", limits: RequestLimits | None = None) -> "ForecastRequest":
        """Validate decoded JSON.

        Args:
            data: the decoded JSON body.
            where: what the data is, for messages (a file name, ``"request"``).
            limits: refuse tables with more sensors or time steps (checked before the values).

        Raises:
            InputError: the JSON does not fit the schema (at most :data:`MAX_PROBLEMS` problems,
                each located, e.g. ``timestamps.3: Input should be a valid string``), or exceeds ``limits``.
        """
        if limits is not None and isinstance(data, dict):
            ts, sensors = data.get("timestamps"), data.get("sensors")
            longest = max((len(v) for v in sensors.values() if isinstance(v, list)), default=0) \
                if isinstance(sensors, dict) else 0
            limits.check_counts(len(sensors) if isinstance(sensors, dict) else 0,
                                max(len(ts) if isinstance(ts, list) else 0, longest), where)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = [f"{'.'.join(_short(p, 40) for p in err['loc']) or '(body)'}: {_short(err['msg'], 200)}"
                        for err in e.errors(include_url=False, include_input=False)[:MAX_PROBLEMS]]
            more = f" and {e.error_count() - MAX_PROBLEMS} more problem(s)" if e.error_count() > MAX_PROBLEMS else ""
            raise InputError(f"{where}: " + "; ".join(problems) + more) from None


class ForecastResponse(BaseModel):
    """Forecasts of every sensor of the territory (``output="json"``)."""

    territory: str = Field(description="territory id of the model package")
    channel: str = Field(description="forecast quantity, e.g. 'speed'")
    unit: str = Field(description="unit of the forecasts, e.g. 'mph'")
    interval_s: int = Field(description="seconds between forecast steps")
    issued_after: str = Field(description="time of the last observation used (ISO 8601)")
    timestamps: list[str] = Field(description="time of each forecast step (ISO 8601)")
    forecasts: dict[str, list[float]] = Field(description="sensor id -> forecast per step, in `unit`")
    missing_inputs: dict[str, int] | None = Field(None, description="sensor -> missing inputs fed as masked values")
    invalid_inputs: dict[str, int] | None = Field(
        None, description="sensor -> implausible inputs fed as masked values (service started with --invalid mask)")
    unavailable: dict[str, str] | None = Field(
        None, description="sensor -> why it has no forecast (e.g. no valid observation in the window)")
    note: str | None = None


def answer(package: ForecastPackage, request: ForecastRequest, engine: str = "torch",
           output: OutputFormat | None = None, invalid: str = "error",
           limits: RequestLimits | None = None) -> tuple[dict[str, Any] | list[dict[str, Any]], Forecast]:
    """Forecast from a request.

    Args:
        package: the loaded model package.
        request: the validated request.
        engine: ``"torch"`` or ``"onnx"``.
        output: overrides ``request.output``.
        invalid: ``"error"`` or ``"mask"``: what to do with implausible values (see
            :func:`fedldt.delivery.observations.select_window`).
        limits: refuse NGSI-LD observations of more sensors or time steps.

    Returns:
        ``(body, forecast)``: ``body`` is the JSON forecast object (``output="json"``) or a list
        of NGSI-LD entities (``"ngsi-ld"``).

    Raises:
        InputError: the observations cannot give a correct forecast (see
            :meth:`ForecastPackage.forecast` and :func:`fedldt.delivery.ngsi.table_from_entities`).
    """
    refs: dict[str, str] = {}
    if request.entities is not None:
        table, refs = ngsi.table_from_entities(request.entities, package.node_ids,
                                               ngsi.mapping_for(package.channels, package.units))
        if limits is not None:
            limits.check_counts(table.shape[1], table.shape[0], "entities")
    else:
        table = table_from_columns(request.timestamps, request.sensors)
    fc = package.forecast(table, allow_missing=request.allow_missing, engine=engine, invalid=invalid)
    if (output or request.output) == "ngsi-ld":
        return forecast_ngsi(package, fc, refs), fc
    return fc.to_json(), fc


def forecast_ngsi(package: ForecastPackage, fc: Forecast, refs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A forecast as NGSI-LD entities (see :func:`fedldt.delivery.ngsi.forecast_entities`)."""
    provider = f"fedldt {package.manifest['fedldt_version']} model of territory {package.territory}, pilot {package.manifest['pilot']}"
    return ngsi.forecast_entities(fc, ngsi.mapping_for(package.channels, package.units), package.coords, refs, provider)
