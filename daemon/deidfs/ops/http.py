"""The metrics HTTP endpoint: ``/metrics``, ``/-/healthy``, ``/-/ready`` and a landing page.

A small WSGI router around :func:`prometheus_client.make_wsgi_app`, served by a threaded
WSGI server in a daemon thread. Unlike ``prometheus_client.start_http_server`` it answers
404 for unknown paths, and it binds in the caller's thread, so an address in use fails the
daemon's start before systemd is told it is ready. Requests are not logged: a scrape every
15 s would fill the journal.

``/-/healthy`` answers 200 while the process serves HTTP; ``/-/ready`` 200 only while the
daemon says it is ready (mounted, observers started), else 503 (Prometheus' own paths).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app

from deidfs.errors import DeidfsError

log = logging.getLogger(__name__)

#: A header, not a header list: wsgiref appends Content-Length to the list it is given, so
#: every response gets a fresh list.
_TEXT = ("Content-Type", "text/plain; charset=utf-8")
_LANDING = b"""<!doctype html>
<html><head><title>deidfs</title></head>
<body><h1>deidfs</h1>
<p><a href="/metrics">Metrics</a> | <a href="/-/healthy">Healthy</a> |
<a href="/-/ready">Ready</a></p></body></html>
"""


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` -> (host, port).

    Raises
    ------
    ValueError
        Not ``host:port`` with a port in 0-65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _QuietHandler(WSGIRequestHandler):
    """No access log; errors of the WSGI app still reach the log through the server."""

    def log_message(self, format: str, *args: object) -> None:
        return


class _Server(ThreadingMixIn, WSGIServer):
    # One short-lived thread per request; they must not keep the process alive at exit.
    daemon_threads = True


def make_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> WSGIApplication:
    """The WSGI application: metrics of ``registry``, health, readiness and a landing page."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            out: Iterable[bytes] = metrics_app(environ, start_response)
            return out
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [_TEXT, ("Allow", "GET, HEAD")])
            return [b"method not allowed\n"]
        if path == "/-/healthy":
            start_response("200 OK", [_TEXT])
            return [b"deidfs is healthy.\n"]
        if path == "/-/ready":
            if ready():
                start_response("200 OK", [_TEXT])
                return [b"deidfs is ready.\n"]
            start_response("503 Service Unavailable", [_TEXT])
            return [b"deidfs is not ready.\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [_LANDING]
        start_response("404 Not Found", [_TEXT])
        return [b"not found\n"]

    return app


class MetricsServer:
    """The HTTP endpoint on ``address``; :meth:`start` binds at once, serves in a thread.

    Parameters
    ----------
    address
        ``host:port`` as in the configuration (``metrics_address``).
    registry
        The daemon's registry (see :class:`deidfs.ops.metrics.Metrics`).
    ready
        Tells whether ``/-/ready`` answers 200; called on the HTTP thread, must be cheap.
    """

    def __init__(
        self, address: str, registry: CollectorRegistry, ready: Callable[[], bool]
    ) -> None:
        self.address = address
        self._app = make_app(registry, ready)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the configuration asked for port 0)."""
        if self._server is None:
            return 0
        return int(self._server.server_address[1])

    @property
    def alive(self) -> bool:
        """True while the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and start serving.

        Raises
        ------
        DeidfsError
            The address cannot be resolved or bound (in use, not local, no permission).
        """
        try:
            host, port = split_address(self.address)
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
        except (ValueError, OSError) as exc:
            raise DeidfsError(f"metrics_address {self.address!r}: {exc}") from None

        class Server(_Server):
            address_family = family

        try:
            server = make_server(host, port, self._app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise DeidfsError(
                f"cannot serve metrics on {self.address}: {exc.strerror or exc}"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="deidfs-metrics-http",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics served at http://%s/metrics", self.address)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (bounded wait)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._server = None
