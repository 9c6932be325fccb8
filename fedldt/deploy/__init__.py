"""Delivering trained models to pilots: model packages, forecasts, ONNX, the forecast service.

* :mod:`fedldt.deploy.export` — ``fedldt export``: a run's model as one territory's package
  (weights, scaler, node order, graph, graph hash, ONNX, model card).
* :mod:`fedldt.deploy.package` — loading a package and forecasting with it.
* :mod:`fedldt.deploy.observations` — reading and checking the latest observations.
* :mod:`fedldt.deploy.ngsi` — NGSI-LD ``TrafficFlowObserved`` in and out.
* :mod:`fedldt.deploy.service` — the FastAPI forecast service (``fedldt serve``).

See ``docs/deploy_model.md``.
"""

from fedldt.deploy.observations import InputError
from fedldt.deploy.package import Forecast, ForecastPackage, PackageError

__all__ = ["Forecast", "ForecastPackage", "InputError", "PackageError"]
