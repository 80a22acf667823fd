"""Serving an ASGI app with uvicorn on a socket we bind ourselves, in the foreground or in a
daemon thread, and reading request bodies within bounds: what the local Hub server and
``adapt serve`` share.

Binding before uvicorn starts lets ``port=0`` report the port it got, and lets a bind error
be one line (AdaptError) instead of uvicorn's log and exit.

Request bodies (:func:`read_limited`): refused with 413 when the declared Content-Length or
the bytes that arrive pass a limit, read within a deadline (408 and the connection closed
when a body never completes), and a client that disconnects mid-upload ends its request
quietly. The refusals are Starlette ``HTTPException`` s, so each server's own handler for
those gives them its error shape (a handled exception leaves no traceback in the log).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from adapterhub_c.errors import AdaptError

# An oversized body is read on and dropped (up to these bounds) before the 413 goes out: a
# server that closes with unread bytes in its socket sends a TCP reset, which can destroy
# the 413 before the client (still uploading) reads it. Past the bounds: answer and close.
DRAIN_MAX_BYTES = 64 << 20
DRAIN_MAX_S = 5.0
CLOSE = {"Connection": "close"}


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


# ---- request bodies --------------------------------------------------------------------------
class BodyTooLarge(HTTPException):
    """413: the body passed ``limit``; without the whole body read (``drained`` False), with
    Connection: close (what is left is no next request)."""

    def __init__(self, limit: int, drained: bool):
        super().__init__(413, f"request body larger than {limit} bytes", None if drained else dict(CLOSE))
        self.limit, self.drained = limit, drained


class BodyTimeout(HTTPException):
    """408: the body did not arrive within the deadline; the connection is closed."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s", dict(CLOSE))


class ClientGone(HTTPException):
    """The client disconnected before its body ended: the request ends, nobody reads the answer."""

    def __init__(self):
        super().__init__(400, "the client disconnected before the request body ended", dict(CLOSE))


def declared_length(headers) -> int | None:
    """The Content-Length header as a number (None when absent or not digits; capped at 10^20)."""
    declared = headers.get("content-length", "")
    if not declared.isdigit():
        return None
    return int(declared) if len(declared) <= 20 else 10 ** 20


async def drain(chunks, already: int = 0) -> bool:
    """Read and drop the rest of a request body within DRAIN_MAX_BYTES / DRAIN_MAX_S; True if it ended."""
    deadline = time.monotonic() + DRAIN_MAX_S
    size = already
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                chunk = await asyncio.wait_for(anext(chunks), left)
            except StopAsyncIteration:
                return True
            size += len(chunk)
            if size > DRAIN_MAX_BYTES:
                return False
    except (asyncio.TimeoutError, ClientDisconnect):
        return False


async def refuse_declared(request, limit: int) -> None:
    """BodyTooLarge when the declared Content-Length passes ``limit`` (the body drained first when small enough)."""
    declared = declared_length(request.headers)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared <= DRAIN_MAX_BYTES and await drain(request.stream()))


async def read_limited(request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body of a Starlette ``request``, at most ``limit`` bytes, complete within ``timeout_s``.

    BodyTooLarge (413) when the declared length or the bytes received pass ``limit``;
    BodyTimeout (408) when the body has not ended ``timeout_s`` seconds after reading began
    (None: no deadline); ClientGone when the client disconnects first.
    """
    await refuse_declared(request, limit)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    chunks, size = [], 0
    stream = request.stream()
    try:
        while True:
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                chunk = await asyncio.wait_for(anext(stream), left)
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:
                raise BodyTimeout(timeout_s) from None
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit, await drain(stream, size))
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
