"""Checkpoints of a federated run, so that a run that stops (a crash, a killed SuperLink) can be
continued with ``resume=<run folder>`` (``docs/resume.md``).

Two kinds, both written atomically (a temporary file in the same folder, then ``os.replace``)
and read tensors-only (``torch.load(weights_only=True)``: no pickled code is ever run), then
checked before anything uses them:

* the **server checkpoint** ``<run folder>/checkpoint.pt`` (:func:`save_checkpoint`,
  :func:`load_checkpoint`), rewritten after every round: the global (shared) arrays, the round
  number, the strategy's state (server optimizer moments, momentum), the metric history so far,
  the server's random states, an ``extra`` slot for other components (e.g. a privacy
  accountant), the run key and the run config;
* the **territory checkpoint** ``<territory out-dir>/checkpoints/<run key>/local-round-<r>.pt``
  (:func:`save_local_state`, :func:`load_local_state`): the entries a territory keeps at home
  (personalized layers, node embeddings, integer buffers) after its training of round ``r``;
  it never leaves the territory.

A territory needs no random state in its checkpoint: its training seeds are derived from the
run seed, its index and the round (:func:`fedldt.engine.derive_seed`), and its optimizer is
built afresh every round, so a resumed round shuffles and drops out exactly as the straight run.

Components that have state implement :class:`Checkpointable`: ``checkpoint_state()`` returns a
:class:`State` (named numpy arrays plus JSON metadata) and ``load_checkpoint_state(state)`` puts
it back. The strategy is the component ``"strategy"``; others go in ``extra`` under their name.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from fedldt.schema import ConfigError

#: File name of the server checkpoint in a run folder.
CHECKPOINT = "checkpoint.pt"
#: ``format`` field of both checkpoint kinds.
FORMAT = "fedldt-checkpoint"
VERSION = 1
#: Config keys a resume may change (dotted); any other difference is refused.
RESUMABLE_KEYS = frozenset({"train.rounds", "resume"})
#: A run key: 32 lower-case hex digits (``uuid4().hex``); it names a territory's checkpoint folder.
RUN_KEY = re.compile(r"[0-9a-f]{32}")
#: Rounds of local state a territory keeps (the server's checkpoint is at most one round behind).
KEEP_LOCAL_ROUNDS = 2


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable, corrupt or does not fit the run; the message names
    the file and the fix."""


@dataclass
class State:
    """What one component saves: named arrays (any numeric dtype, any shape) and JSON metadata."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Checkpointable(Protocol):
    """A component whose state a checkpoint saves (the strategy, a privacy accountant)."""

    def checkpoint_state(self) -> State: ...

    def load_checkpoint_state(self, state: State) -> None: ...


@dataclass
class Checkpoint:
    """A loaded, checked server checkpoint.

    Attributes:
        round: the last completed round (>= 1).
        run_key: the run's key (:data:`RUN_KEY`), sent to territories with every message.
        config: the run config the checkpoint was written with.
        territories: territory index -> territory id.
        arrays: the global (shared) model after ``round``, key -> array.
        components: component name (``"strategy"``, the ``extra`` ones) -> :class:`State`.
        rng: the server's random states (see :func:`rng_state`).
        elapsed_s: wall time spent on the run so far, seconds.
        path: the file.
    """

    round: int
    run_key: str
    config: dict[str, Any]
    territories: dict[int, str]
    arrays: dict[str, np.ndarray]
    components: dict[str, State]
    rng: State
    elapsed_s: float
    path: Path


# ------------------------------------------------------------------ files
def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it:
    a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tensors(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _load(path: Path, what: str, fix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint file tensors-only; returns ``(meta, tensors)``.

    Raises:
        CheckpointError: missing, unreadable, not a fedldt checkpoint, or malformed (file and fix named).
    """
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; {fix}")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that needs code
        raise CheckpointError(f"{what} {path} cannot be read ({type(e).__name__}); it is corrupt or was not "
                              f"written by fedldt; {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{what} {path} is not a fedldt checkpoint (no format '{FORMAT}'); {fix}")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{what} {path} has version {doc.get('version')!r}; this fedldt reads version {VERSION}; {fix}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise CheckpointError(f"{what} {path}: field 'tensors' must map names to tensors; {fix}")
    try:
        meta = json.loads(doc.get("meta"), parse_constant=_not_json)
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{what} {path}: field 'meta' is not valid JSON; {fix}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{what} {path}: field 'meta' must be a JSON object; {fix}")
    return meta, tensors


def _not_json(name: str) -> Any:
    """``parse_constant`` of :func:`json.loads`: NaN and Infinity are not JSON (``_dumps`` never writes them)."""
    raise ValueError(f"{name} is not JSON")


def _arrays(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}


def _dumps(meta: Mapping[str, Any]) -> str:
    return json.dumps(meta, allow_nan=False)  # key order kept: history rows keep their column order


# ------------------------------------------------------------------ random states
def rng_state() -> State:
    """The process's random states: Python's ``random``, NumPy's global generator, torch's CPU
    generator (the ones :func:`fedldt.engine.seed_everything` seeds)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return State(arrays={"numpy": np.asarray(keys, dtype=np.int64), "torch": torch.get_rng_state().numpy()},
                 meta={"python": [version, list(internal), gauss], "numpy": [str(kind), int(pos), int(has_gauss), float(cached)]})


def set_rng_state(state: State) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state.meta["python"]
    random.setstate((int(version), tuple(int(i) for i in internal), gauss))
    kind, pos, has_gauss, cached = state.meta["numpy"]
    np.random.set_state((str(kind), state.arrays["numpy"].astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.from_numpy(np.array(state.arrays["torch"], dtype=np.uint8)))


# ------------------------------------------------------------------ config identity
def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (one side may lack the key),
    except :data:`RESUMABLE_KEYS`, sorted."""
    a, b = _flat(saved), _flat(current)
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_KEYS and a.get(k, ...) != b.get(k, ...))


# ------------------------------------------------------------------ server checkpoint
def save_checkpoint(run_dir: Path, *, round: int, run_key: str, config: Mapping[str, Any],
                    territories: Mapping[int, str], arrays: Mapping[str, np.ndarray],
                    components: Mapping[str, Checkpointable], elapsed_s: float) -> Path:
    """Write ``<run_dir>/checkpoint.pt`` (atomically) after ``round``.

    Args:
        arrays: the global (shared) model, key -> array.
        components: ``"strategy"`` and any extra component, name -> object with
            ``checkpoint_state()`` (:class:`Checkpointable`); the RNG states are added here.

    Returns:
        The file written.

    Raises:
        ValueError: metadata that is not JSON (NaN included); a component name with ``/``.
    """
    tensors = _tensors(arrays, "global/")
    metas: dict[str, Any] = {}
    for name, comp in components.items():
        if "/" in name:
            raise ValueError(f"checkpoint component name {name!r} must not contain '/'")
        st = comp.checkpoint_state()
        tensors.update(_tensors(st.arrays, f"component/{name}/"))
        metas[name] = st.meta
    rng = rng_state()
    tensors.update(_tensors(rng.arrays, "rng/"))
    meta = {"round": int(round), "run_key": run_key, "config": dict(config), "elapsed_s": float(elapsed_s),
            "territories": {str(i): t for i, t in territories.items()}, "components": metas, "rng": rng.meta}
    path = Path(run_dir) / CHECKPOINT
    _atomic_save({"format": FORMAT, "version": VERSION, "meta": _dumps(meta), "tensors": tensors}, path)
    return path


def load_checkpoint(run_dir: Path | str, config: Mapping[str, Any]) -> Checkpoint:
    """Read and check ``<run_dir>/checkpoint.pt`` for a resume of a run with ``config``.

    Checks: the file is a fedldt checkpoint (tensors-only), its round is an integer >= 1 and at
    most ``config["train"]["rounds"]``, its run key is well formed, and its config equals
    ``config`` but for :data:`RESUMABLE_KEYS`. The global arrays' keys and shapes are checked
    against the model by :func:`check_global_arrays` (the server knows the model).

    Raises:
        CheckpointError: the file is missing or corrupt, or does not fit ``config`` (the
            differing keys named), with the fix.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    fix = ("resume=<run folder> must name the folder of a federated fedldt run that completed at least one round "
           "(its checkpoint.pt is written after every round); or start a new run without resume=")
    meta, tensors = _load(path, "checkpoint", fix)
    try:
        rnd, key = meta["round"], meta["run_key"]
        saved_cfg, metas, rng_meta = meta["config"], meta["components"], meta["rng"]
        territories = {int(i): str(t) for i, t in meta["territories"].items()}
        elapsed = float(meta["elapsed_s"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: metadata field {e} is missing or malformed; {fix}") from None
    if not elapsed >= 0.0:  # NaN fails too (json.loads reads no NaN here, but float("nan") of a string does)
        raise CheckpointError(f"checkpoint {path}: elapsed_s {meta['elapsed_s']!r} must be a number of seconds >= 0; {fix}")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise CheckpointError(f"checkpoint {path}: round {rnd!r} must be an integer >= 1; {fix}")
    if not isinstance(key, str) or not RUN_KEY.fullmatch(key):
        raise CheckpointError(f"checkpoint {path}: run key {key!r} must be 32 hex digits; {fix}")
    if not isinstance(saved_cfg, dict) or not isinstance(metas, dict):
        raise CheckpointError(f"checkpoint {path}: 'config' and 'components' must be JSON objects; {fix}")
    diff = config_differences(saved_cfg, config)
    if diff:
        shown = ", ".join(f"{k} (checkpoint {_flat(saved_cfg).get(k, '<absent>')!r}, now {_flat(config).get(k, '<absent>')!r})"
                          for k in diff[:10])
        raise CheckpointError(f"resume={run_dir}: the run config differs from the checkpoint's in {shown}"
                              f"{' ...' if len(diff) > 10 else ''}; a resume may change only train.rounds: use the "
                              f"run's own settings (its resolved_config.yaml), or start a new run without resume=")
    rounds = int(config["train"]["rounds"])
    if rnd > rounds:
        raise CheckpointError(f"resume={run_dir}: the checkpoint is after round {rnd}, more than train.rounds={rounds}; "
                              f"set train.rounds to {rnd} or more")
    if not all(isinstance(m, dict) for m in metas.values()) or not isinstance(rng_meta, dict):
        raise CheckpointError(f"checkpoint {path}: each component's state and 'rng' must be JSON objects; {fix}")
    components = {str(n): State(_arrays(tensors, f"component/{n}/"), dict(m)) for n, m in metas.items()}
    for name, st in components.items():
        for k, a in st.arrays.items():
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise CheckpointError(f"checkpoint {path}: array '{k}' of component '{name}' is not finite; the file is "
                                      f"corrupt; {fix}")
    rng = State(_arrays(tensors, "rng/"), dict(rng_meta))
    before = rng_state()
    try:  # a forged random state fails here, named, not in the middle of the resume
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: the random state is malformed ({type(e).__name__}); the file is "
                              f"corrupt; {fix}") from None
    finally:
        set_rng_state(before)
    return Checkpoint(round=rnd, run_key=key, config=saved_cfg, territories=territories,
                      arrays=_arrays(tensors, "global/"), components=components, rng=rng, elapsed_s=elapsed,
                      path=path)


def restore_components(ckpt: Checkpoint, components: Mapping[str, Checkpointable]) -> None:
    """Load each component's state from ``ckpt`` (``load_checkpoint_state``), then the random states.

    Raises:
        CheckpointError: a component has no state in the checkpoint, or refuses its state (a
            ``ValueError``/``KeyError``/``TypeError`` of its own check), the file and component named.
    """
    missing = sorted(set(components) - set(ckpt.components))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path} holds no state of {missing}; resume with the settings it was "
                              "written with")
    for name, comp in components.items():
        try:
            comp.load_checkpoint_state(ckpt.components[name])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path}: the state of '{name}' is malformed ({str(e)[:300]}); the "
                                  "file is corrupt or was written by another fedldt; start a new run without resume=") from None
    set_rng_state(ckpt.rng)


def check_global_arrays(ckpt: Checkpoint, template: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Check that the checkpoint's global arrays fit the model exactly (keys, shapes, dtypes).

    Args:
        template: shared key -> ``(shape, dtype)`` of the model the server built.

    Raises:
        CheckpointError: a key missing or extra, a shape or dtype that differs (named).
    """
    missing, extra = sorted(set(template) - set(ckpt.arrays)), sorted(set(ckpt.arrays) - set(template))
    if missing or extra:
        raise CheckpointError(f"checkpoint {ckpt.path}: global arrays do not fit the model: missing {missing}, "
                              f"unexpected {extra}; it was written for another model")
    for k, (shape, dtype) in template.items():
        a = ckpt.arrays[k]
        if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
            raise CheckpointError(f"checkpoint {ckpt.path}: global array '{k}' is {a.dtype}{list(a.shape)}, the model "
                                  f"has {np.dtype(dtype)}{list(shape)}; it was written for another model")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {ckpt.path}: global array '{k}' is not finite; the file is corrupt")


# ------------------------------------------------------------------ territory checkpoint
def local_state_path(folder: Path | str, run_key: str, server_round: int) -> Path:
    """``<folder>/checkpoints/<run_key>/local-round-<round>.pt``.

    Raises:
        ValueError: ``run_key`` is not :data:`RUN_KEY` (it comes from the server: never a path).
    """
    if not isinstance(run_key, str) or not RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key {run_key!r} must be 32 hex digits")
    return Path(folder) / "checkpoints" / run_key / f"local-round-{int(server_round):06d}.pt"


def save_local_state(folder: Path | str, run_key: str, server_round: int, state: Mapping[str, torch.Tensor]) -> Path:
    """Write a territory's local entries after its training of ``server_round`` (atomically) and
    delete its own older files of the run beyond the last :data:`KEEP_LOCAL_ROUNDS`."""
    path = local_state_path(folder, run_key, server_round)
    meta = {"round": int(server_round), "run_key": run_key}
    _atomic_save({"format": FORMAT, "version": VERSION, "meta": _dumps(meta),
                  "tensors": {k: v.detach().cpu().clone() for k, v in state.items()}}, path)
    for old in path.parent.glob("local-round-*.pt"):
        m = re.fullmatch(r"local-round-(\d{6})\.pt", old.name)
        if m and int(m.group(1)) <= server_round - KEEP_LOCAL_ROUNDS:
            old.unlink(missing_ok=True)
    return path


def latest_local_round(folder: Path | str, run_key: str, at_most: int) -> int | None:
    """The last round, at most ``at_most``, after which this territory saved its local entries in run
    ``run_key`` (``None``: none yet, e.g. a territory whose training failed in every round so far).

    Raises:
        ValueError: ``run_key`` is not :data:`RUN_KEY`.
    """
    rounds = [int(m.group(1)) for f in local_state_path(folder, run_key, 0).parent.glob("local-round-*.pt")
              if (m := re.fullmatch(r"local-round-(\d{6})\.pt", f.name)) and int(m.group(1)) <= at_most]
    return max(rounds, default=None)


def load_local_state(folder: Path | str, run_key: str, server_round: int) -> dict[str, torch.Tensor]:
    """A territory's local entries saved after its training of ``server_round``.

    Raises:
        CheckpointError: missing, corrupt or for another run/round (the file named; the keys and
            shapes are checked when the model loads them).
    """
    path = local_state_path(folder, run_key, server_round)
    fix = ("this territory's local state of that round is needed to resume the run; restart the SuperNode with the "
           "out-dir it had (node config out-dir), or start a new run")
    meta, tensors = _load(path, "territory checkpoint", fix)
    if meta.get("round") != int(server_round) or meta.get("run_key") != run_key:
        raise CheckpointError(f"territory checkpoint {path} holds round {meta.get('round')!r} of run "
                              f"{meta.get('run_key')!r}, not round {server_round} of run {run_key}; {fix}")
    return dict(tensors)


def resume_folder(config: Mapping[str, Any]) -> str | None:
    """The absolute run folder ``config["resume"]`` names (relative: to the working directory),
    checked before any process starts; ``None`` for a new run.

    Raises:
        CheckpointError: not a federated run, or see :func:`load_checkpoint`.
    """
    if not config.get("resume"):
        return None
    if config.get("mode") != "federated":
        raise CheckpointError(f"resume={config['resume']} continues federated runs only; mode={config.get('mode')!r} "
                              "runs are short: start them again without resume=")
    folder = Path(str(config["resume"])).expanduser().resolve()
    load_checkpoint(folder, {**config, "resume": str(folder)})
    return str(folder)


# ------------------------------------------------------------------ territory's personal model
#: File name of a territory's personal model of one run (``personalization=finetune|ditto``, or
#: the held-out territory's fine-tuned model): ``<folder>/checkpoints/<run key>/personal.pt``.
PERSONAL_MODEL = "personal.pt"


def personal_model_path(folder: Path | str, run_key: str) -> Path:
    """``<folder>/checkpoints/<run_key>/personal.pt`` (the territory's own folder, node config ``out-dir``).

    Raises:
        ValueError: ``run_key`` is not :data:`RUN_KEY`.
    """
    return local_state_path(folder, run_key, 0).parent / PERSONAL_MODEL


def save_personal_model(folder: Path | str, run_key: str, state: Mapping[str, torch.Tensor],
                        meta: Mapping[str, Any]) -> Path:
    """Write a territory's complete personal model (every state-dict entry, shared and local)
    atomically, tensors only, file mode 0600 (a temporary file of ``tempfile.mkstemp``, renamed).

    Args:
        state: the model's state dict.
        meta: JSON-able facts about it (e.g. ``personalization``, ``kept``, ``round``); the run key
            is added.

    Raises:
        ValueError: ``run_key`` is not :data:`RUN_KEY`.
    """
    path = personal_model_path(folder, run_key)
    _atomic_save({"format": FORMAT, "version": VERSION, "meta": _dumps({**meta, "run_key": run_key}),
                  "tensors": {k: v.detach().cpu().clone() for k, v in state.items()}}, path)
    return path


def load_personal_model(folder: Path | str, run_key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A territory's personal model of run ``run_key`` (``torch.load(weights_only=True)``).

    Returns:
        ``(meta, state)``: what :func:`save_personal_model` wrote.

    Raises:
        CheckpointError: missing, corrupt, written for another run, or holding a non-finite
            (NaN/inf) floating-point entry (file and entries named; the keys and shapes are checked
            when the model loads them).
    """
    path = personal_model_path(folder, run_key)
    fix = ("the territory writes it when it personalizes its model (personalization=finetune|ditto, or "
           "federation.holdout_finetune); use the out-dir its SuperNode had in that run")
    meta, tensors = _load(path, "personal model", fix)
    if meta.get("run_key") != run_key:
        raise CheckpointError(f"personal model {path} belongs to run {str(meta.get('run_key'))[:40]!r}, not {run_key}; {fix}")
    bad = sorted(k for k, v in tensors.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"personal model {path}: entries {bad[:5]} hold NaN or inf (a diverged or altered "
                              f"model); {fix}")
    return meta, dict(tensors)
