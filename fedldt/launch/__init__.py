"""Everything of fedldt that starts processes (the only package that may, ``tests/test_layout.py``).

* :mod:`fedldt.launch.simulation` — ``flwr run`` on the simulation engine (``run_simulation``),
  Flower's environment and binaries, ``interruptible`` (SIGTERM/SIGINT stop every process started).
* :mod:`fedldt.launch.loopback` — :class:`~fedldt.launch.loopback.LocalFederation`: a SuperLink,
  the gateway and one SuperNode per territory as separate processes on this machine.
* :mod:`fedldt.launch.gateway` — the coordinator's Fleet-only gateway (``fedldt gateway``).
* :mod:`fedldt.launch.certs` — the federation's CA, server certificate and territory keys
  (``fedldt certs``).
"""
