"""A real federation on one machine: a SuperLink and one SuperNode per territory over loopback.

Unlike the simulation engine (:mod:`fedldt.launch.simulation`), every territory here is its own
``flower-supernode`` process talking to the coordinator over TLS, authenticated by its own
ECDSA key, exactly as in a multi-machine deployment (``docs/deploy.md``) but with every
address on 127.0.0.1. :class:`LocalFederation`:

1. creates a CA, the SuperLink certificate (SAN ``IP:127.0.0.1``) and one key pair per
   territory (:mod:`fedldt.launch.certs`) in a private work folder;
2. starts ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and runtime dependency
   installation disabled, on a free loopback port: the *internal* port, which only the
   operator's ``flwr`` CLI uses (Control API: register keys, submit and list runs);
3. starts the Fleet-only gateway (:mod:`fedldt.launch.gateway`) on a second port, the
   *public* one: it forwards only the Fleet calls of authenticated SuperNodes to the SuperLink
   and refuses the Control and runtime APIs (403);
4. registers each territory's public key (``flwr supernode register``, on the internal port);
5. starts one ``flower-supernode`` per territory, dialling the gateway, with its own runtime
   ``--port`` and node config ``territory=<i> data-root="..." out-dir="<run_dir>/territories/territory-<i>"``
   (or ``data-path="<its own package>"`` instead of ``data-root``, see ``data_paths``),
   and waits until the SuperLink lists every node as online;
6. :meth:`LocalFederation.run` submits the pilot with ``flwr run``, streams its log, checks
   that it *finished:completed* and returns ``summary.json``;
7. :meth:`LocalFederation.stop` stops every process it started (process groups and every
   descendant, by pid), also on error, Ctrl-C or SIGTERM (use it as a context manager), and
   writes ``logs/processes.json``.

Logs (``<run_dir>/logs/``): ``superlink.log``, ``gateway.log`` (refused requests),
``supernode-<i>.log``, ``server.log`` (the ServerApp, via ``flwr log``), ``processes.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil

from fedldt.config import composable_overrides
from fedldt.launch.certs import ServerPKI, make_server_pki, make_territory_key
from fedldt.launch.simulation import (RunFailed, _bin, flwr_env, flwr_json, free_port, processes_with_home, run_flwr_app,
                                      stop_all, stop_process, wait_http)
from fedldt.results import check_run_dir

#: Name of the CLI connection (in the private ``FLWR_HOME/config.toml``).
CONNECTION = "fedldt-local"


def node_config_arg(values: Mapping[str, Any]) -> str:
    """``--node-config`` text: space-separated TOML ``key=value`` pairs (strings quoted).

    Raises:
        ValueError: a string contains a space or a quote (Flower splits the text on spaces).
    """
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            v = str(v)
            if any(c in v for c in ' "\'\\'):
                raise ValueError(f"node config {k}={v!r}: paths and values may not contain spaces, quotes or backslashes")
            parts.append(f'{k}="{v}"')
    return " ".join(parts)


@dataclass
class Territory:
    """One territory's SuperNode in a :class:`LocalFederation`."""

    index: int
    key: Path  # private key (OpenSSH, NIST P-384)
    public_key: Path
    port: int  # the SuperNode's runtime API port (unique per host)
    node_config: dict[str, Any]
    home: Path  # the SuperNode's FLWR_HOME
    log: Path
    node_id: int | None = None  # assigned by the SuperLink at registration
    proc: subprocess.Popen | None = field(default=None, repr=False)



def _sigkill(proc: subprocess.Popen, helpers: list[psutil.Process]) -> None:
    """SIGKILL ``proc``'s process group and ``helpers`` (processes it started that may have left the
    group), as a crash would; then reap ``proc`` (at most 10 s)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in helpers:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=10.0)

class LocalFederation:
    """SuperLink + Fleet-only gateway + one SuperNode per territory on 127.0.0.1, with TLS and
    SuperNode authentication.

    Attributes (after :meth:`start`): ``port`` is the SuperLink's internal port (operator only),
    ``gateway_port`` the public port SuperNodes dial, ``pki`` the CA and server files,
    ``territories`` the SuperNodes.

    Args:
        run_dir: results folder (absolute or relative to the working directory); logs go to
            ``run_dir/logs``, each territory's output folder is ``run_dir/territories/territory-<i>``.
        num_territories: SuperNodes to start (territories ``0..num_territories-1``).
        data_root: folder of datasets every territory's node config names as ``data-root``
            (``None``: the territories use the path the server sends).
        data_paths: instead of ``data_root``, one folder per territory (index order) that its
            node config names as ``data-path``: its own territory data package (a folder holding
            ``territory.yaml``) or its own dataset folder, so no territory sees another's data.
        node_config: extra node config per territory index, e.g. ``{1: {"data-path": "/srv/x"}}``
            (keys read by a test app's mods go here too).
        startup_timeout: seconds to wait for the SuperLink and for every SuperNode to be online.

    Use as a context manager: ``with LocalFederation(dir, 3) as fed: summary = fed.run([...])``.
    """

    def __init__(self, run_dir: Path, num_territories: int, *, data_root: Path | None = None,
                 data_paths: Sequence[Path] | None = None, node_config: Mapping[int, Mapping[str, Any]] | None = None,
                 startup_timeout: float = 120.0) -> None:
        if num_territories < 1:
            raise ValueError(f"num_territories={num_territories} must be >= 1")
        if data_paths is not None and (data_root is not None or len(data_paths) != num_territories):
            raise ValueError(f"data_paths: give one folder per territory ({num_territories}, got {len(data_paths)}) and "
                             "no data_root (each territory's data-path replaces it)")
        self.data_paths = None if data_paths is None else [Path(p).resolve() for p in data_paths]
        self.run_dir = Path(run_dir).resolve()
        self.logs = self.run_dir / "logs"
        self.num_territories = int(num_territories)
        self.data_root = None if data_root is None else Path(data_root).resolve()
        self.extra_node_config = {int(k): dict(v) for k, v in (node_config or {}).items()}
        self.startup_timeout = float(startup_timeout)
        self.work: Path | None = None
        self.pki: ServerPKI | None = None
        self.port: int | None = None  # the SuperLink (internal: the operator's flwr CLI)
        self.gateway_port: int | None = None  # the Fleet-only gateway (public: SuperNodes)
        self.territories: list[Territory] = []
        self._procs: list[tuple[str, subprocess.Popen]] = []  # everything started, in order
        self._log_files: list[Any] = []
        self._cli_env: dict[str, str] = {}
        self.stopped: dict[str, Any] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "LocalFederation":
        """Make certificates and keys, start the SuperLink, register and start every SuperNode.

        Raises:
            RunFailed: the SuperLink or a SuperNode did not come up (its log is named).
        """
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="fedldt-deploy-"))
        self.pki = make_server_pki(self.work / "pki", san=["127.0.0.1"])
        self.port = free_port()
        self._start_superlink()
        self.gateway_port = free_port()
        self._start_gateway()
        cli_home = self.work / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.pki.ca_cert}"\n'
        )
        self._cli_env = flwr_env(cli_home)
        for i in range(self.num_territories):
            key, pub = make_territory_key(self.work / "keys" / f"territory-{i}")
            out_dir = self.run_dir / "territories" / f"territory-{i}"
            out_dir.mkdir(parents=True, exist_ok=True)
            nc: dict[str, Any] = {"territory": i}
            if self.data_root is not None:
                nc["data-root"] = str(self.data_root)
            if self.data_paths is not None:
                nc["data-path"] = str(self.data_paths[i])
            nc["out-dir"] = str(out_dir)
            nc.update(self.extra_node_config.get(i, {}))
            t = Territory(index=i, key=key, public_key=pub, port=free_port(), node_config=nc,
                          home=self.work / f"home-territory-{i}", log=self.logs / f"supernode-{i}.log")
            t.node_id = self.register(pub)
            self.territories.append(t)
        for t in self.territories:
            self.start_territory(t.index)
        self.wait_online([t.node_id for t in self.territories], self.startup_timeout)
        print(f"[fedldt] SuperLink https://127.0.0.1:{self.port} (TLS, SuperNode auth; operator only), Fleet gateway "
              f"https://127.0.0.1:{self.gateway_port}; {self.num_territories} SuperNodes online on runtime ports "
              f"{[t.port for t in self.territories]}; logs: {self.logs}", flush=True)
        return self

    def _popen(self, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        f = open(log, "a")
        self._log_files.append(f)
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append((name, proc))
        return proc

    def _start_superlink(self) -> None:
        assert self.work is not None and self.pki is not None and self.port is not None
        home = self.work / "home-superlink"
        home.mkdir(exist_ok=True)  # kept across restart_superlink()
        proc = self._popen(
            "superlink",
            [_bin("flower-superlink"), "--ssl-ca-certfile", str(self.pki.ca_cert), "--ssl-certfile", str(self.pki.server_cert),
             "--ssl-keyfile", str(self.pki.server_key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.work / "state.db")],
            flwr_env(home), self.logs / "superlink.log", self.work,
        )
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        try:
            wait_http(f"https://127.0.0.1:{self.port}/health", timeout=self.startup_timeout, proc=proc, context=ctx)
        except (TimeoutError, RunFailed) as e:
            raise RunFailed(f"the SuperLink did not start: {e}; see {self.logs / 'superlink.log'}") from e

    def _start_gateway(self) -> None:
        assert self.work is not None and self.pki is not None and self.gateway_port is not None
        proc = self._popen(
            "gateway",
            [sys.executable, "-m", "fedldt.launch.gateway", "--listen", f"127.0.0.1:{self.gateway_port}",
             "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.pki.ca_cert), "--cert", str(self.pki.server_cert),
             "--key", str(self.pki.server_key)],
            flwr_env(self.work / "home-gateway"), self.logs / "gateway.log", self.work,
        )
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        try:  # /health through the gateway: gateway up, and it reaches the SuperLink
            wait_http(f"https://127.0.0.1:{self.gateway_port}/health", timeout=self.startup_timeout, proc=proc, context=ctx)
        except (TimeoutError, RunFailed) as e:
            raise RunFailed(f"the Fleet gateway did not start: {e}; see {self.logs / 'gateway.log'}") from e

    def kill_superlink(self) -> None:
        """Kill the SuperLink with SIGKILL, as a crash would: its process group and every
        descendant (the ServerApp of a run in progress dies with it). Its database file stays,
        so :meth:`restart_superlink` keeps the registered territories; the gateway and the
        SuperNodes keep running and retry."""
        procs = [p for name, p in self._procs if name == "superlink" and p.poll() is None]
        for proc in procs:
            try:
                helpers = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                helpers = []
            _sigkill(proc, helpers)

    def restart_superlink(self) -> None:
        """Start the SuperLink again (after :meth:`kill_superlink`) on the same port with the same
        database and certificates, and wait until every territory's SuperNode is online again.

        Raises:
            RuntimeError: the SuperLink is still running.
            RunFailed: it did not start, or the SuperNodes did not come back within ``startup_timeout``.
        """
        if any(name == "superlink" and p.poll() is None for name, p in self._procs):
            raise RuntimeError("the SuperLink is still running; kill_superlink() first")
        self._start_superlink()
        self.wait_online([t.node_id for t in self.territories], self.startup_timeout)

    def register(self, public_key: Path) -> int:
        """Register a territory's public key on the SuperLink (``flwr supernode register``).

        Returns:
            The node id the SuperLink assigned (stable across SuperNode restarts).

        Raises:
            RunFailed: the CLI refused (e.g. the key is already registered).
        """
        out = flwr_json(["supernode", "register", str(public_key), CONNECTION], self._cli_env, self._require_work())
        return int(out["node-id"])

    def supernodes(self) -> dict[int, str]:
        """Node id -> status (``registered``, ``online``, ``offline``...) as the SuperLink lists them."""
        out = flwr_json(["supernode", "ls", CONNECTION], self._cli_env, self._require_work())
        return {int(n["node-id"]): str(n["status"]) for n in out.get("nodes", [])}

    def runs(self) -> dict[int, str]:
        """Run id -> status (``finished:completed``, ...) as the SuperLink lists them (``flwr ls``)."""
        out = flwr_json(["ls", CONNECTION], self._cli_env, self._require_work())
        return {int(r["run-id"]): str(r["status"]) for r in out.get("runs", [])}

    def start_supernode(self, *, key: Path | None, port: int, node_config: Mapping[str, Any], home: Path, log: Path,
                        tls: bool = True, max_retries: int | None = None, name: str = "supernode") -> subprocess.Popen:
        """Start one ``flower-supernode`` against this federation's gateway (also used to test refusals).

        Args:
            key: private authentication key (``None``: start without one).
            port: runtime API port (unique per host).
            node_config: its ``--node-config`` values.
            home: its ``FLWR_HOME``.
            log: file for its stdout/stderr.
            tls: verify the SuperLink with the CA (``False``: ``--insecure``, plain HTTP).
            max_retries: connection attempts before it gives up (``None``: Flower's default, forever).
            name: label in ``processes.json``.
        """
        assert self.pki is not None and self.gateway_port is not None
        home.mkdir(parents=True, exist_ok=True)
        args = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.gateway_port}", "--port", str(port),
                "--node-config", node_config_arg(node_config)]
        args += ["--root-certificates", str(self.pki.ca_cert)] if tls else ["--insecure"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        return self._popen(name, args, flwr_env(home), log, self._require_work())

    def start_territory(self, index: int, wait: bool = False, timeout: float | None = None) -> subprocess.Popen:
        """(Re)start territory ``index``'s SuperNode with its key, port and node config.

        Args:
            index: territory index.
            wait: wait until the SuperLink lists it online. A SuperNode that crashed (SIGKILL)
                stays *online* on the SuperLink until its heartbeat expires (2 x 30 s), and a
                new SuperNode with the same key is refused meanwhile (Flower exit code 305,
                "Failed to activate SuperNode"); with ``wait`` the SuperNode is started again
                every 5 s until it is admitted, as a service manager would.
            timeout: seconds for ``wait`` (default ``startup_timeout``).

        Raises:
            RuntimeError: its SuperNode is still running.
            RunFailed: ``wait`` and it was not online within ``timeout``.
        """
        t = self.territories[index]
        if t.proc is not None and t.proc.poll() is None:
            raise RuntimeError(f"territory {index}'s SuperNode is still running (pid {t.proc.pid})")
        t.proc = self.start_supernode(key=t.key, port=t.port, node_config=t.node_config, home=t.home, log=t.log,
                                      name=f"supernode-{index}")
        if not wait:
            return t.proc
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if t.proc.poll() is not None:  # refused: try again shortly
                stop_all(processes_with_home(t.home))  # its orphaned helpers (flower-superexec)
                time.sleep(5.0)
                t.proc = self.start_supernode(key=t.key, port=t.port, node_config=t.node_config, home=t.home, log=t.log,
                                              name=f"supernode-{index}")
            elif self.supernodes().get(int(t.node_id or 0)) == "online":
                return t.proc
            time.sleep(1.0)
        raise RunFailed(f"territory {index}'s SuperNode was not admitted within the timeout; see {t.log}:\n" + _tail(t.log))

    def kill_territory(self, index: int, hard: bool = False) -> None:
        """Stop territory ``index``'s SuperNode and its helper processes.

        Args:
            index: territory index.
            hard: SIGKILL, as a crash would (the SuperLink then keeps the node online until
                its heartbeat expires); otherwise SIGTERM, after which the SuperNode tells the
                SuperLink it is leaving.
        """
        t = self.territories[index]
        if t.proc is None or t.proc.poll() is not None:
            return
        if not hard:
            stop_process(t.proc, grace=10.0)
            return
        _sigkill(t.proc, processes_with_home(t.home))

    def wait_online(self, node_ids: Sequence[int | None], timeout: float) -> None:
        """Wait until the SuperLink lists every node in ``node_ids`` as online.

        Raises:
            RunFailed: a SuperNode exited, or not all were online within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        status: dict[int, str] = {}
        while time.monotonic() < deadline:
            for t in self.territories:
                if t.node_id in node_ids and t.proc is not None and t.proc.poll() is not None:
                    raise RunFailed(f"territory {t.index}'s SuperNode exited with code {t.proc.returncode}; see {t.log}:\n"
                                    + _tail(t.log))
            status = self.supernodes()
            if all(status.get(int(n)) == "online" for n in node_ids if n is not None):
                return
            time.sleep(1.0)
        raise RunFailed(f"SuperNodes not online within {timeout:.0f}s: {status}; see {self.logs}")

    def run(self, overrides: Sequence[str], run_dir: Path | None = None, timeout_s: float = 7200.0,
            app_dir: Path | None = None) -> dict[str, Any]:
        """Run a pilot on this federation (``flwr run``) and return its ``summary.json``.

        Args:
            overrides: Hydra overrides that select the pilot (``hydra.*`` ones are dropped, but for
                ``hydra.searchpath``: see :func:`fedldt.config.composable_overrides`).
            run_dir: where the ServerApp writes results (default: this federation's ``run_dir``).
            timeout_s: give up after this many seconds.
            app_dir: the Flower app to submit (``None``: this checkout's; a test submits an app
                with test-only mods, see ``tests/apps.py``).

        Raises:
            RunFailed: the run ended other than *finished:completed* (``logs/server.log`` holds
                the ServerApp's error), or wrote no ``summary.json``.
        """
        run_dir = self.run_dir if run_dir is None else Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        check_run_dir(run_dir)  # before the run: never overwrite what fedldt did not write
        ov = json.dumps(composable_overrides(overrides))  # hydra.searchpath (the user's config folders) travels
        run_flwr_app(CONNECTION, self._cli_env, self._require_work(), {"hydra-overrides": ov, "run-dir": str(run_dir)},
                     None, self.logs / "server.log", timeout_s=timeout_s, app_dir=app_dir)
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            raise RunFailed(f"the run finished but wrote no {summary_path}; see {self.logs}")
        return json.loads(summary_path.read_text())

    def stop(self) -> dict[str, Any]:
        """Stop every process started here (SuperNodes first, then the SuperLink), each with its
        process group and descendants; check that none is left; write ``logs/processes.json``;
        delete the private work folder (keys, certificates, Flower homes). Idempotent.

        Returns:
            The record written to ``processes.json``: ``started`` (name, pid, args, exit code,
            descendant pids), ``orphans_stopped`` (helpers found by their ``FLWR_HOME`` after
            their parent had exited) and ``left_over`` (processes still alive afterwards; should
            be empty).
        """
        if self.stopped is not None:
            return self.stopped
        started = []
        # SuperNodes first (they say goodbye through the gateway), then the gateway, the SuperLink last.
        for name, proc in sorted(self._procs, key=lambda np: {"gateway": 1, "superlink": 2}.get(np[0], 0)):
            desc = stop_process(proc, grace=10.0)
            started.append({"name": name, "pid": proc.pid, "args": [str(a) for a in proc.args], "returncode": proc.returncode,
                            "descendants": desc})
        for f in self._log_files:
            f.close()
        # Helpers whose parent already exited (e.g. the flower-superexec of a refused SuperNode)
        # are no longer anyone's descendants; they still carry this federation's FLWR_HOME.
        orphans = self.leftovers(started)
        stop_all(orphans)
        left = self.leftovers(started)
        record = {"work_dir": str(self.work) if self.work else None, "started": started,
                  "orphans_stopped": [p.pid for p in orphans],
                  "left_over": [{"pid": p.pid, "cmdline": _cmdline(p)} for p in left]}
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / "processes.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        self.stopped = record
        if left:
            print(f"[fedldt] WARNING: processes left after stopping the federation: {record['left_over']}", flush=True)
        return record

    def leftovers(self, started: Sequence[Mapping[str, Any]] | None = None) -> list[psutil.Process]:
        """Live processes that belong to this federation: any pid started here or found as a
        descendant, and any process whose environment points into the private work folder
        (every Flower child inherits its ``FLWR_HOME``)."""
        pids = {p.pid for _, p in self._procs}
        for s in started or []:
            pids.update(s["descendants"])
        marker = str(self.work) if self.work else None
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                ours = p.pid in pids and any(w in _cmdline(p) for w in ("flower-", "flwr", "fedldt.launch.gateway"))
                if ours or (marker and any(marker in v for v in p.environ().values())):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def _require_work(self) -> Path:
        if self.work is None:
            raise RuntimeError("LocalFederation.start() has not run")
        return self.work


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return "?"


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
