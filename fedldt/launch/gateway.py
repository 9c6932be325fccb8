"""Fleet-only gateway: the one door territories have into the coordinator's SuperLink.

Flower 1.42's open-source SuperLink serves every API on one HTTPS port: the Fleet API its
SuperNodes use (``/v1/fleet/*``), but also the Control API (``/v1/control/*``: ``flwr run``,
``flwr ls``, ``flwr supernode register`` ...), the ServerApp runtime API (``/v1/runtime/*``)
and ``/docs``. Its Control API has no authentication (``NoOpControlAuthnPlugin``; OIDC is
Flower Enterprise), so anyone who can reach that port with the public ``ca.crt`` can register
a SuperNode key of their own, list runs and submit runs.

fedldt therefore binds the SuperLink to the coordinator's loopback only (``--host 127.0.0.1``)
and puts this gateway on the public interface. It is a TLS reverse proxy (starlette + uvicorn
for the server side, httpx for the upstream side) that:

* forwards only ``POST /v1/fleet/<call>`` for the calls an *authenticated* SuperNode makes
  (:data:`FLEET_CALLS`: activate, heartbeat, pull/push messages and objects, run and FAB
  download, confirm, deactivate) and ``GET``/``HEAD /health``; Fleet ``register-node`` and
  ``unregister-node`` (only used by SuperNodes *without* authentication keys) are not forwarded
  but answered as the SuperLink answers them under ``--enable-supernode-auth`` (412, "must be
  registered via the CLI");
* answers everything else (another path or method, a query string, ``/v1/control/*``,
  ``/v1/runtime/*``, ``/docs``, percent-encoded tricks) with ``403`` and an empty body;
* refuses request bodies over ``max_body_bytes`` with ``413`` (default 64 MiB; Flower sends
  arrays in chunks of at most 5 MiB): a declared ``Content-Length`` is checked before anything
  is forwarded, a chunked body is counted while it streams to the SuperLink (the gateway never
  holds a whole body in memory) and the upstream call is aborted at the cap;
* passes the request headers and body through unchanged (the SuperLink checks each SuperNode's
  signed-timestamp headers itself; hop-by-hop headers and ``Host`` are not forwarded) and
  streams the response back unchanged;
* verifies the SuperLink's TLS certificate with the federation's CA (the SuperLink certificate
  must name the address the gateway dials, ``127.0.0.1`` by default).

Command line (coordinator, with the SuperLink on ``127.0.0.1:9091``)::

    fedldt gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:9091 \\
        --ca pki/ca.crt --cert pki/server.pem --key pki/server.key
    # or: python -m fedldt.launch.gateway --listen ... (the same options)

Refused requests are logged (client address, method, path) at WARNING on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("fedldt.gateway")

#: Fleet API calls an authenticated Flower 1.42 SuperNode makes (``flwr/supernode/fleet_http_client.py``
#: minus ``register-node`` / ``unregister-node``, which only self-registering SuperNodes use and
#: which the SuperLink refuses anyway under ``--enable-supernode-auth``).
FLEET_CALLS = frozenset({
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages", "push-messages", "get-run",
    "get-fab", "push-object", "pull-object", "confirm-message-received",
})

#: ``(method, path)`` pairs forwarded to the SuperLink; anything else gets 403.
ALLOWED = frozenset({("POST", f"/v1/fleet/{c}") for c in FLEET_CALLS} | {("GET", "/health"), ("HEAD", "/health")})

#: Fleet calls of SuperNodes *without* an authentication key. Not forwarded: the gateway answers
#: them itself exactly as a SuperLink with ``--enable-supernode-auth`` does (HTTP 412, Flower error
#: codes 2001/2002 and their public messages), so such a SuperNode exits with Flower's own
#: "must be registered via the CLI" instead of treating a 403 as "run not running" and hanging.
SELF_REGISTRATION_REFUSALS = {
    "/v1/fleet/register-node": (2001, "SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."),
    "/v1/fleet/unregister-node": (2002, "SuperNode authentication is enabled. All SuperNodes must be unregistered via the CLI."),
}

#: Default cap on a request body (bytes).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

#: Headers that describe one hop, not the message (RFC 9110 7.6.1), plus ``host`` (the upstream's
#: own) and ``content-length`` (recomputed from the forwarded body).
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
_NOT_FORWARDED_UP = _HOP_BY_HOP | {b"host", b"content-length"}


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> ``(host, port)``.

    Raises:
        ValueError: no port, or a port outside 1..65535 (the message names ``what``).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}={text!r}: expected HOST:PORT, e.g. 127.0.0.1:9091 or [::1]:9091")
    return host.strip("[]"), int(port)


class _TooLarge(Exception):
    """A request body passed the gateway's cap while it was being forwarded."""


class _Proxy:
    """The ASGI endpoint behind the catch-all route (every method reaches it)."""

    def __init__(self, upstream: str, ca_cert: Path, max_body_bytes: int, timeout: float) -> None:
        self.upstream = upstream
        self.ca_cert = Path(ca_cert)
        self.max_body_bytes = int(max_body_bytes)
        self.timeout = float(timeout)
        self.client: httpx.AsyncClient | None = None

    def open(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))  # hostname checked against the SAN
        self.client = httpx.AsyncClient(
            verify=ctx, trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(self.timeout, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        response = await self._answer(request)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        if method == "POST" and path in SELF_REGISTRATION_REFUSALS:
            code, message = SELF_REGISTRATION_REFUSALS[path]
            _refuse(request, 412, "SuperNode self-registration")
            return JSONResponse({"code": code, "detail": message}, status_code=412)
        if (method, path) not in ALLOWED or request.scope.get("query_string"):
            return _refuse(request, 403, "not a Fleet call")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return _refuse(request, 413, f"content-length {declared[:20]!r} over {self.max_body_bytes}")
        assert self.client is not None, "gateway started without its lifespan"
        # The body is streamed to the SuperLink as it arrives (the gateway never holds a whole
        # body), counting bytes: a chunked body that passes the cap aborts the upstream call.
        cap = self.max_body_bytes

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > cap:
                    raise _TooLarge
                yield chunk

        keep = _NOT_FORWARDED_UP - ({b"content-length"} if declared is not None else set())
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in keep]
        upstream = self.client.build_request(method, self.upstream + path, headers=headers,
                                             content=body() if method == "POST" else None)
        try:
            reply = await self.client.send(upstream, stream=True)
        except _TooLarge:
            return _refuse(request, 413, f"body over {self.max_body_bytes} bytes")
        except ClientDisconnect:
            return Response(status_code=400)
        except httpx.HTTPError as e:
            log.error("SuperLink %s unreachable for %s %s: %s", self.upstream, method, path, type(e).__name__)
            return Response(status_code=502)
        out = StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, background=BackgroundTask(reply.aclose))
        out.raw_headers = [(k, v) for k, v in reply.headers.raw if k.lower() not in _HOP_BY_HOP]
        return out


def _refuse(request: Request, status: int, why: str) -> Response:
    client = request.client.host if request.client else "?"
    log.warning("refused %s %r from %s: %d (%s)", request.method[:16], request.url.path[:200], client, status, why)
    return Response(status_code=status)


def create_app(superlink: str, ca_cert: Path, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               timeout: float = 120.0) -> Starlette:
    """The gateway as an ASGI app (serve it with TLS, see :func:`serve`).

    Args:
        superlink: the SuperLink's ``HOST:PORT`` (HTTPS), normally ``127.0.0.1:<internal port>``.
        ca_cert: PEM CA certificate that signed the SuperLink's certificate.
        max_body_bytes: largest request body forwarded; larger ones get 413.
        timeout: seconds to wait for the SuperLink's answer to one call.

    Raises:
        ValueError: ``superlink`` is not ``HOST:PORT`` or ``max_body_bytes`` < 1.
        FileNotFoundError: ``ca_cert`` does not exist.
    """
    host, port = parse_address(superlink, "--superlink")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1")
    if not Path(ca_cert).is_file():
        raise FileNotFoundError(f"--ca {ca_cert}: no such file (the federation's ca.crt)")
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    proxy = _Proxy(f"https://{netloc}", Path(ca_cert), max_body_bytes, timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        proxy.open()
        try:
            yield
        finally:
            await proxy.close()

    # An ASGI endpoint (not a function) with methods=None: every method and path reaches _Proxy,
    # which refuses what is not allowed with 403 (instead of starlette's 404/405 answers).
    return Starlette(routes=[Route("/{path:path}", proxy)], lifespan=lifespan)


def serve(listen: str, superlink: str, ca_cert: Path, cert: Path, key: Path, *,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, timeout: float = 120.0, limit_concurrency: int = 512) -> None:
    """Run the gateway with uvicorn over TLS until SIGINT/SIGTERM.

    Args:
        listen: ``HOST:PORT`` territories dial (e.g. ``0.0.0.0:9092``).
        superlink: the SuperLink's ``HOST:PORT``.
        ca_cert: the federation's ``ca.crt``.
        cert: TLS certificate the gateway presents (the SuperLink's ``server.pem`` does: its SAN
            must list the address territories dial).
        key: its private key (``server.key``).
        max_body_bytes: largest request body forwarded (413 beyond).
        timeout: seconds to wait for the SuperLink per call.
        limit_concurrency: connections served at once (503 beyond).

    Raises:
        ValueError: a bad address.
        FileNotFoundError: a certificate or key file is missing.
    """
    import uvicorn

    host, port = parse_address(listen, "--listen")
    for flag, f in (("--cert", cert), ("--key", key)):
        if not Path(f).is_file():
            raise FileNotFoundError(f"{flag} {f}: no such file")
    app = create_app(superlink, ca_cert, max_body_bytes=max_body_bytes, timeout=timeout)
    uvicorn.run(app, host=host, port=port, ssl_certfile=str(cert), ssl_keyfile=str(key), log_level="warning",
                access_log=False, proxy_headers=False, server_header=False, date_header=False,
                limit_concurrency=limit_concurrency, timeout_keep_alive=30)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The gateway's options (shared by ``fedldt gateway`` and ``python -m fedldt.launch.gateway``)."""
    p.add_argument("--listen", required=True, help="HOST:PORT territories dial, e.g. 0.0.0.0:9092")
    p.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT, e.g. 127.0.0.1:9091")
    p.add_argument("--ca", required=True, type=Path, help="the federation's ca.crt (verifies the SuperLink)")
    p.add_argument("--cert", required=True, type=Path, help="TLS certificate to present (server.pem)")
    p.add_argument("--key", required=True, type=Path, help="its private key (server.key)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                   help="largest request body forwarded, MiB (default 64)")
    return p


def run(args: argparse.Namespace) -> int:
    """Serve with parsed :func:`add_arguments` options; returns the exit status (1 on bad options)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per forwarded heartbeat
    try:
        serve(args.listen, args.superlink, args.ca, args.cert, args.key,
              max_body_bytes=int(args.max_body_mb * 2**20))
    except (ValueError, FileNotFoundError) as e:
        print(f"fedldt gateway: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedldt.launch.gateway``."""
    p = argparse.ArgumentParser(prog="python -m fedldt.launch.gateway",
                                description="Fleet-only TLS gateway in front of a loopback-bound SuperLink.")
    return run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
