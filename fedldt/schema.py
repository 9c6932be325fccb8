"""Schemas of the fedldt config: one per config group, checked before anything runs.

Every group of ``conf/`` has a schema here (pydantic, strict: no silent conversion of
``"32"`` to ``32`` or of ``true`` to ``1``; NaN and infinity refused; unknown keys refused):

* top level (``name``, ``seed``, ``mode``, ``paths``): :class:`RunConfig`;
* ``task``, ``train`` (with ``train.optimizer``), ``federation``, ``personalization``:
  :class:`TaskConfig`, :class:`TrainConfig`, :class:`FederationConfig`, :class:`PersonalizationConfig`;
* ``dataset``, ``partition``: one schema per registered function (:data:`DATASET_SCHEMAS`,
  :data:`PARTITION_SCHEMAS`), with the function's own defaults;
* ``model``: the model's config dataclass (:data:`fedldt.models.MODELS`, via :func:`model_schema`);
* ``strategy``: one schema per rule (:data:`STRATEGY_SCHEMAS`);
* ``sweep``, ``compare`` (script-only, never sent to territories): :class:`SweepConfig`,
  :class:`CompareConfig`.

The YAML files are the one set of defaults: the schemas of ``task``, ``train`` and
``federation`` hold types and ranges only (every field must be in the YAML). Where code has
defaults too (the model config dataclasses, the loader and partition functions), they equal the
YAML (``tests/test_schema.py`` checks it). Strategy options left out of a YAML file take Flower's
default.

Objects named by ``_target_`` (dataset loader, partition, model, strategy, optimizer) come from
fixed allow-lists (:data:`fedldt.config.DATASET_LOADERS`, :data:`fedldt.config.PARTITIONS`,
:data:`fedldt.models.MODEL_TARGETS`, :data:`STRATEGY_TARGETS`, :data:`fedldt.engine.OPTIMIZERS`; all in
:data:`fedldt.config.TARGETS`): the config is data (it travels to territories and is read back
from run folders), nothing in it is imported.

Errors are :class:`ConfigError` (a ``ValueError``) naming the key, the value, the allowed
range and where the value is set.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any, Literal, Mapping, Optional

import annotated_types as at
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

#: Largest seed: numpy's ``default_rng``/``seed`` and torch accept 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """A config value is invalid. The message names the key, the value, the allowed range and the
    file (or command-line override) that sets it."""


class _Block(BaseModel):
    """A config block: strict types, finite numbers, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


def _int(lo: int | None = None, hi: int | None = None) -> Any:
    return Annotated[int, Field(ge=lo, le=hi)]


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


# ------------------------------------------------------------------ top-level groups
class TaskConfig(_Block):
    """``task``: the forecasting task, identical for every territory (``conf/config.yaml``).

    ``window + horizon`` must also fit in the shortest split of the data; that is checked
    against the data itself (:func:`fedldt.config.check_against_data`).
    """

    window: _int(1, 10_000)
    horizon: _int(1, 10_000)
    split: Annotated[list[Fraction], Field(min_length=3, max_length=3)]
    scaler_per_node: bool
    time_of_day: bool
    day_of_week: bool
    report_steps: Annotated[list[_int(1, 10_000)], Field(min_length=1)]
    covariates: bool
    ha_period: Literal["day", "week"]
    train_stride: _int(1, 10_000)
    #: territory name -> keep only the last that-long part of its training part (a pandas timedelta
    #: string: ``1D``, ``12h``, ``3D``); null = all of it (:func:`train_history_timedelta`)
    train_history: dict[str, Optional[str]]

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        for name, text in self.train_history.items():
            if text is not None:
                train_history_timedelta(name, text)
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"task.split={self.split} must be three fractions in (0, 1), for train, val and test, "
                             f"summing to 1 (they sum to {sum(self.split):g})")
        bad = [h for h in self.report_steps if h > self.horizon]
        if bad:
            raise ValueError(f"task.report_steps {bad} must lie in [1, task.horizon={self.horizon}]")
        return self


def train_history_timedelta(name: str, text: str, key: str | None = None) -> pd.Timedelta:
    """``task.train_history.<name>`` as a positive pandas Timedelta.

    Args:
        name: the territory's name (the key, for the message).
        text: a pandas timedelta string with a unit (``"1D"``, ``"12h"``, ``"90min"``, ``"2W"``).
        key: the config key to name instead (e.g. ``federation.holdout_finetune``).

    Raises:
        ConfigError: not a timedelta, no unit, zero or negative; the key and the fix named.
    """
    key = key or f"task.train_history.{str(name)[:64]}"
    fix = "give a positive duration with a unit, e.g. 1D, 12h, 3D (or null for all)"
    shown = str(text)[:40]  # a value of any length may be given; the message stays short
    try:
        float(text)  # "1" would be one nanosecond
    except ValueError:
        pass
    else:
        raise ConfigError(f"{key}={shown!r} has no unit: {fix}")
    try:
        delta = pd.Timedelta(text)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key}={shown!r} is not a duration pandas reads: {fix}") from None
    if pd.isna(delta) or delta <= pd.Timedelta(0):
        raise ConfigError(f"{key}={shown!r} is not a positive duration: {fix}")
    return delta


class TrainConfig(_Block):
    """``train``: local training of every territory (``conf/train/*.yaml``)."""

    rounds: _int(1, 100_000)
    local_epochs: _int(1, 10_000)
    lr: Annotated[float, Field(gt=0.0, le=10.0)]
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)]
    grad_clip: Optional[Annotated[float, Field(gt=0.0)]]
    batch_size: _int(1, 1_000_000)
    eval_batch_size: _int(1, 1_000_000)
    torch_threads: _int(1, 1024)
    #: where the model trains and evaluates (fedldt.engine.resolve_device): auto = CUDA when visible
    device: Literal["auto", "cpu", "cuda"]
    optimizer: "OptimizerConfig"


class OptimizerConfig(_Block):
    """``train.optimizer``: the local optimizer, by ``_target_`` from the allow-list
    :data:`fedldt.engine.OPTIMIZERS` (built with ``lr=train.lr``, ``weight_decay=train.weight_decay``)."""

    target: str = Field(alias="_target_")

    @model_validator(mode="after")
    def _registered(self) -> "OptimizerConfig":
        from fedldt.engine import OPTIMIZERS

        if self.target not in OPTIMIZERS:
            raise ValueError(f"train.optimizer._target_={self.target!r} is not a registered optimizer; allowed: "
                             f"{sorted(OPTIMIZERS)} (a new one must be added to fedldt.engine.OPTIMIZERS)")
        return self


TrainConfig.model_rebuild()


class FederationConfig(_Block):
    """``federation``: how territories are run and waited for (``conf/config.yaml``)."""

    #: whole CPU cores per simulated territory (Flower's simulation config takes an integer)
    client_cpus: _int(1, 1024)
    #: GPU share per simulated territory (Ray resources; 0 = none, 0.25 = four territories per GPU)
    client_gpus: Annotated[float, Field(ge=0.0, le=64.0)]
    #: an existing Ray cluster's head, host:port (simulation engine); null = a Ray instance per run
    ray_address: Optional[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,252}:[0-9]{1,5}$")]]
    timeout_s: Annotated[float, Field(gt=0.0, le=7 * 24 * 3600.0)]
    min_train_territories: Optional[_int(1, 10_000)]
    #: at most this many messages out at once (the ServerApp sends a round in waves); null = all
    max_in_flight: Optional[_int(1, 1_000_000)]
    #: a territory that takes no part in training, evaluated zero-shot (its name, e.g. "t2")
    holdout: Optional[Annotated[str, Field(min_length=1, max_length=128)]]
    #: with holdout: also fine-tune on the last that-long part of its training part ("3D")
    holdout_finetune: Optional[Annotated[str, Field(min_length=1, max_length=32)]]

    @model_validator(mode="after")
    def _holdout(self) -> "FederationConfig":
        if self.holdout_finetune is not None:
            if self.holdout is None:
                raise ValueError("federation.holdout_finetune needs federation.holdout (the territory to fine-tune)")
            train_history_timedelta(self.holdout, self.holdout_finetune, key="federation.holdout_finetune")
        return self


class PersonalizationConfig(_Block):
    """``personalization``: which layers stay on each territory (``conf/personalization/*.yaml``)."""

    name: Literal["none", "fedper", "fedbn", "finetune", "ditto"]
    #: finetune: at most this many fine-tuning epochs; ditto: personal epochs per round
    epochs: Optional[_int(1, 100_000)] = None
    #: finetune: fine-tuning learning rate; ditto: personal learning rate (null = train.lr)
    lr: Optional[Annotated[float, Field(gt=0.0, le=10.0)]] = None
    #: finetune: epochs without a better validation MAE before stopping
    patience: Optional[_int(1, 100_000)] = None
    #: ditto: lambda of the proximal term towards the global model (Li et al., ICML 2021)
    lam: Optional[Annotated[float, Field(ge=0.0, le=1.0e6)]] = None

    @model_validator(mode="after")
    def _options(self) -> "PersonalizationConfig":
        takes = {"none": set(), "fedper": set(), "fedbn": set(), "finetune": {"epochs", "lr", "patience"},
                 "ditto": {"epochs", "lr", "lam"}}[self.name]
        given = {k for k in ("epochs", "lr", "patience", "lam") if getattr(self, k) is not None}
        if given - takes:
            raise ValueError(f"personalization={self.name} takes no {sorted(given - takes)} "
                             f"(conf/personalization/{self.name}.yaml)")
        needed = {"finetune": {"epochs", "lr", "patience"}, "ditto": {"epochs", "lam"}}.get(self.name, set())
        if needed - given:
            raise ValueError(f"personalization={self.name} needs {sorted(needed - given)} "
                             f"(conf/personalization/{self.name}.yaml)")
        return self


class PrivacyConfig(_Block):
    """``privacy``: differential privacy of a federated run (``conf/privacy/*.yaml``,
    :mod:`fedldt.privacy`, ``docs/privacy.md``). ``mode: none`` takes no other key; the other
    modes need ``noise_multiplier``, ``clipping_norm`` and ``delta``."""

    mode: Literal["none", "territory", "sample"]
    # >= 1e-6: below about 1e-154 the RDP epsilon is infinite and summary.json (strict JSON) cannot hold it
    noise_multiplier: Optional[Annotated[float, Field(ge=1.0e-6, le=1.0e6)]] = None
    clipping_norm: Optional[Annotated[float, Field(gt=0.0, le=1.0e12)]] = None
    delta: Optional[Fraction] = None
    max_epsilon: Optional[Annotated[float, Field(gt=0.0, le=1.0e12)]] = None

    @model_validator(mode="after")
    def _complete(self) -> "PrivacyConfig":
        given = {k for k in ("noise_multiplier", "clipping_norm", "delta", "max_epsilon") if getattr(self, k) is not None}
        if self.mode == "none" and given:
            raise ValueError(f"privacy.mode=none takes no {sorted(given)}; choose privacy=territory or privacy=sample "
                             "(conf/privacy/) to use them")
        missing = [k for k in ("noise_multiplier", "clipping_norm", "delta") if getattr(self, k) is None]
        if self.mode != "none" and missing:
            raise ValueError(f"privacy.mode={self.mode} needs {missing} (see conf/privacy/{self.mode}.yaml)")
        return self


class PathsConfig(_Block):
    data_root: str


#: The methods ``scripts/compare.py`` can run (``compare.methods``): federated = personalization
#: none, finetune/ditto/fedper = that personalization, centralized/local = those modes.
COMPARE_METHODS = ("federated", "finetune", "ditto", "fedper", "centralized", "local")


class CompareConfig(_Block):
    """``compare`` (scripts/compare.py only; never sent to territories): ``seeds`` (null = the
    config's ``seed``), ``methods`` (:data:`COMPARE_METHODS`, each at most once), ``contribution``
    (a leave-one-territory-out federated run per territory and seed) and ``publish_dir``."""

    publish_dir: Optional[str]
    seeds: Optional[Annotated[list[_int(0, MAX_SEED)], Field(min_length=1, max_length=100)]] = None
    methods: Annotated[list[Literal[COMPARE_METHODS]], Field(min_length=1)] = Field(
        default_factory=lambda: ["federated", "centralized", "local"])
    contribution: bool = False
    #: read the runs already finished in the run folder (same config) instead of running them again
    reuse: bool = False

    @model_validator(mode="after")
    def _distinct(self) -> "CompareConfig":
        for key in ("seeds", "methods"):
            values = getattr(self, key) or []
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"compare.{key} lists {twice} more than once; list each once")
        return self


class SweepEntry(_Block):
    strategy: str
    personalization: str


class SweepConfig(_Block):
    """``sweep`` (scripts/sweep.py only; never sent to territories)."""

    models: Annotated[list[str], Field(min_length=1)]
    strategies: Annotated[list[SweepEntry], Field(min_length=1)]
    publish_dir: Optional[str]


class RunConfig(_Block):
    """The top level of a resolved config (``conf/config.yaml``); the groups without a fixed
    schema (``dataset``, ``partition``, ``model``, ``strategy``) are checked by their own
    ``_target_``/``name`` (see :func:`validate_config`)."""

    name: Annotated[str, Field(min_length=1)]
    seed: _int(0, MAX_SEED)
    mode: Literal["federated", "centralized", "local"]
    paths: PathsConfig
    task: TaskConfig
    train: TrainConfig
    federation: FederationConfig
    personalization: PersonalizationConfig
    dataset: dict[str, Any]
    partition: dict[str, Any]
    model: dict[str, Any]
    strategy: dict[str, Any]
    privacy: Optional[PrivacyConfig] = None  # absent = privacy none (configs written before the group existed)
    compare: Optional[CompareConfig] = None  # script-only: absent from what territories receive
    sweep: Optional[SweepConfig] = None
    #: a run folder to continue (its checkpoint.pt, fedldt.checkpoint); null = a new run
    resume: Optional[Annotated[str, Field(min_length=1)]] = None

    @model_validator(mode="after")
    def _personal_combinations(self) -> "RunConfig":
        name = self.personalization.name
        privacy = self.privacy.mode if self.privacy is not None else "none"
        if name in ("finetune", "ditto") and privacy != "none":
            raise ValueError(f"personalization={name} with privacy={privacy}: the personal model is trained on the "
                             "territory's data without differential privacy and its validation and test errors leave "
                             "the territory, which the run's epsilon would not cover; use privacy=none, or "
                             "personalization=none|fedper|fedbn")
        if self.federation.holdout is not None and name in ("fedper", "fedbn"):
            raise ValueError(f"federation.holdout with personalization={name}: the held-out territory never trains, "
                             f"so its personal layers ({'output head' if name == 'fedper' else 'normalization layers'}) "
                             "would be untrained random values; use personalization=none, finetune or ditto")
        return self


#: Top-level keys the territories never need (``scripts/compare.py``, ``scripts/sweep.py``, and
#: ``resume``, a folder on the server): they stay out of the config that travels to territories
#: (:func:`fedldt.config.territory_view`).
SCRIPT_ONLY = ("compare", "sweep", "resume")


# ------------------------------------------------------------------ dataset and partition
class ValueRange(_Block):
    min: Optional[float]
    max: Optional[float]
    type: Literal["number", "integer"]


class LosLoopDataset(_Block):
    """Arguments of :func:`fedldt.data.load_los_loop` (``conf/dataset/los_loop.yaml``)."""

    target: str = Field(alias="_target_")
    path: str
    start: str = "2012-03-01 00:00"
    freq: str = "5min"
    zero_is_missing: bool = False
    self_loops: bool = True
    name: Annotated[str, Field(min_length=1)] = "los_loop"
    valid_range: Optional[dict[str, ValueRange]] = None


class GraphConfig(_Block):
    method: Literal["knn", "gaussian"]
    k: _int(1, 10_000)
    sigma_km: Optional[Annotated[float, Field(gt=0.0)]]
    threshold: Annotated[float, Field(gt=0.0, le=1.0)]


class ChargedDataset(_Block):
    """Arguments of :func:`fedldt.data.load_charged_cities` (``conf/dataset/charged_ev.yaml``)."""

    target: str = Field(alias="_target_")
    path: str
    cities: Annotated[list[str], Field(min_length=1)]
    graph: Optional[GraphConfig] = None
    weather: bool = True
    name: Annotated[str, Field(min_length=1)] = "charged_ev"
    valid_range: Optional[dict[str, ValueRange]] = None


class PackagesDataset(_Block):
    """Arguments of :func:`fedldt.data.load_packages` (``conf/dataset/packages.yaml``): a folder
    with one territory data package per sub-folder; valid ranges come from each package."""

    target: str = Field(alias="_target_")
    path: str
    name: Annotated[str, Field(min_length=1)] = "packages"


class PackageDataset(_Block):
    """Arguments of :func:`fedldt.data.load_package` for a whole network in one package, split by
    the pilot's partition: ``path`` (the folder of the data files) and ``manifest`` (its
    ``territory.yaml`` as a mapping, checked by :class:`fedldt.data.package.TerritorySpec`; e.g.
    ``conf/pilot/montevideo_bus_4.yaml``); without ``manifest`` the folder's ``territory.yaml``."""

    target: str = Field(alias="_target_")
    path: str
    manifest: Optional[dict[str, Any]] = None
    name: Optional[Annotated[str, Field(min_length=1)]] = None

    @model_validator(mode="after")
    def _manifest(self) -> "PackageDataset":
        if self.manifest is not None:
            from fedldt.data.package import TerritorySpec  # lazy: the schema module stays free of the loaders

            TerritorySpec.model_validate(self.manifest)
        return self


class KMeansPartition(_Block):
    """Arguments of :func:`fedldt.data.partition_kmeans` (``conf/partition/kmeans.yaml``); the
    number of territories is also checked against the dataset's sensors."""

    target: str = Field(alias="_target_")
    num_territories: _int(1, 1000)
    seed: _int(0, MAX_SEED)
    n_init: _int(1, 1000) = 10


class AsGivenPartition(_Block):
    """Arguments of :func:`fedldt.data.partition.as_given` (``conf/partition/as_given.yaml``)."""

    target: str = Field(alias="_target_")
    num_territories: _int(1, 1000)


#: Loader function name -> schema of its ``dataset`` block (keyed by the function, so every
#: ``_target_`` alias of :data:`fedldt.config.DATASET_LOADERS` shares one schema).
DATASET_SCHEMAS: dict[str, type[_Block]] = {"load_los_loop": LosLoopDataset, "load_charged_cities": ChargedDataset,
                                             "load_packages": PackagesDataset, "load_package": PackageDataset}
#: Partition function name -> schema of its ``partition`` block.
PARTITION_SCHEMAS: dict[str, type[_Block]] = {"partition_kmeans": KMeansPartition, "as_given": AsGivenPartition}


# ------------------------------------------------------------------ strategies
_NonNeg = Annotated[float, Field(ge=0.0)]
_Pos = Annotated[float, Field(gt=0.0)]
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strategy(_Block):
    """Options of a Flower strategy class; one left out takes Flower's default."""

    target: str = Field(alias="_target_")
    name: str


class FedAvgOptions(_Strategy):
    pass


class FedProxOptions(_Strategy):
    proximal_mu: Optional[_NonNeg] = None


class FedAdamOptions(_Strategy):
    eta: Optional[_Pos] = None
    beta_1: Optional[_Beta] = None
    beta_2: Optional[_Beta] = None
    tau: Optional[_Pos] = None


class FedAdagradOptions(_Strategy):
    eta: Optional[_Pos] = None
    tau: Optional[_Pos] = None


class FedAvgMOptions(_Strategy):
    server_learning_rate: Optional[_Pos] = None
    server_momentum: Optional[_Beta] = None


class FedTrimmedAvgOptions(_Strategy):
    beta: Optional[Annotated[float, Field(ge=0.0, lt=0.5)]] = None


class KrumOptions(_Strategy):
    num_malicious_nodes: Optional[_int(0, 10_000)] = None


#: ``strategy.name`` -> (Flower class name, ``strategy._target_`` (the fedldt class in
#: ``server/strategy.py``), schema of its options).
STRATEGY_SCHEMAS: dict[str, tuple[str, str, type[_Strategy]]] = {
    "fedavg": ("FedAvg", "server.strategy.FedLDTAvg", FedAvgOptions),
    "fedprox": ("FedProx", "server.strategy.FedLDTProx", FedProxOptions),
    "fedadam": ("FedAdam", "server.strategy.FedLDTAdam", FedAdamOptions),
    "fedyogi": ("FedYogi", "server.strategy.FedLDTYogi", FedAdamOptions),
    "fedadagrad": ("FedAdagrad", "server.strategy.FedLDTAdagrad", FedAdagradOptions),
    "fedavgm": ("FedAvgM", "server.strategy.FedLDTAvgM", FedAvgMOptions),
    "fedmedian": ("FedMedian", "server.strategy.FedLDTMedian", FedAvgOptions),
    "fedtrimmedavg": ("FedTrimmedAvg", "server.strategy.FedLDTTrimmedAvg", FedTrimmedAvgOptions),
    "krum": ("Krum", "server.strategy.FedLDTKrum", KrumOptions),
    # FedAvg of updates clipped to the round's median norm (fedldt's own rule over Flower's FedAvg)
    "fedclipavg": ("FedAvg", "server.strategy.FedLDTClipAvg", FedAvgOptions),
}
#: The ``strategy._target_`` allow-list: target -> ``strategy.name``.
STRATEGY_TARGETS: dict[str, str] = {target: name for name, (_, target, _) in STRATEGY_SCHEMAS.items()}
#: Keys of the ``strategy`` block that are not arguments of the Flower class.
_OWN_KEYS = ("_target_", "name")
#: Arguments fedldt sets itself (from the territories and ``federation.*``). Every connected
#: territory trains and evaluates in every round (cross-silo): Flower's ``fraction_*`` sampling
#: draws random SuperNode ids, which would make runs depend on more than the seed.
FIXED = {"weighted_by_key", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "arrayrecord_key",
         "configrecord_key", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
         "fraction_train", "fraction_evaluate"}
#: Flower arguments that do nothing on the server and are refused: ``eta_l`` of FedOpt
#: (FedAdam, FedYogi, FedAdagrad) is only stored and logged by Flower 1.42; the territories'
#: learning rate is ``train.lr``.
UNUSED = {"eta_l"}
#: ``strategy.name`` -> (Flower class name, the options a config may set), from the schemas.
OPTIONS: dict[str, tuple[str, frozenset[str]]] = {
    name: (base, frozenset(schema.model_fields) - {"target", "name"})
    for name, (base, _, schema) in STRATEGY_SCHEMAS.items()
}


def strategy_arguments(strategy_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Flower constructor arguments of a checked ``strategy`` config block.

    ``_target_`` must be the fedldt class of ``name`` (:data:`STRATEGY_SCHEMAS`); a block
    without ``_target_`` (a run folder written before it existed) is read by ``name``.

    Returns:
        The options set in the block (``name`` and ``_target_`` removed); Flower's defaults
        apply to the others.

    Raises:
        ConfigError: unknown ``name`` or ``_target_``; ``_target_`` of another rule; a key the
            Flower class does not take (or that fedldt sets itself, or that does nothing); a
            value out of range (the range is named).
    """
    if not isinstance(strategy_cfg, Mapping):
        raise ConfigError(f"strategy must be a mapping, got {type(strategy_cfg).__name__} (conf/strategy/)")
    name = strategy_cfg.get("name")
    if name not in STRATEGY_SCHEMAS:
        raise ConfigError(f"strategy.name={name!r} is not one of {sorted(STRATEGY_SCHEMAS)} (conf/strategy/<name>.yaml)")
    base, target, schema = STRATEGY_SCHEMAS[name]
    block = {"_target_": target, **strategy_cfg}
    if block["_target_"] != target:
        known = block["_target_"] in STRATEGY_TARGETS
        raise ConfigError(f"strategy._target_={block['_target_']!r} " + (
            f"is the class of strategy '{STRATEGY_TARGETS[block['_target_']]}', not of strategy.name={name!r}"
            if known else f"is not a registered fedldt strategy; allowed: {sorted(STRATEGY_TARGETS)}")
            + f" (conf/strategy/{name}.yaml)")
    args = {k: v for k, v in block.items() if k not in _OWN_KEYS}
    sampling = sorted(k for k in args if k.startswith("fraction_"))
    if sampling:
        raise ConfigError(f"strategy.{sampling[0]} is not supported: every connected territory trains and evaluates in "
                          "every round (Flower samples random SuperNode ids, so runs would not be reproducible); "
                          "use federation.min_train_territories to let rounds go on without a territory")
    unused = sorted(set(args) & UNUSED)
    if unused:
        raise ConfigError(f"strategy.{unused[0]} does nothing on the server (Flower only logs it); the territories' "
                          f"learning rate is train.lr: remove it from conf/strategy/{name}.yaml")
    check_block(schema, block, "strategy", f"conf/strategy/{name}.yaml", label=f"strategy '{name}' ({base})")
    return args


# ------------------------------------------------------------------ models
def model_schema(config_cls: type) -> type[_Block]:
    """A strict pydantic schema of a model's config dataclass (same fields, types, ranges and
    defaults); the data-injected sizes (``in_channels``, ``out_channels``, ``horizon``,
    ``num_nodes``) are left out: they are not in the config."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in INJECTED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else ...
        fields[f.name] = (hints[f.name], default)
    return create_model(f"{config_cls.__name__}Schema", __base__=_Block,
                        target=(Optional[str], Field(default=None, alias="_target_")), name=(str, ...), **fields)


#: Model config fields that come from the data or the task, never from ``conf/model/``.
INJECTED = ("in_channels", "out_channels", "horizon", "num_nodes")


# ------------------------------------------------------------------ errors
def _interval(info: FieldInfo | None) -> tuple[str, str]:
    """``(kind, allowed)`` of a field, e.g. ``("an integer", "[1, 1000]")``."""
    if info is None:
        return "", ""
    ann = info.annotation
    metadata = list(info.metadata)
    while typing.get_origin(ann) is typing.Union or typing.get_origin(ann) is Annotated:
        if typing.get_origin(ann) is Annotated:
            inner, *meta = typing.get_args(ann)
            metadata += [m for x in meta for m in (x.metadata if isinstance(x, FieldInfo) else [x])]
            ann = inner
        else:
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is Literal:
        return "one of", str(list(typing.get_args(ann)))
    if ann is bool:
        return "", "true or false"
    lo = hi = None
    lo_open = hi_open = False
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
    kind = {int: "an integer", float: "a number", str: "a string"}.get(ann, "")
    if lo is None and hi is None:
        return kind, ""
    return kind, (f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else lo}, "
                  f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")


def _unwrap(ann: Any) -> Any:
    """``X`` of ``Optional[X]``."""
    while typing.get_origin(ann) is typing.Union:
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return ann


def _walk(schema: type[BaseModel], loc: tuple) -> tuple[FieldInfo | None, Any]:
    """The field a pydantic error location points to and the type at that location (through
    nested blocks, list items and dict values); ``(None, None)`` when it leaves the schema."""
    info, ann = None, schema
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            fields = {**ann.model_fields, **{f.alias: f for f in ann.model_fields.values() if f.alias}}
            if part not in fields:
                return None, None
            info, ann = fields[part], fields[part].annotation
        elif typing.get_origin(ann) in (list, dict):  # an item or a value: its type, the field's range
            ann = typing.get_args(ann)[-1]
        else:
            return None, None
    return info, _unwrap(ann)


def _field(schema: type[BaseModel], loc: tuple) -> FieldInfo | None:
    return _walk(schema, loc)[0]


def _path(group: str, loc: tuple) -> str:
    out = group
    for part in loc:
        if part == "target":
            part = "_target_"
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


#: Where a top-level block's values are set (before pilots and command-line overrides).
_TOP_LEVEL_FILES = {"train": "conf/train/<name>.yaml", "personalization": "conf/personalization/<name>.yaml"}


def check_block(schema: type[BaseModel], block: Any, group: str, where: str, label: str | None = None) -> None:
    """Check one config block against its schema.

    Args:
        schema: the pydantic schema.
        block: the block (a mapping).
        group: its key in the config (``"train"``, ``"strategy"``; ``""`` for the top level).
        where: where it is set, for the message (``"conf/train/"``).
        label: how unknown keys are introduced (default: the group).

    Raises:
        ConfigError: the first problem found: unknown key(s) (all named, with the accepted
            keys), a missing key, a wrong type or a value out of range (key, value, allowed range).
    """
    if not isinstance(block, Mapping):
        raise ConfigError(f"{group or 'the config'} must be a mapping of keys to values, got {type(block).__name__} ({where})")
    try:
        schema.model_validate(dict(block))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        extra = [e for e in errors if e["type"] == "extra_forbidden"]
        if not group:  # the top level: name the file of the block that holds the key
            first = (extra or errors)[0]["loc"]
            top = str(first[0]) if first and (len(first) > 1 or not extra) else ""  # () = a top-level cross check
            where = _TOP_LEVEL_FILES.get(top, "conf/config.yaml") + f", {where}"
        if extra:
            parent = extra[0]["loc"][:-1]
            unknown = sorted(str(e["loc"][-1]) for e in extra if e["loc"][:-1] == parent)
            owner = _walk(schema, parent)[1]
            accepted = sorted(f.alias or k for k, f in getattr(owner, "model_fields", {}).items())
            who = _path(group, parent) if parent else (label or group or "the config")
            raise ConfigError(f"{who} has no option(s) {unknown}; accepted: {accepted} ({where})") from None
        e = errors[0]
        path = _path(group, e["loc"])
        if e["type"] == "missing":
            raise ConfigError(f"{path} is required but not set ({where})") from None
        if e["type"] == "value_error":  # a cross-field check: its message is complete
            raise ConfigError(f"{str(e['ctx']['error'])} ({where})") from None
        kind, allowed = _interval(_field(schema, e["loc"]))
        value = e.get("input")
        shown = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
        if kind == "one of":
            raise ConfigError(f"{path}={shown} must be one of {allowed} ({where})") from None
        if kind and allowed:
            raise ConfigError(f"{path}={shown} must be {kind} in {allowed} ({where})") from None
        raise ConfigError(f"{path}={shown}: {e['msg'].lower()}{'; allowed: ' + allowed if allowed else ''} "
                          f"({where})") from None
