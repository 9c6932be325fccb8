"""Progress of a run: rounds done, elapsed time, estimated time left, last validation MAE.

One line format carries a round's progress from wherever training happens to the launching
process. The ServerApp (``server/strategy.py``) prints it once per round, the centralized and local
modes (:mod:`fedldt.baselines`) once per round of ``train.local_epochs`` epochs::

    [fedldt] round 3/10  train loss 0.1234  val MAE 4.123 (h12 5.017)  per territory: ...
    [fedldt] local metr-la round 2/5  train loss 0.2345  val MAE n/a

:func:`parse_round_line` reads it (the only parser), :class:`RunProgress` shows it: a rich
progress bar on stderr when stderr is a terminal, otherwise one plain line per round (CI logs
stay readable). ``scripts/simulate.py``, ``compare.py``, ``sweep.py`` and
``federation_local.py`` get it through :func:`fedldt.launch.simulation.run_flwr_app` (which
streams the ServerApp's log) and :mod:`fedldt.baselines`; ``compare`` and ``sweep`` name the
run of how many with :func:`run_slot`.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

# "[fedldt] " + optional label (words that are not "round") + "round R/T" + optional "... val MAE X"
_ROUND = re.compile(r"^\[fedldt\] (?:(?P<label>(?:(?!round )\S+ )+?))?round (?P<round>\d+)/(?P<total>\d+)(?=\s|$)")
_MAE = re.compile(r"\sval MAE (?P<mae>n/a|[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))(?=\s|$)")


@dataclass(frozen=True)
class RoundUpdate:
    """One round's progress line, parsed.

    Attributes:
        round: the round just finished (1-based).
        total: the run's number of rounds.
        val_mae: pooled validation MAE over every horizon step (data units, e.g. mph), ``None``
            when the line says ``n/a`` (no territory had a valid validation target) or has no MAE.
        label: text between ``[fedldt]`` and ``round`` (``"local metr-la"``), ``""`` if none.
    """

    round: int
    total: int
    val_mae: float | None
    label: str = ""


def round_line(rnd: int, total: int, train_loss: float | None, val_mae: float | None, label: str = "", extra: str = "") -> str:
    """The progress line of one round (what :func:`parse_round_line` reads back), no newline."""
    head = f"[fedldt] {label + ' ' if label else ''}round {rnd}/{total}"
    return f"{head}  train loss {fmt(train_loss, 4)}  val MAE {fmt(val_mae, 3)}{extra}"


def fmt(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals, ``"n/a"`` for ``None``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def parse_round_line(line: str) -> RoundUpdate | None:
    """Parse a round's progress line (see the module docstring); ``None`` for any other line.

    Lines that only look alike are refused: the round must be ``1 <= round <= total``.
    """
    m = _ROUND.match(line.strip())
    if m is None:
        return None
    rnd, total = int(m["round"]), int(m["total"])
    if not 1 <= rnd <= total:
        return None
    mae_m = _MAE.search(line.strip()[m.end():])
    mae = None if mae_m is None or mae_m["mae"] == "n/a" else float(mae_m["mae"])
    return RoundUpdate(rnd, total, mae, (m["label"] or "").strip())


def _clock_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _isatty(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


_slot = threading.local()


@contextmanager
def run_slot(index: int, count: int, name: str) -> Iterator[None]:
    """Name the run that starts inside the block (run ``index`` of ``count``, called ``name``):
    every progress display opened in it is titled ``run <index>/<count> ...`` (see
    :func:`run_title`); ``compare`` and ``sweep`` run several."""
    previous = getattr(_slot, "value", None)
    _slot.value = (int(index), int(count), str(name))
    try:
        yield
    finally:
        _slot.value = previous


def run_title(name: str) -> str:
    """Title of a progress display for ``name`` inside the innermost :func:`run_slot` of this
    thread: ``run 2/3 local metr-la`` for ``name="local metr-la"`` in slot ``(2, 3, "local")``,
    ``run 1/4 dcrnn-fedavg federated`` for ``name="federated"`` in slot ``(1, 4, "dcrnn-fedavg")``;
    ``name`` (or ``"run"``) outside a slot."""
    slot = getattr(_slot, "value", None)
    if slot is None:
        return name or "run"
    index, count, slot_name = slot
    if not name or name == slot_name or name.startswith(slot_name + " "):
        return f"run {index}/{count} {name or slot_name}"
    return f"run {index}/{count} {slot_name} {name}"


class RunProgress:
    """Show a run's rounds: rich progress bar on a terminal, plain lines otherwise.

    Use as a context manager; call :meth:`feed` with every log line (other lines are ignored) or
    :meth:`update` with a parsed round. Thread-safe (the Flower log arrives in a thread).

    Args:
        name: what runs (``"federated"``, ``"local metr-la"``); titled by :func:`run_title`.
        console: where to show it (default: a rich console on stderr). Rich's terminal detection
            decides: a live bar when ``console.is_terminal``, plain lines otherwise.
        clock: seconds, monotonic (default ``time.monotonic``); elapsed time and the estimate
            of time left come from it.

    The time left is (rounds left) x (mean time per round since the first round seen ended), or,
    at the first round seen, (time since the display started) / (rounds done), which includes
    start-up.
    """

    def __init__(self, name: str = "", console: Console | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console if console is not None else Console(file=sys.stderr)
        self.clock = clock
        self.title = run_title(name)
        self.last: RoundUpdate | None = None
        self._t0 = 0.0
        self._first: tuple[int, float] | None = None  # (first round seen, when it ended)
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    @property
    def live(self) -> bool:
        """True when a rich progress bar is shown (the console is a terminal)."""
        return bool(self.console.is_terminal)

    def __enter__(self) -> "RunProgress":
        self._t0 = self.clock()
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                TimeElapsedColumn(), TextColumn("left {task.fields[left]}"), TextColumn("val MAE {task.fields[mae]}"),
                # print() above the bar only where stdout is this terminal too (`> file` keeps the file)
                console=self.console, redirect_stdout=_isatty(sys.stdout), redirect_stderr=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(escape(self.title), total=None, left="?", mae="n/a")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def feed(self, line: str) -> RoundUpdate | None:
        """Parse ``line``; show it if it is a round's progress line. Returns the parsed round or ``None``."""
        upd = parse_round_line(line)
        if upd is not None:
            self.update(upd)
        return upd

    def time_left(self, upd: RoundUpdate, now: float) -> float:
        """Seconds estimated until round ``upd.total`` ends, given that ``upd.round`` ended at ``now``."""
        if self._first is None or upd.round <= self._first[0]:
            per_round = (now - self._t0) / upd.round
        else:
            per_round = (now - self._first[1]) / (upd.round - self._first[0])
        return per_round * (upd.total - upd.round)

    def update(self, upd: RoundUpdate) -> None:
        """Show that round ``upd.round`` of ``upd.total`` ended with validation MAE ``upd.val_mae``."""
        with self._lock:
            now = self.clock()
            if self._first is None or upd.round <= self._first[0]:
                self._first = (upd.round, now)
            left = _clock_text(self.time_left(upd, now))
            self.last = upd
            mae = fmt(upd.val_mae, 3)
            title = self.title if not upd.label or self.title.endswith(upd.label) else f"{self.title} {upd.label}"
            if self._bar is not None and self._task is not None:
                self._bar.update(self._task, total=upd.total, completed=upd.round, left=left, mae=mae, description=escape(title))
            else:
                self.console.print(
                    f"[fedldt] progress {title}: round {upd.round}/{upd.total}  elapsed {_clock_text(now - self._t0)}  "
                    f"left {left}  val MAE {mae}",
                    markup=False, highlight=False, soft_wrap=True,
                )
