"""Differential privacy of a federated run: the accountant, the DP-SGD schedule and the model check.

Two modes (``privacy.mode``, ``conf/privacy/*.yaml``, ``docs/privacy.md``):

* ``territory``: territory-level (client-level) DP, McMahan et al., "Learning Differentially
  Private Recurrent Language Models", ICLR 2018: each territory's model update is clipped to
  L2 norm ``clipping_norm`` (C), the server averages the clipped updates *unweighted* over the
  ``n`` territories that trained and adds Gaussian noise of std ``noise_multiplier * C / n``
  (Flower's ``DifferentialPrivacyServerSideFixedClipping``, ``server/strategy.py``). Every
  territory takes part in every round, so a round is one Gaussian mechanism without sampling
  amplification.
* ``sample``: sample-level DP-SGD, Abadi et al., "Deep Learning with Differential Privacy",
  CCS 2016, with Opacus (Yousefpour et al., arXiv:2109.12298): each territory trains on
  Poisson-sampled batches (rate ``q = 1 / ceil(N / batch_size)``, ``ceil(N / batch_size)`` steps
  per local epoch, Opacus' own schedule), clips each window's gradient to ``clipping_norm`` and
  adds Gaussian noise of std ``noise_multiplier * clipping_norm``. Each territory's guarantee is
  about one training window of its own data; the run reports the largest epsilon over territories.

The spent ``(epsilon, delta)`` is computed by Google's ``dp-accounting`` RDP accountant
(Mironov, "Renyi Differential Privacy", CSF 2017; ``dp_accounting.rdp.RdpAccountant``), never by
a formula written here. :class:`Accountant` keeps the composed events so that its state is plain
JSON (:meth:`Accountant.state_dict` / :meth:`Accountant.load_state_dict`) for checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import torch

#: ``privacy.accountant`` as reported in ``summary.json``.
ACCOUNTANT_NAME = "rdp (dp-accounting)"
#: Models whose layers Opacus computes per-window gradients for (checked in
#: ``tests/test_privacy.py``: Opacus' per-window gradients equal one-window backward passes).
#: The others and why, for :func:`check_sample_dp_model`.
OPACUS_INCOMPATIBLE = {
    "stgcn": "its graph convolutions use the weights and bias of PyG ChebConv modules whose own forward never "
             "runs (one sparse product per Chebyshev step instead); Opacus computes per-sample gradients per "
             "module forward, so it has none for those parameters",
    "gwnet": "its BatchNorm2d layers mix windows of a batch (Opacus' ModuleValidator refuses BatchNorm)",
}
#: Models with BatchNorm running statistics: under territory-level DP they would be shared, so
#: clipped and noised like weights (noise of std ``noise_multiplier * C / n`` per entry), and a
#: noisy running variance below 0 makes the model's outputs NaN. ``personalization=fedbn`` keeps
#: them (and the normalization weights) at home.
NORMALIZED_MODELS = frozenset({"gwnet"})
#: Opacus option for the models that fit: their layers see activations ``[node, batch, feature]``.
OPACUS_BATCH_FIRST = {"dcrnn": False}


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be honoured (the message names the field and the fix)."""


@dataclass(frozen=True)
class Event:
    """One composed Gaussian release (or ``count`` identical ones).

    Attributes:
        subject: whose data the guarantee is about (``"federation"`` for territory-level DP,
            the territory id for sample-level DP).
        noise_multiplier: sigma, noise std over the L2 sensitivity (> 0).
        sampling_rate: Poisson sampling probability q in (0, 1]; 1 = no sampling.
        count: number of identical releases (DP-SGD steps).
    """

    subject: str
    noise_multiplier: float
    sampling_rate: float
    count: int

    def dp_event(self) -> Any:
        """The ``dp_accounting`` event (``GaussianDpEvent``, Poisson-sampled when ``q < 1``)."""
        from dp_accounting import dp_event

        gauss = dp_event.GaussianDpEvent(self.noise_multiplier)
        return gauss if self.sampling_rate >= 1.0 else dp_event.PoissonSampledDpEvent(self.sampling_rate, gauss)


class Accountant:
    """RDP accountant of one or more subjects (``dp_accounting.rdp.RdpAccountant`` each).

    Args:
        delta: target delta of the reported epsilon, in (0, 1).

    The reported epsilon is the largest over subjects (each subject's data is protected by
    its own events; a territory's DP-SGD never touches another territory's windows).
    """

    def __init__(self, delta: float) -> None:
        if not 0.0 < float(delta) < 1.0:
            raise PrivacyConfigError(f"privacy.delta={delta!r} must be in (0, 1)")
        self.delta = float(delta)
        self.events: list[Event] = []
        self._backends: dict[str, Any] = {}  # subject -> dp_accounting.rdp.RdpAccountant

    def compose(self, events: Iterable[Event]) -> None:
        """Add releases to the ledger."""
        for ev in events:
            if not (ev.noise_multiplier > 0 and 0 < ev.sampling_rate <= 1 and ev.count >= 0):
                raise ValueError(f"invalid privacy event {ev}: noise_multiplier > 0, 0 < sampling_rate <= 1, count >= 0")
            if ev.count == 0:
                continue
            if ev.subject not in self._backends:
                from dp_accounting.rdp import RdpAccountant

                self._backends[ev.subject] = RdpAccountant()
            self._backends[ev.subject].compose(ev.dp_event(), ev.count)
            self.events.append(ev)

    def epsilon(self) -> float:
        """The spent epsilon at :attr:`delta`: max over subjects (0.0 before any release)."""
        return max((float(b.get_epsilon(self.delta)) for b in self._backends.values()), default=0.0)

    def epsilon_after(self, events: Iterable[Event]) -> float:
        """The epsilon the ledger would report after also composing ``events`` (state unchanged)."""
        trial = Accountant(self.delta)
        trial.compose([*self.events, *events])
        return trial.epsilon()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"delta", "events": [{subject, noise_multiplier,
        sampling_rate, count}]}`` (the RDP curves are rebuilt from the events on load)."""
        return {"delta": self.delta, "events": [vars(e).copy() for e in self.events]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (replaces the ledger).

        Raises:
            ValueError: another delta, or a malformed event.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("events"), list):
            raise ValueError("accountant state must be {'delta': float, 'events': [...]} (Accountant.state_dict())")
        if state.get("delta") != self.delta:
            raise ValueError(f"accountant state has delta={state.get('delta')!r}, this run has privacy.delta={self.delta}")
        events = []
        for i, e in enumerate(state["events"]):
            try:
                count = e["count"]
                if isinstance(count, bool) or not isinstance(count, int):  # int(2.7) would drop releases
                    raise TypeError(f"count {count!r} is not an integer")
                ev = Event(str(e["subject"]), _number(e["noise_multiplier"]), _number(e["sampling_rate"]), count)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"accountant state event {i} is malformed ({exc!r}); it needs subject, "
                                 "noise_multiplier, sampling_rate, count") from None
            if not all(math.isfinite(v) for v in (ev.noise_multiplier, ev.sampling_rate)):
                raise ValueError(f"accountant state event {i} has a non-finite value")
            events.append(ev)
        fresh = Accountant(self.delta)
        fresh.compose(events)  # raises on an invalid event before this ledger changes
        self.events, self._backends = fresh.events, fresh._backends


def _number(v: Any) -> float:
    """A JSON number as float; text (``"nan"``) and booleans raise ``TypeError``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{v!r} is not a number")
    return float(v)


def dpsgd_schedule(num_windows: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Opacus' Poisson schedule of a territory's local training in one round.

    Returns:
        ``(q, steps)``: sampling rate ``1 / ceil(N / batch_size)`` and
        ``epochs * ceil(N / batch_size)`` steps (``opacus.data_loader.DPDataLoader``).
    """
    per_epoch = max(1, math.ceil(int(num_windows) / int(batch_size)))
    return 1.0 / per_epoch, int(epochs) * per_epoch


def round_events(privacy: Mapping[str, Any], train: Mapping[str, Any], trained: Mapping[str, int]) -> list[Event]:
    """The releases of one round.

    Args:
        privacy: the ``privacy`` block.
        train: the ``train`` block (``batch_size``, ``local_epochs``).
        trained: territory id -> training windows, of the territories whose update was used.
    """
    sigma = float(privacy["noise_multiplier"])
    if privacy["mode"] == "territory":
        return [Event("federation", sigma, 1.0, 1)] if trained else []
    out = []
    for tid, n in sorted(trained.items()):
        q, steps = dpsgd_schedule(n, int(train["batch_size"]), int(train["local_epochs"]))
        out.append(Event(str(tid), sigma, q, steps))
    return out


class PrivacyLedger:
    """The accountant of a run and the epsilon after each round (kept on the strategy).

    Args:
        privacy: the ``privacy`` block (mode ``territory`` or ``sample``).
        train: the ``train`` block.

    Attributes:
        accountant: the :class:`Accountant`.
        epsilon_by_round: round -> epsilon spent after it.
    """

    def __init__(self, privacy: Mapping[str, Any], train: Mapping[str, Any]) -> None:
        self.privacy, self.train = dict(privacy), dict(train)
        self.accountant = Accountant(float(privacy["delta"]))
        self.epsilon_by_round: dict[int, float] = {}

    def record_round(self, server_round: int, trained: Mapping[str, int]) -> float:
        """Compose the round's releases; returns the epsilon spent so far."""
        self.accountant.compose(round_events(self.privacy, self.train, trained))
        self.epsilon_by_round[int(server_round)] = eps = self.accountant.epsilon()
        return eps

    def rounds_within_budget(self, rounds: int, territories: Mapping[str, int]) -> int:
        """How many of the next ``rounds`` rounds fit ``privacy.max_epsilon`` (all of them when
        it is null), each round's releases composed before it is run; ``territories``: id ->
        training windows of every territory (each trains in every round)."""
        limit = self.privacy.get("max_epsilon")
        if limit is None:
            return int(rounds)
        events = round_events(self.privacy, self.train, territories)

        def fits(r: int) -> bool:  # r rounds more: each event r times (RDP of k identical releases = k times one)
            return self.accountant.epsilon_after([replace(e, count=e.count * r) for e in events]) <= float(limit)

        # epsilon never decreases with more rounds: the largest fitting r by bisection, about
        # log2(rounds) accountant calls (a loop over rounds composing r rounds each took minutes)
        lo, hi = 0, int(rounds)  # fits(lo) (no round: nothing to check), the answer is in lo..hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    def state_dict(self) -> dict[str, Any]:
        """JSON state: the accountant's and the per-round epsilons."""
        return {"accountant": self.accountant.state_dict(),
                "epsilon_by_round": {str(k): v for k, v in sorted(self.epsilon_by_round.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: malformed state, or another delta (:meth:`Accountant.load_state_dict`).
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("epsilon_by_round"), Mapping):
            raise ValueError("privacy ledger state must be {'accountant': ..., 'epsilon_by_round': {...}} "
                             "(PrivacyLedger.state_dict())")
        try:
            by_round = {int(k): _number(v) for k, v in state["epsilon_by_round"].items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"privacy ledger state: malformed epsilon_by_round ({exc!r})") from None
        if not all(math.isfinite(v) and v >= 0 for v in by_round.values()):  # summary.json is strict JSON
            raise ValueError("privacy ledger state: epsilon_by_round holds a negative or non-finite epsilon")
        self.accountant.load_state_dict(state.get("accountant"))
        self.epsilon_by_round = by_round

    def checkpoint_state(self) -> Any:
        """The ledger as a checkpoint component (:class:`fedldt.checkpoint.State`, JSON metadata
        only: :meth:`state_dict`); ``server.rounds.run_federated`` saves it as ``"privacy"``."""
        from fedldt.checkpoint import State

        return State(meta=self.state_dict())

    def load_checkpoint_state(self, state: Any) -> None:
        """Restore :meth:`checkpoint_state` output (:meth:`load_state_dict` of its metadata)."""
        self.load_state_dict(state.meta)

    def summary(self, rounds_planned: int, rounds_run: int) -> dict[str, Any]:
        """The ``summary.json`` ``privacy`` block."""
        limit = self.privacy.get("max_epsilon")
        return {"mode": self.privacy["mode"], "epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                "noise_multiplier": float(self.privacy["noise_multiplier"]),
                "clipping_norm": float(self.privacy["clipping_norm"]), "accountant": ACCOUNTANT_NAME,
                "max_epsilon": None if limit is None else float(limit), "rounds_planned": int(rounds_planned),
                "rounds_run": int(rounds_run), "stopped_by_budget": int(rounds_run) < int(rounds_planned),
                "epsilon_by_round": {str(k): v for k, v in sorted(self.epsilon_by_round.items())}}


def check_privacy_config(cfg: Mapping[str, Any]) -> None:
    """Refuse privacy settings the run cannot honour.

    Raises:
        PrivacyConfigError: privacy outside ``mode=federated``; territory-level DP with a rule
            other than ``fedavg``/``fedprox`` (noise is calibrated to an unweighted mean; a server
            optimizer or a median would change the sensitivity); territory-level DP with a model of
            :data:`NORMALIZED_MODELS` without ``personalization=fedbn``; sample-level DP with FedProx
            ``proximal_mu > 0`` (the proximal gradient would bypass per-window clipping) or a
            model whose layers Opacus cannot handle (:data:`OPACUS_INCOMPATIBLE`).
    """
    p = cfg.get("privacy", {"mode": "none"})
    if p["mode"] == "none":
        return
    if cfg["mode"] != "federated":
        raise PrivacyConfigError(f"privacy={p['mode']} applies to mode=federated only (mode={cfg['mode']}); "
                                 "use privacy=none for centralized/local reference runs")
    strategy = str(cfg["strategy"]["name"])
    if p["mode"] == "territory" and strategy not in ("fedavg", "fedprox"):
        raise PrivacyConfigError(
            f"privacy=territory needs strategy=fedavg or fedprox (got strategy={strategy}): the noise is calibrated "
            "to the unweighted mean of clipped updates; a server optimizer, momentum, median or Krum changes the "
            "sensitivity")
    personalization = str((cfg.get("personalization") or {}).get("name", "none"))
    if p["mode"] == "territory" and str(cfg["model"]["name"]) in NORMALIZED_MODELS and personalization != "fedbn":
        raise PrivacyConfigError(
            f"privacy=territory with model={cfg['model']['name']} and personalization={personalization}: its BatchNorm "
            "running statistics would be shared and noised, and a noisy running variance below 0 makes the outputs NaN; "
            "use personalization=fedbn (normalization stays in each territory) or model=dcrnn or stgcn")
    if p["mode"] == "sample":
        if strategy == "fedprox" and float(cfg["strategy"].get("proximal_mu", 0.0)) > 0:
            raise PrivacyConfigError("privacy=sample with strategy=fedprox proximal_mu > 0: the proximal gradient "
                                     "would bypass per-window clipping; use strategy=fedavg or proximal_mu=0")
        check_sample_dp_model(str(cfg["model"]["name"]))


def check_sample_dp_model(name: str) -> None:
    """Raise :class:`PrivacyConfigError` when Opacus cannot train model ``name``."""
    if name in OPACUS_INCOMPATIBLE:
        raise PrivacyConfigError(f"privacy=sample (Opacus DP-SGD) does not fit model={name}: {OPACUS_INCOMPATIBLE[name]}; "
                                 f"use model={' or '.join(sorted(OPACUS_BATCH_FIRST))} or privacy=territory")
    if name not in OPACUS_BATCH_FIRST:
        raise PrivacyConfigError(f"privacy=sample: model={name} was not checked with Opacus; "
                                 f"supported: {sorted(OPACUS_BATCH_FIRST)}")


def per_window_masked_mae(y_hat: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over windows of each window's own masked MAE (``[batch, horizon, node, channel]``
    in, a scalar out). Unlike the pooled masked MAE, one window's loss does not depend on the
    other windows' masks, so per-window clipping bounds each window's influence (DP-SGD)."""
    dims = tuple(range(1, y.dim()))
    err = ((y_hat - y).abs() * mask).sum(dims)
    return (err / mask.sum(dims).clamp_min(1.0)).mean()


def dpsgd_options(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``dp`` argument of :meth:`fedldt.engine.TerritoryTask.fit` for a run config:
    ``None`` unless ``privacy.mode`` is ``sample``.

    Raises:
        PrivacyConfigError: the model does not fit Opacus (:func:`check_sample_dp_model`).
    """
    p = cfg.get("privacy", {"mode": "none"})
    if p["mode"] != "sample":
        return None
    name = str(cfg["model"]["name"])
    check_sample_dp_model(name)
    return {"noise_multiplier": float(p["noise_multiplier"]), "clipping_norm": float(p["clipping_norm"]),
            "batch_first": OPACUS_BATCH_FIRST[name]}
