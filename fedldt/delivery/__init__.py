"""Delivering trained models to pilots: model packages, forecasts, ONNX, the forecast service.

* :mod:`fedldt.delivery.export` — ``fedldt export``: a run's model as one territory's package
  (weights, scaler, node order, graph, graph hash, ONNX, model card).
* :mod:`fedldt.delivery.package` — loading a package and forecasting with it.
* :mod:`fedldt.delivery.observations` — reading and checking the latest observations.
* :mod:`fedldt.delivery.ngsi` — NGSI-LD ``TrafficFlowObserved`` in and out.
* :mod:`fedldt.delivery.service` — the FastAPI forecast service (``fedldt serve``).

See ``docs/deploy_model.md``.
"""

from fedldt.delivery.observations import InputError
from fedldt.delivery.package import Forecast, ForecastPackage, PackageError

__all__ = ["Forecast", "ForecastPackage", "InputError", "PackageError"]
