"""Hydra configuration: composing a pilot, resolving paths, building the territories.

The Hydra config is composed once (by ``scripts/simulate.py`` or by the ServerApp from
Flower's run config), resolved into a plain dict with absolute paths, and that dict is what
travels to the territory clients (as JSON in the train/evaluate ConfigRecord). No
``${hydra:...}`` interpolation ever reaches a client.
"""

from __future__ import annotations

import inspect
import json
import shlex
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote, urlparse

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from fedldt import __version__
from fedldt.data import (as_given, load_charged_cities, load_los_loop, load_package, load_packages, package_folders,
                         partition_kmeans)
from fedldt.data.territory import TerritoryDataset
from fedldt.data.windows import split_bounds
from fedldt.engine import OPTIMIZERS, check_train_history_names, kept_train_bounds, train_history_steps
from fedldt.models import MODEL_TARGETS
from fedldt.privacy import PrivacyConfigError, check_privacy_config
from fedldt.schema import (DATASET_SCHEMAS, PARTITION_SCHEMAS, SCRIPT_ONLY, STRATEGY_SCHEMAS, STRATEGY_TARGETS,
                           ConfigError, RunConfig, check_block, model_schema, strategy_arguments)

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"


def checkout_root() -> Path:
    """The fedldt checkout that relative paths in configs refer to.

    For an editable install (``pip install -e .``) this is the source folder recorded by pip
    (``direct_url.json``), also when the code runs from a copy (a Flower FAB); otherwise the
    folder above the imported package.
    """
    try:
        info = json.loads(metadata.distribution("fedldt").read_text("direct_url.json") or "{}")
        url = info.get("url", "")
        if url.startswith("file://") and info.get("dir_info", {}).get("editable"):
            return Path(unquote(urlparse(url).path))
    except metadata.PackageNotFoundError:
        pass
    return PACKAGE_DIR.parent


def checkout_path(value: str | None) -> str | None:
    """A folder named in the config (e.g. ``compare.publish_dir``): an absolute path as is, a
    relative one taken relative to the checkout (not the working directory); ``None`` stays."""
    if not value:
        return None
    return value if Path(value).is_absolute() else str(checkout_root() / value)


#: Hydra's override that adds config folders to the search path (a user's own ``pilot/``,
#: ``dataset/`` ... files). The only ``hydra.*`` override that travels with a run: the ServerApp
#: composes the config again from the overrides it receives, so it must search the same folders.
SEARCHPATH_OVERRIDE = "hydra.searchpath="


def composable_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that compose a run's config: all but Hydra's own ``hydra.*`` ones (run folder,
    logging: the launcher's business), except ``hydra.searchpath``, which names config folders."""
    return [str(o) for o in overrides if not str(o).startswith("hydra.") or str(o).startswith(SEARCHPATH_OVERRIDE)]


def searchpath_override(dirs: Sequence[str | Path]) -> str:
    """``hydra.searchpath=["file:///abs/dir",...]``: Hydra's override adding ``dirs`` (made absolute)
    to the config search path, after fedldt's own ``conf/``.

    Raises:
        ValueError: a folder name holds a quote or a backslash (Hydra's override grammar).
    """
    paths = [str(Path(d).expanduser().resolve()) for d in dirs]
    bad = [p for p in paths if any(c in p for c in "'\"\\")]
    if bad:
        raise ValueError(f"config folder {bad[0]!r}: names with quotes or backslashes are not supported; rename the folder")
    # double quotes: Flower's run config (flwr run -c key='...') quotes values with single ones
    return SEARCHPATH_OVERRIDE + "[" + ",".join(f'"file://{p}"' for p in paths) + "]"


_SEARCHED: list[str] = []  # the config folders of the config composed last in this process


def searched_config_dirs() -> list[str]:
    """The config folders searched for the config composed last in this process (by
    :func:`compose_config` or a script's ``@hydra.main``, see :func:`record_config_sources`), in
    search order: fedldt's ``conf/`` first, then the user's folders. Empty if none was composed."""
    return list(_SEARCHED)


def record_config_sources(sources: Sequence[Any]) -> list[str]:
    """Check and record Hydra's ``hydra.runtime.config_sources`` (``{path, schema, provider}``
    entries): the folders (``file`` schema) become :func:`searched_config_dirs`; returned as well.

    Raises:
        ValueError: a user's folder does not exist, or holds a file with the name of a file of
            fedldt's ``conf/`` (Hydra takes the first match, ``conf/``'s, so the user's would
            silently never be used); the file and the fix are named.
    """
    dirs = [str(s["path"]) for s in sources if s["schema"] == "file"]
    for d in dirs:
        folder = Path(d)
        if folder.resolve() == CONF_DIR.resolve():
            continue
        if not folder.is_dir():
            raise ValueError(f"config folder {folder} (--config-dir or hydra.searchpath) does not exist")
        shadowed = sorted(str(f.relative_to(folder)) for f in folder.rglob("*.yaml")
                          if (CONF_DIR / f.relative_to(folder)).is_file())
        if shadowed:
            raise ValueError(f"{folder / shadowed[0]} has the name of fedldt's built-in {CONF_DIR / shadowed[0]}, which "
                             f"Hydra finds first: yours would never be used. Rename it (and its uses, e.g. pilot=<new name>)"
                             + (f"; also {shadowed[1:]}" if len(shadowed) > 1 else ""))
    _SEARCHED[:] = dirs
    return searched_config_dirs()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (e.g. ``["pilot=los_loop_3"]``).

    ``hydra.searchpath=[...]`` among the overrides (see :func:`searchpath_override`) adds the
    user's config folders after ``conf/``; other ``hydra.*`` overrides are ignored. The folders
    searched are recorded (:func:`searched_config_dirs`).

    Raises:
        FileNotFoundError: the ``conf/`` folder is not next to the package.
        hydra.errors.MissingConfigException: an unknown pilot or group option; the message names
            every folder searched, the fedldt checkout and how to add a folder.
        hydra.errors.ConfigCompositionException: a bad override (Hydra names it).
    """
    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"fedldt config folder not found at {CONF_DIR}; install fedldt with `pip install -e .`")
    overrides = composable_overrides(overrides)
    try:
        if GlobalHydra.instance().is_initialized():  # inside a @hydra.main app on conf/ (e.g. scripts/sweep.py)
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
                cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise MissingConfigException(
            f"{e}\n(fedldt {__version__} of checkout {checkout_root()}, config folder {CONF_DIR}. A pilot or dataset "
            "config of your own goes in <DIR>/pilot/<name>.yaml, <DIR>/dataset/<name>.yaml ...: add <DIR> with "
            "`--config-dir <DIR>` (scripts) or the override hydra.searchpath=[file:///abs/DIR].)",
            e.missing_cfg_file, e.options) from None
    record_config_sources(OmegaConf.to_container(cfg.hydra.runtime.config_sources))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def resolve_config(cfg: DictConfig | dict, require_data: bool = True) -> dict[str, Any]:
    """A plain, fully resolved and checked dict with an absolute ``dataset.path``.

    The one check at the boundary: every script (``simulate``, ``compare``, ``sweep``,
    ``federation_local``) and the ServerApp call it before anything runs, so a bad value
    fails in seconds, before Flower starts (:func:`validate_config`, and
    :func:`check_against_data` when ``require_data``).

    Args:
        cfg: composed config.
        require_data: check that ``dataset.path`` exists here and that the task and partition
            fit the data. The ServerApp passes ``False``: in a deployment the data lives on the
            territories (whose SuperNodes name their own package or folder with node config
            ``data-path`` or ``data-root``), not on the server.

    Raises:
        ConfigError (a ``ValueError``): a required value is missing (``???``), a key is
            unknown or a value invalid (key, value, allowed range and file named).
        FileNotFoundError: ``require_data`` and the dataset folder does not exist (the fix is named).
    """
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"config values required but not set: {missing}")
        out = OmegaConf.to_container(cfg, resolve=True)
    else:
        out = json.loads(json.dumps(cfg))
    out.pop("hydra", None)
    dataset = out.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str):
        raise ConfigError("dataset.path must be a folder name (conf/dataset/<name>.yaml or dataset.path=...)")
    path = Path(dataset["path"]).expanduser()
    if not path.is_absolute():
        path = (checkout_root() / path).resolve()
    if require_data and not path.exists():
        raise FileNotFoundError(
            f"dataset.path={out['dataset']['path']!r} resolves to {path}, which does not exist. "
            "Override paths.data_root=/abs/path/to/shared/data (or dataset.path=...)."
        )
    out["dataset"]["path"] = str(path)
    packages_partition(out)
    validate_config(out)
    if require_data:
        check_against_data(out)
    return out


def packages_partition(cfg: dict[str, Any]) -> None:
    """With ``dataset=packages`` (:func:`fedldt.data.load_packages`), make the partition
    ``as_given`` with one territory per package sub-folder of ``dataset.path`` (in place): the
    packages are the territories, whatever partition the pilot names. Where ``dataset.path`` is not
    a folder here (a coordinator without data) the pilot's ``num_territories`` is kept."""
    if not reads_packages(cfg):
        return
    path = Path(cfg["dataset"]["path"])
    count = len(package_folders(path)) if path.is_dir() else int(cfg["partition"]["num_territories"])
    cfg["partition"] = {"_target_": "fedldt.data.partition.as_given", "num_territories": count}


def reads_packages(cfg: Mapping[str, Any]) -> bool:
    """Whether the config's dataset is a folder of territory data packages (``dataset=packages``,
    :func:`fedldt.data.load_packages`)."""
    return DATASET_LOADERS.get(str(cfg["dataset"].get("_target_"))) is load_packages


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved config against the schemas of :mod:`fedldt.schema`, without data.

    Every group is checked (unknown keys, types, ranges), every ``_target_`` against its
    allow-list, then what spans groups: ``report_steps`` within the horizon, Krum's territory
    count, ``federation.min_train_territories`` at most the territories, the model builds (with
    placeholder data sizes) and supports the personalization, a window no shorter than the
    model's receptive field, and the sweep's models, strategies and personalizations exist.

    Raises:
        ConfigError: the first problem, with the key, the value, the allowed range and the file.
    """
    from fedldt.models import MODELS, build_model, local_state_names

    check_block(RunConfig, cfg, "", "a pilot (conf/pilot/) or a command-line override")
    try:
        check_privacy_config(cfg)
    except PrivacyConfigError as exc:
        raise ConfigError(f"{exc} (conf/privacy/ or a command-line override)") from None
    registered_call(cfg["dataset"], DATASET_LOADERS, "dataset")  # the loaders are checked before any run starts
    registered_call(cfg["partition"], PARTITIONS, "partition", skip=1)
    args = strategy_arguments(cfg["strategy"])
    k = num_territories(cfg)
    if cfg["strategy"]["name"] == "krum" and k <= 2 * int(args.get("num_malicious_nodes", 0)) + 2:
        raise ConfigError(f"strategy=krum needs more than 2*strategy.num_malicious_nodes+2 territories; "
                          f"partition.num_territories={k} (strategy.num_malicious_nodes={args.get('num_malicious_nodes', 0)})")
    least = cfg["federation"]["min_train_territories"]
    if least is not None and least > k:
        raise ConfigError(f"federation.min_train_territories={least} must be an integer in [1, {k}] "
                          f"(partition.num_territories={k}), or null for all")
    name = cfg["model"].get("name")
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not one of {sorted(MODELS)} (conf/model/<name>.yaml)")
    check_block(model_schema(MODELS[name][1]), cfg["model"], "model", f"conf/model/{name}.yaml", label=f"model '{name}'")
    t = cfg["task"]
    # the model (with placeholder data sizes) must build and support the personalization, before any run starts
    model = build_model({**cfg["model"], "in_channels": 1, "out_channels": 1, "horizon": int(t["horizon"])}, num_nodes=2)
    local_state_names(model, cfg["personalization"]["name"])
    field = getattr(model, "receptive_field", None)
    if cfg["model"]["name"] == "stgcn" and isinstance(field, int) and t["window"] < field:
        raise ConfigError(f"task.window={t['window']} is shorter than the receptive field of model 'stgcn' ({field} "
                          f"steps): allowed task.window >= {field}, or fewer model.num_blocks / a smaller model.Kt")
    sweep = cfg.get("sweep")
    if sweep is not None:
        from fedldt.models import PERSONALIZATIONS

        for key, value, allowed in [("models", m, sorted(MODELS)) for m in sweep["models"]] + [
                (f"strategies[{i}].{f}", e[f], sorted(STRATEGY_SCHEMAS) if f == "strategy" else list(PERSONALIZATIONS))
                for i, e in enumerate(sweep["strategies"]) for f in ("strategy", "personalization")]:
            if value not in allowed:
                raise ConfigError(f"sweep.{key}={value!r} must be one of {allowed} (conf/config.yaml)")


def check_against_data(cfg: Mapping[str, Any]) -> None:
    """Check that the partition and the task fit the dataset (loaded once, cached).

    * ``partition.num_territories`` is at most the dataset's sensors (k-means) or equals its
      territories (``as_given``);
    * ``task.window + task.horizon`` fits in the shortest of the train/val/test parts;
    * ``task.train_history`` names only territories of the partition, each a whole number of
      the data's steps that keeps at least one window and at most the training part;
    * ``federation.holdout`` names a territory of the partition, not its only one, and
      ``federation.holdout_finetune`` follows the ``task.train_history`` rules for it.

    Raises:
        ConfigError: the key, its value and the allowed range named.
    """
    loaded = _load_dataset_cached(json.dumps(cfg["dataset"], sort_keys=True))
    datasets = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
    k = num_territories(cfg)
    fn = PARTITIONS[cfg["partition"]["_target_"]]
    if fn is partition_kmeans and k > datasets[0].num_nodes:
        raise ConfigError(f"partition.num_territories={k} must be an integer in [1, {datasets[0].num_nodes}] "
                          f"(at most the {datasets[0].num_nodes} sensors of dataset '{cfg['dataset'].get('name')}')")
    if fn is as_given and k != len(datasets):
        raise ConfigError(f"partition.num_territories={k} must be {len(datasets)}: dataset '{cfg['dataset'].get('name')}' "
                          f"holds {len(datasets)} territories (partition as_given)")
    t = cfg["task"]
    steps = min(d.num_steps for d in datasets)
    bounds = split_bounds(steps, tuple(t["split"]))
    part, (lo, hi) = min(bounds.items(), key=lambda kv: kv[1][1] - kv[1][0])
    room = hi - lo
    if t["window"] + t["horizon"] > room:
        raise ConfigError(
            f"task.window + task.horizon = {t['window']} + {t['horizon']} must be at most {room}, the {part} part's "
            f"steps ({steps} steps split {t['split']}): allowed task.horizon in [1, {max(room - t['window'], 0)}] "
            f"with task.window={t['window']}")
    history = t.get("train_history") or {}
    fed = cfg.get("federation") or {}
    holdout, holdout_history = fed.get("holdout"), fed.get("holdout_finetune")
    if not history and holdout is None:
        return
    territories = load_territories(dict(cfg))

    def keep(ds: TerritoryDataset, text: str) -> None:
        kept_train_bounds(ds, split_bounds(ds.num_steps, tuple(t["split"]))["train"], train_history_steps(ds, text),
                          int(t["window"]), int(t["horizon"]))

    for ds in territories:
        if history.get(ds.name) is not None:
            keep(ds, history[ds.name])
    if holdout is None:
        return
    names = [ds.name for ds in territories]
    if str(holdout) not in names:
        raise ConfigError(f"federation.holdout={str(holdout)[:128]!r} is not a territory of this pilot; its territories "
                          f"are {names}: name one of them, or null")
    if len(names) < 2:
        raise ConfigError(f"federation.holdout={holdout!r} is the pilot's only territory: no territory would train; "
                          "use federation.holdout=null, or a partition with more territories")
    if holdout_history is not None:  # checked here, not after every round of training
        try:
            keep(territories[names.index(str(holdout))], str(holdout_history))
        except ConfigError as e:
            raise ConfigError(f"federation.holdout_finetune={holdout_history!r} for the held-out territory: {e}") from None


@lru_cache(maxsize=2)
def _load_dataset_cached(key: str) -> Any:
    load, args = registered_call(json.loads(key), DATASET_LOADERS, "dataset")
    return load(**args)


def territory_view(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it is sent to territories: without the script-only blocks
    (:data:`fedldt.schema.SCRIPT_ONLY`: ``compare``, ``sweep``, ``resume``)."""
    return {k: v for k, v in cfg.items() if k not in SCRIPT_ONLY}


def num_territories(cfg: dict[str, Any]) -> int:
    """How many territories (federated clients) the config's partition makes."""
    return int(cfg["partition"]["num_territories"])


#: The dataset loaders a config may name in ``dataset._target_``: the only functions fedldt
#: calls from a config. The config travels to every territory and is read back from run
#: folders, so it is data, not code: nothing in it is imported or instantiated. To add a
#: loader, add its ``_target_`` string here (see README, "Adding a pilot").
DATASET_LOADERS: dict[str, Callable[..., Any]] = {
    "fedldt.data.load_los_loop": load_los_loop,
    "fedldt.data.los_loop.load_los_loop": load_los_loop,
    "fedldt.data.load_charged_cities": load_charged_cities,
    "fedldt.data.charged_ev.load_charged_cities": load_charged_cities,
    "fedldt.data.load_packages": load_packages,
    "fedldt.data.packages.load_packages": load_packages,
    "fedldt.data.load_package": load_package,
    "fedldt.data.package.load_package": load_package,
}
#: The partitions a config may name in ``partition._target_`` (called with the loaded dataset
#: first, then the block's other keys).
PARTITIONS: dict[str, Callable[..., Any]] = {
    "fedldt.data.partition_kmeans": partition_kmeans,
    "fedldt.data.partition.partition_kmeans": partition_kmeans,
    "fedldt.data.partition.as_given": as_given,
    "fedldt.data.as_given": as_given,
}


#: Every ``_target_`` a config may hold -> its allow-list (the keys are the only accepted values).
#: Dataset loaders and partitions are called by :func:`load_territories`; models are built by
#: :func:`fedldt.models.build_model`, strategies by ``server.strategy.build_strategy`` and
#: optimizers by :func:`fedldt.engine.build_optimizer`, each after checking its own list.
TARGETS: dict[str, Mapping[str, Any]] = {
    "dataset._target_": DATASET_LOADERS, "partition._target_": PARTITIONS, "model._target_": MODEL_TARGETS,
    "strategy._target_": STRATEGY_TARGETS, "train.optimizer._target_": OPTIMIZERS,
}


def registered_call(block: Mapping[str, Any], registry: Mapping[str, Callable[..., Any]], field: str,
                    skip: int = 0) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The registered function a config block names and its checked keyword arguments.

    Nothing is imported or called here: ``block["_target_"]`` is looked up in ``registry``
    (a fixed dict of fedldt functions) and the other keys are checked against that
    function's signature.

    Args:
        block: a config block such as ``cfg["dataset"]`` (``{"_target_": "...", **kwargs}``).
        registry: :data:`DATASET_LOADERS` or :data:`PARTITIONS`.
        field: the block's name in the config (``"dataset"``, ``"partition"``), for errors.
        skip: leading positional parameters fedldt passes itself (1 for a partition: the dataset).

    Returns:
        ``(function, kwargs)``.

    Raises:
        ConfigError (a ``ValueError``): ``_target_`` is missing, not a string or not registered (the value and the
            allowed list are named); a key is not a parameter of the function; a required
            parameter is missing; an argument holds a nested ``_target_`` (never instantiated);
            or a value has the wrong type or is out of range (:mod:`fedldt.schema`).
    """
    if not isinstance(block, Mapping):
        raise ConfigError(f"{field} must be a mapping with a _target_ key, got {type(block).__name__}")
    target = block.get("_target_")
    if not isinstance(target, str) or target not in registry:
        raise ConfigError(f"{field}._target_={target!r} is not a registered fedldt {field} function; allowed: "
                         f"{sorted(registry)} (a new one must be added to fedldt.config."
                         f"{'DATASET_LOADERS' if field == 'dataset' else 'PARTITIONS'})")
    fn = registry[target]
    kwargs = {k: v for k, v in block.items() if k != "_target_"}
    nested = _nested_targets(kwargs, field)
    if nested:
        raise ConfigError(f"{nested[0]} is not allowed: arguments of {field}._target_={target!r} are plain values, "
                         "nothing inside them is instantiated")
    params = list(inspect.signature(fn).parameters.values())[skip:]
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"{field}: {target} takes no argument(s) {unknown}; accepted: {sorted(accepted)}")
    required = sorted(p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                      and p.name not in kwargs)
    if required:
        raise ConfigError(f"{field}: {target} needs argument(s) {required} (set {field}.<name> in the config)")
    schemas = DATASET_SCHEMAS if field == "dataset" else PARTITION_SCHEMAS
    if fn.__name__ in schemas:  # types and ranges of the arguments
        check_block(schemas[fn.__name__], dict(block), field, f"conf/{field}/ or a command-line override")
    return fn, kwargs


def _nested_targets(value: Any, path: str) -> list[str]:
    """Paths of every ``_target_`` key inside ``value`` (dicts and lists, any depth)."""
    if isinstance(value, Mapping):
        return [p for k, v in value.items()
                for p in ([f"{path}.{k}"] if k == "_target_" else []) + _nested_targets(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _nested_targets(v, f"{path}[{i}]")]
    return []


def load_territories(cfg: dict[str, Any]) -> list[TerritoryDataset]:
    """Load the dataset and split it into territories, as the config says (cached per config).

    Only registered functions run (:data:`DATASET_LOADERS`, :data:`PARTITIONS`); both blocks
    are checked before anything is called.

    Raises:
        ValueError: see :func:`registered_call`; or the loader's/partition's own errors.
        ConfigError: ``task.train_history`` names a territory that is not among them
            (:func:`fedldt.engine.check_train_history_names`).
    """
    territories = list(_load_territories_cached(json.dumps({k: cfg[k] for k in ("dataset", "partition")}, sort_keys=True)))
    check_train_history_names(cfg.get("task") or {}, [t.name for t in territories])
    return territories


@lru_cache(maxsize=4)
def _load_territories_cached(key: str) -> tuple[TerritoryDataset, ...]:
    sub = json.loads(key)
    load, load_args = registered_call(sub["dataset"], DATASET_LOADERS, "dataset")
    split, split_args = registered_call(sub["partition"], PARTITIONS, "partition", skip=1)
    return tuple(split(load(**load_args), **split_args))


def parse_overrides(text: str) -> list[str]:
    """Hydra overrides from Flower's run config: a JSON list (as ``simulate.py`` sends) or a
    space-separated string (``"pilot=los_loop_3 train.rounds=2"``)."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        return [str(o) for o in json.loads(text)]
    return shlex.split(text)
