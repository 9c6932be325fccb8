"""The options a ``strategy`` config block may set, checked without Flower.

The configuration is checked before any Flower process starts (:func:`fedldt.config.resolve_config`),
and ``fedldt/`` does not import Flower's app APIs, so the options of each Flower strategy class
are listed here (:data:`OPTIONS`). ``tests/test_strategies.py`` checks that this table is exactly
the constructor parameters of the Flower classes that ``server/strategy.py`` subclasses, less
the arguments fedldt sets itself (:data:`FIXED`).
"""

from __future__ import annotations

from typing import Any, Mapping

#: ``strategy.name`` -> (Flower class name, options of its constructor a config may set).
OPTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "fedavg": ("FedAvg", frozenset()),
    "fedprox": ("FedProx", frozenset({"proximal_mu"})),
    "fedadam": ("FedAdam", frozenset({"beta_1", "beta_2", "eta", "eta_l", "tau"})),
    "fedyogi": ("FedYogi", frozenset({"beta_1", "beta_2", "eta", "eta_l", "tau"})),
    "fedadagrad": ("FedAdagrad", frozenset({"eta", "eta_l", "tau"})),
    "fedavgm": ("FedAvgM", frozenset({"server_learning_rate", "server_momentum"})),
    "fedmedian": ("FedMedian", frozenset()),
    "fedtrimmedavg": ("FedTrimmedAvg", frozenset({"beta"})),
    "krum": ("Krum", frozenset({"num_malicious_nodes"})),
}
#: Keys of the ``strategy`` config block that are not arguments of the Flower class.
_OWN_KEYS = {"name"}
#: Arguments fedldt sets itself (from the territories and ``federation.*``). Every connected
#: territory trains and evaluates in every round (cross-silo): Flower's ``fraction_*`` sampling
#: draws random SuperNode ids, which would make runs depend on more than the seed.
FIXED = {"weighted_by_key", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "arrayrecord_key",
          "configrecord_key", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
          "fraction_train", "fraction_evaluate"}


def strategy_arguments(strategy_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Flower constructor arguments of a ``strategy`` config block (``name`` removed).

    Raises:
        ValueError: unknown ``strategy.name``, or a key that the Flower class does not take (or
            that fedldt sets itself), named with the accepted keys.
    """
    name = strategy_cfg.get("name")
    if name not in OPTIONS:
        raise ValueError(f"strategy.name={name!r} is not one of {sorted(OPTIONS)} (conf/strategy/<name>.yaml)")
    base, accepted = OPTIONS[name]
    args = {k: v for k, v in strategy_cfg.items() if k not in _OWN_KEYS}
    sampling = sorted(k for k in args if k.startswith("fraction_"))
    if sampling:
        raise ValueError(f"strategy.{sampling[0]} is not supported: every connected territory trains and evaluates in "
                         "every round (Flower samples random SuperNode ids, so runs would not be reproducible); "
                         "use federation.min_train_territories to let rounds go on without a territory")
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ValueError(f"strategy '{name}' ({base}) has no option(s) {unknown}; accepted: {sorted(accepted)}")
    for key, (lo, hi, lo_open, hi_open) in _RANGES.items():
        if key in args:
            v = args[key]
            bad_type = isinstance(v, bool) or not isinstance(v, int if key in _INTEGERS else (int, float))
            if bad_type or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                kind = "an integer" if key in _INTEGERS else "a number"
                raise ValueError(f"strategy.{key}={v!r} must be {kind} in {interval} (strategy '{name}')")
    return args


_INF = float("inf")
#: Valid ranges of the numeric strategy options: key -> (low, high, low excluded, high excluded).
_RANGES = {
    "proximal_mu": (0.0, _INF, False, True), "eta": (0.0, _INF, True, True), "eta_l": (0.0, _INF, True, True),
    "tau": (0.0, _INF, True, True), "beta_1": (0.0, 1.0, False, True), "beta_2": (0.0, 1.0, False, True),
    "beta": (0.0, 0.5, False, True), "server_learning_rate": (0.0, _INF, True, True),
    "server_momentum": (0.0, 1.0, False, True), "num_malicious_nodes": (0, _INF, False, True),
}
_INTEGERS = {"num_malicious_nodes"}
