"""fedldt: federated graph-neural-network forecasting for local digital twins of territories.

The library is usable without Flower: data loading and territories (:mod:`fedldt.data`),
models (:mod:`fedldt.models`), masked metrics (:mod:`fedldt.metrics`) and the local
train/evaluate engine (:mod:`fedldt.engine`), the egress allow-lists (:mod:`fedldt.egress`),
:mod:`fedldt.launch` (everything that starts processes: simulation, loopback federation, gateway,
certificates) and :mod:`fedldt.delivery` (model packages, predict, serve, NGSI-LD). The Flower
apps live outside the library: ``clients/`` (the territory side) and ``server/`` (the
coordinator side), loaded by Flower from the app, never installed.
"""

__version__ = "0.1.0"
