"""The JSON forecast request and response, shared by ``fedldt predict`` (JSON input files) and
the forecast service (``POST /forecast``), so that both read observations the same way."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedldt.deploy import ngsi
from fedldt.deploy.observations import InputError, table_from_columns
from fedldt.deploy.package import Forecast, ForecastPackage

OutputFormat = Literal["json", "ngsi-ld"]


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

    timestamps: list[str] | None = Field(
        None, description="ISO 8601 time of each row (local time of the package's time zone if no offset); "
                          "at least `window` rows, the most recent `window` of them a fixed interval apart")
    sensors: dict[str, list[float | None]] | None = Field(
        None, description="sensor id -> one value per timestamp, in the model's unit (see GET /model); "
                          "null = missing. Every sensor of the territory, no other.")
    entities: list[dict[str, Any]] | None = Field(
        None, description="NGSI-LD TrafficFlowObserved entities instead of the table (see docs/ngsi_ld.md)")
    output: OutputFormat = Field("json", description="'json' (this API's forecast object) or 'ngsi-ld' (entities)")
    allow_missing: bool = Field(
        False, description="feed missing values of the window to the model as masked entries instead of refusing")

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
    def parse(cls, data: Any, where: str = "request") -> "ForecastRequest":
        """Validate decoded JSON.

        Raises:
            InputError: the JSON does not fit the schema (each problem located, e.g.
                ``sensors.773869.3: Input should be a valid number``).
        """
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = [f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in e.errors()[:8]]
            raise InputError(f"{where}: " + "; ".join(problems)) from None


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
    note: str | None = None


def answer(package: ForecastPackage, request: ForecastRequest, engine: str = "torch",
           output: OutputFormat | None = None) -> tuple[dict[str, Any] | list[dict[str, Any]], Forecast]:
    """Forecast from a request.

    Args:
        package: the loaded model package.
        request: the validated request.
        engine: ``"torch"`` or ``"onnx"``.
        output: overrides ``request.output``.

    Returns:
        ``(body, forecast)``: ``body`` is the JSON forecast object (``output="json"``) or a list
        of NGSI-LD entities (``"ngsi-ld"``).

    Raises:
        InputError: the observations cannot give a correct forecast (see
            :meth:`ForecastPackage.forecast` and :func:`fedldt.deploy.ngsi.table_from_entities`).
    """
    refs: dict[str, str] = {}
    if request.entities is not None:
        table, refs = ngsi.table_from_entities(request.entities, package.node_ids,
                                               ngsi.mapping_for(package.channels, package.units))
    else:
        table = table_from_columns(request.timestamps, request.sensors)
    fc = package.forecast(table, allow_missing=request.allow_missing, engine=engine)
    if (output or request.output) == "ngsi-ld":
        return forecast_ngsi(package, fc, refs), fc
    return fc.to_json(), fc


def forecast_ngsi(package: ForecastPackage, fc: Forecast, refs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A forecast as NGSI-LD entities (see :func:`fedldt.deploy.ngsi.forecast_entities`)."""
    provider = f"fedldt {package.manifest['fedldt_version']} model of territory {package.territory}, pilot {package.manifest['pilot']}"
    return ngsi.forecast_entities(fc, ngsi.mapping_for(package.channels, package.units), package.coords, refs, provider)
