"""Run a pilot on Flower's simulation engine through the Flower CLI (``flwr run``).

A private simulation SuperLink (``flower-superlink --simulation``) is started on a free
loopback port with its own ``FLWR_HOME``, runtime dependency installation disabled (so the
run uses this environment's CPU torch), the app (this checkout) is submitted with
``flwr run``, its log is streamed, its final status is checked (``flwr run`` alone reports
success even when a run failed) and every process started here is stopped at the end.

Stopping: every script (``scripts/simulate.py``, ``compare.py``, ``sweep.py``,
``federation_local.py``) runs inside :func:`interruptible`, which turns SIGTERM (what
``timeout``, Slurm, Kubernetes and systemd send) into the same path as Ctrl-C: a
``KeyboardInterrupt`` raised in the main thread, so every ``finally`` here and in
:class:`fedldt.launch.loopback.LocalFederation` stops the processes it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil

from fedldt.config import checkout_root, composable_overrides
from fedldt.schema import ConfigError
from fedldt.launch.progress import RunProgress


class RunFailed(RuntimeError):
    """The Flower run did not finish with status ``finished:completed``."""


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM) arrived; handled exactly like Ctrl-C (``KeyboardInterrupt``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = int(signum)


def _raise_terminated(signum: int, frame: Any) -> None:
    # A second SIGTERM while the first one's cleanup runs must not cut that cleanup short.
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def interruptible(note: str = "") -> Iterator[None]:
    """Run a script's body so that SIGTERM stops it as Ctrl-C does, then exit with a clear status.

    Inside the block the first SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in
    the main thread, so the ``finally`` blocks of :func:`run_simulation` and
    :class:`~fedldt.launch.loopback.LocalFederation` stop every process started; further
    SIGTERMs are ignored while they do. On leaving by Ctrl-C or SIGTERM it prints
    ``fedldt: interrupted by <Ctrl-C|SIGTERM>; every process started was stopped<note>`` on
    stderr and exits with status 130 (Ctrl-C) or 143 (128 + SIGTERM), as shells report. A
    :class:`RunFailed` from the block prints ``fedldt: run failed: <reason>`` and exits with 1.

    Must be entered from the main thread (Python delivers signals there only).
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as e:
        how = signal.Signals(e.signum).name if isinstance(e, Terminated) else "Ctrl-C"
        print(f"fedldt: interrupted by {how}; every process started was stopped{note}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum if isinstance(e, Terminated) else 130)
    except RunFailed as e:
        print(f"fedldt: run failed: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def config_errors() -> Iterator[None]:
    """Report a bad config as one line instead of a traceback: a
    :class:`fedldt.schema.ConfigError` (the key, the value, the allowed range, where to set it)
    inside the block is printed as ``fedldt: bad config: <message>`` on stderr and the script
    exits with status 2, before any process is started."""
    from fedldt.schema import ConfigError

    try:
        yield
    except ConfigError as e:
        print(f"fedldt: bad config: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _bin(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found: install fedldt's dependencies (flwr) in this environment")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no runtime installs."""
    env = dict(os.environ)
    # Flower's processes start further Flower console scripts by name (flower-superexec, ...).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        RAY_DEDUP_LOGS="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, context: Any = None) -> None:
    """Wait until ``url`` answers 2xx (or raise ``TimeoutError`` / ``RunFailed`` if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RunFailed(f"process {proc.args[0]} exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if 200 <= r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> list[int]:
    """Stop ``proc``, its process group and every descendant (SIGTERM, then SIGKILL after ``grace`` s).

    Flower's daemons start helpers in process groups of their own (``flower-superlink`` ->
    ``flower-superexec`` -> ``flwr-serverapp``), so the descendants are collected first and
    stopped by pid as well.

    Returns:
        The pids of the descendants found when stopping started (for the caller's record).
    """
    try:
        descendants = [c for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for child in descendants:
        try:
            child.terminate()
        except psutil.Error:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)
    stop_all(descendants, grace)
    return [c.pid for c in descendants]


def stop_all(procs: Sequence[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s, each of ``procs`` (gone ones are skipped)."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def processes_with_home(home: Path) -> list[psutil.Process]:
    """Live processes whose ``FLWR_HOME`` is ``home`` (every Flower child inherits it, also one
    whose parent has already exited)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("FLWR_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def flwr_json(args: Sequence[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and parse its output.

    Raises:
        RunFailed: non-zero exit or unparsable output (stderr quoted).
    """
    res = subprocess.run([_bin("flwr"), *args, "--format", "json"], env=env, cwd=cwd, capture_output=True, text=True)
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise RunFailed(f"`flwr {' '.join(args)}` gave no JSON (exit {res.returncode}): {res.stdout[-2000:]} {res.stderr[-2000:]}") from e
    if res.returncode != 0 or out.get("success") is False:
        raise RunFailed(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): {json.dumps(out)[-2000:]}")
    return out


def run_flwr_app(connection: str, env: dict[str, str], cwd: Path, run_config: dict[str, str],
                 federation_config: dict[str, Any] | None, log_path: Path, poll_s: float = 10.0,
                 timeout_s: float = 7200.0, app_dir: Path | None = None, idle_poll_s: float = 30.0) -> int:
    """Submit this checkout (or ``app_dir``) as a Flower app on ``connection``, stream its log,
    check its status.

    Args:
        app_dir: the app folder ``flwr run`` builds the FAB from (its ``pyproject.toml`` names
            the components); ``None``: this checkout (``clients/``, ``server/``).
        poll_s: seconds between status checks (``flwr ls``) once the log stream has ended
            without the run finishing.
        idle_poll_s: seconds between status checks while the log stream runs (it ends when the
            run finishes, which triggers a check at once).

    Returns:
        The Flower run id.

    Raises:
        RunFailed: the run ended in a status other than ``finished:completed`` (log path named).
    """
    # The run config goes as a TOML file: `-c "k='v'"` cannot carry a value holding a quote (Flower
    # splits it with a regex that knows no escapes), e.g. the override federation.holdout='t1'.
    # json.dumps of a str is a valid TOML basic string (the same escapes, ASCII only).
    fd, name = tempfile.mkstemp(prefix="run-config-", suffix=".toml", dir=cwd)
    os.close(fd)
    rc = Path(name)
    rc.write_text("".join(f"{k} = {json.dumps(str(v))}\n" for k, v in run_config.items()))
    args = ["run", str(checkout_root() if app_dir is None else Path(app_dir).resolve()), connection, "-c", str(rc)]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
    try:
        run_id = int(flwr_json(args, env, cwd)["run-id"])
    finally:
        rc.unlink(missing_ok=True)  # read by `flwr run` before it returns
    print(f"[fedldt] Flower run {run_id} submitted; log: {log_path}", flush=True)
    streamer = subprocess.Popen([_bin("flwr"), "log", str(run_id), connection, "--stream"], env=env, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    progress = RunProgress("federated").__enter__()  # rounds from the ServerApp's progress lines
    t = threading.Thread(target=_tee, args=(streamer.stdout, log_path, progress.feed), daemon=True)
    t.start()
    deadline = time.monotonic() + timeout_s
    status = ""
    try:
        while time.monotonic() < deadline:
            runs = flwr_json(["ls", connection, "--run-id", str(run_id)], env, cwd).get("runs", [])
            status = str(runs[0].get("status", "")) if runs else ""
            if status.startswith("finished"):
                break
            # The SuperLink ends the log stream when the run finishes, so wait on the streamer and
            # ask for the status then, or every idle_poll_s as a safety net: each `flwr ls` is a new
            # Python process (about 1.4 s of CPU), which polling every 2 s made a third of a core.
            if streamer.poll() is None:
                try:
                    streamer.wait(timeout=max(0.0, min(idle_poll_s, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
            else:  # no stream (it failed or ended early): poll
                time.sleep(poll_s)
        else:
            raise RunFailed(f"Flower run {run_id} did not finish within {timeout_s:.0f}s (status '{status}')")
        try:
            streamer.wait(timeout=3.0)  # the stream ends with the run: its last lines are then read
        except subprocess.TimeoutExpired:
            pass
    finally:
        stop_process(streamer, grace=3.0)
        t.join(timeout=3.0)
        progress.__exit__(None, None, None)
    if status != "finished:completed":
        raise RunFailed(f"Flower run {run_id} ended with status '{status}'; see {log_path}")
    return run_id


def _tee(stream, log_path: Path, on_line: Callable[[str], object] | None = None) -> None:
    """Copy every line of ``stream`` to stdout and ``log_path`` (appended), and pass it to ``on_line``."""
    with open(log_path, "a") as f:
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            f.write(line)
            f.flush()
            if on_line is not None:
                on_line(line)


def check_gpu_share(client_gpus: float) -> None:
    """Refuse ``federation.client_gpus`` > 0 where torch sees no CUDA device.

    Raises:
        ConfigError: names the key, its value and the fix.
    """
    if client_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"federation.client_gpus={client_gpus:g} but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False): the territories could never be placed; "
                              "set federation.client_gpus=0")


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Check that a Ray cluster's head answers at ``address`` (``host:port``) before anything
    starts: Ray itself would retry for minutes and the run would wait until its timeout.

    Raises:
        ConfigError: nothing accepts a TCP connection there within ``timeout`` s (the address and
            the fix named).
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"federation.ray_address={address}: no Ray cluster head answers there ({type(e).__name__}); "
                          "start one (ray start --head --port=<port>) or fix the address, or set "
                          "federation.ray_address=null for a Ray instance of the run's own") from None


def run_simulation(overrides: Sequence[str], run_dir: Path, num_supernodes: int, client_cpus: int = 1,
                   client_gpus: float = 0.0, ray_address: str | None = None,
                   app_dir: Path | None = None, timeout_s: float = 7200.0) -> dict[str, Any]:
    """Run a pilot on the simulation engine with one SuperNode per territory.

    Args:
        overrides: Hydra overrides that select the pilot (``hydra.*`` ones are dropped, but for
            ``hydra.searchpath``: see :func:`fedldt.config.composable_overrides`).
        run_dir: absolute results folder; logs go to ``run_dir/logs``.
        num_supernodes: simulated SuperNodes (= territories).
        client_cpus: CPU cores Ray reserves per client.
        client_gpus: GPU share Ray reserves per client (0: none; the client's ``train.device=auto``
            then trains on the CPU).
        ray_address: ``federation.ray_address``: an existing Ray cluster (``host:port`` of its
            head, as ``ray start --head`` prints it) that runs the territories' ClientApps instead of a
            Ray instance started for this run. Flower's simulation engine calls ``ray.init()``, which
            connects to ``RAY_ADDRESS`` (Ray's documented variable); the cluster's own CPUs and GPUs
            then count, so no ``num_cpus`` is passed and the local GPU check is skipped.
        app_dir: the Flower app folder to submit (:func:`run_flwr_app`); ``None``: this checkout.
            Only callers in code pass another one (a test app with test-only mods,
            ``tests/apps.py``; ``scripts/poisoning.py``), never a config value.
        timeout_s: seconds the submitted run may take (:func:`run_flwr_app`); past them the run
            fails with :class:`RunFailed` and every process started is stopped
            (``scripts/bench_scale.py``'s per-case limit).

    Returns:
        The run's ``summary.json`` content.

    Raises:
        RunFailed: the SuperLink did not start, the run failed or ran past ``timeout_s`` (log
            paths named).
        ConfigError: ``client_gpus`` > 0 where this machine has no CUDA device (Ray would wait for
            ever for a GPU to place the territories on), or no Ray head answers at ``ray_address``
            (:func:`check_ray_address`), before anything starts.
    """
    if ray_address is None:
        check_gpu_share(client_gpus)  # with a cluster, the GPUs may be on its other machines
    else:
        check_ray_address(ray_address)
    run_dir = Path(run_dir).resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="fedldt-flwr-"))
    env = flwr_env(home)
    env.pop("RAY_ADDRESS", None)  # a cluster only where the config names one, never from the caller's shell
    resources = {"num-supernodes": int(num_supernodes), "client-resources-num-cpus": int(client_cpus),
                 "client-resources-num-gpus": float(client_gpus)}
    if ray_address is None:
        resources["init-args-num-cpus"] = max(os.cpu_count() or 1, int(client_cpus))
    else:
        env["RAY_ADDRESS"] = ray_address
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    link_log = open(logs / "superlink.log", "a")  # a resumed run (resume=) appends
    link = subprocess.Popen(
        [_bin("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
        env=env, cwd=home, stdout=link_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=link)
        ov = json.dumps(composable_overrides(overrides))  # hydra.searchpath (the user's config folders) travels
        run_flwr_app(
            "sim", env, home, {"hydra-overrides": ov, "run-dir": str(run_dir)}, resources,
            logs / "server.log", app_dir=app_dir, timeout_s=timeout_s,
        )
    finally:
        stop_process(link)
        stop_all(processes_with_home(home))  # helpers whose parent exited first (orphans)
        link_log.close()
        shutil.rmtree(home, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RunFailed(f"the run finished but wrote no {summary_path}; see {logs}")
    return json.loads(summary_path.read_text())
