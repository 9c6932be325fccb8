"""fedldt: federated graph-neural-network forecasting for local digital twins of territories.

The library is usable without Flower: data loading and territories (:mod:`fedldt.data`),
models (:mod:`fedldt.models`), masked metrics (:mod:`fedldt.metrics`) and the local
train/evaluate engine (:mod:`fedldt.engine`). :mod:`fedldt.federation` holds the Flower glue
(strategy subclass, message packing, run launcher) used by the thin apps in ``clients/`` and
``server/``.
"""

__version__ = "0.1.0"
