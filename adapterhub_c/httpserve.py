"""Serving an ASGI app with uvicorn on a socket we bind ourselves, in the foreground or in a
daemon thread: what the local Hub server and ``adapt serve`` share.

Binding before uvicorn starts lets ``port=0`` report the port it got, and lets a bind error
be one line (AdaptError) instead of uvicorn's log and exit.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time

from adapterhub_c.errors import AdaptError


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IPv4 / IPv6 address, bracketed or not) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, backlog: int = 256) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (0: any free port); AdaptError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AdaptError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def endpoint_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (IPv6 hosts in brackets)."""
    h, p = sock.getsockname()[:2]
    return f"http://{'[' + h + ']' if ':' in h else h}:{p}"


def uvicorn_server(app, log_level: str, graceful_shutdown_s: float):
    """A uvicorn server for ``app``: no access log, no lifespan events."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=graceful_shutdown_s)
    return uvicorn.Server(config)


def serve_forever(app, sock: socket.socket, log_level: str, graceful_shutdown_s: float) -> None:
    """Serve ``app`` on ``sock`` until interrupted (blocking)."""
    uvicorn_server(app, log_level, graceful_shutdown_s).run(sockets=[sock])


class ThreadedServer:
    """``app`` served on ``host:port`` by uvicorn in a daemon thread: ``start()``, ``endpoint``, ``stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "critical",
                 graceful_shutdown_s: float = 1, backlog: int = 256, start_timeout_s: float = 10,
                 stop_timeout_s: float = 5, name: str = "server"):
        self._sock = bind(host, port, backlog)
        self.endpoint = endpoint_of(self._sock)
        self._uv = uvicorn_server(app, log_level, graceful_shutdown_s)
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._start_timeout_s, self._stop_timeout_s, self._name = start_timeout_s, stop_timeout_s, name

    def start(self) -> None:
        """Start serving; returns once uvicorn listens (AdaptError if it dies or takes too long)."""
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AdaptError(f"the {self._name} failed to start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (forcing the exit if in-flight requests do not end) and close the socket."""
        self._uv.should_exit = True
        self._thread.join(timeout=self._stop_timeout_s)
        if self._thread.is_alive():
            self._uv.force_exit = True
            self._thread.join(timeout=5)
        try:
            self._sock.close()
        except OSError:
            pass
