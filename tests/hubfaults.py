"""Test-side fault injection and observation for the local Hub server (never in production code).

Both are ASGI middleware that tests put around the app through its public extension points:

    faults = FaultInjector()
    BackgroundServer(root, middleware=[fault_middleware(faults)])   # inside the edge checks
    faults.fail_next(2, status=429)                                  # armed in-process only

    probe = Probe()
    srv.app.add_middleware(ProbeMiddleware, probe=probe)             # outermost: sees every request

No HTTP route reaches either, so normal clients cannot trigger a fault.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import anyio
from starlette.middleware import Middleware

from adapterhub_c.hubserver.http import error_response


@dataclass
class Fault:
    """One armed fault: what it does, on which requests, how many more times."""

    kind: str                   # "status" | "drop_body" | "slow_body"
    remaining: int
    status: int = 429
    path_contains: str | None = None
    method: str | None = None
    after_bytes: int = 0        # drop_body: bytes sent before the connection is cut
    delay: float = 0.0          # slow_body: seconds between chunks (the slowness is the fault)
    chunk_size: int = 4096      # slow_body: chunk size

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method.upper() == method.upper())
                and (self.path_contains is None or self.path_contains in path))


class FaultInjector:
    """Armed faults and a count of the requests they hit (thread-safe)."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.hits: dict[str, int] = {}

    def fail_next(self, n: int, status: int = 429, path_contains: str | None = None,
                  method: str | None = None) -> None:
        """Answer the next ``n`` matching requests with ``status`` (n < 0: forever)."""
        self._add(Fault("status", n, status=status, path_contains=path_contains, method=method))

    def drop_body(self, times: int = 1, after_bytes: int = 1024,
                  path_contains: str | None = "/resolve/") -> None:
        """Cut the connection after ``after_bytes`` of the next ``times`` file downloads."""
        self._add(Fault("drop_body", times, after_bytes=after_bytes, path_contains=path_contains,
                        method="GET"))

    def slow_body(self, delay: float, times: int = 1, chunk_size: int = 4096,
                  path_contains: str | None = "/resolve/") -> None:
        """Send the next ``times`` file downloads in small chunks with ``delay`` between them."""
        self._add(Fault("slow_body", times, delay=delay, chunk_size=chunk_size,
                        path_contains=path_contains, method="GET"))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, kinds: tuple[str, ...], method: str, path: str) -> Fault | None:
        """The first armed fault of one of ``kinds`` matching this request (consumes one use)."""
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.remaining != 0 and fault.matches(method, path):
                    if fault.remaining > 0:
                        fault.remaining -= 1
                    self.hits[fault.kind] = self.hits.get(fault.kind, 0) + 1
                    return fault
        return None


class _BodyFaults:
    """A ``send`` that applies a body fault to a successful file download."""

    def __init__(self, faults: FaultInjector, method: str, path: str, send):
        self.faults, self.method, self.path, self.send = faults, method, path, send
        self.fault: Fault | None = None
        self.sent = 0

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            if self.method == "GET" and message["status"] in (200, 206):
                self.fault = self.faults.take(("drop_body", "slow_body"), "GET", self.path)
            await self.send(message)
        elif message["type"] != "http.response.body" or self.fault is None:
            await self.send(message)
        elif self.fault.kind == "drop_body":
            await self._drop(message)
        else:
            await self._slow(message)

    async def _drop(self, message) -> None:
        body = message.get("body", b"")
        room = self.fault.after_bytes - self.sent
        if len(body) <= room:
            self.sent += len(body)
            await self.send(message)
            return
        if room > 0:
            self.sent += room
            await self.send({"type": "http.response.body", "body": body[:room], "more_body": True})
        raise ConnectionAbortedError("injected fault: connection dropped mid-body")

    async def _slow(self, message) -> None:
        body, more = message.get("body", b""), message.get("more_body", False)
        size = self.fault.chunk_size
        pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
        for i, piece in enumerate(pieces):
            if self.sent:
                await anyio.sleep(self.fault.delay)
            self.sent += len(piece)
            await self.send({"type": "http.response.body", "body": piece,
                             "more_body": more or i < len(pieces) - 1})


class FaultMiddleware:
    """ASGI middleware answering or disturbing requests as the injector's armed faults say."""

    def __init__(self, app, faults: FaultInjector):
        self.app, self.faults = app, faults

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        fault = self.faults.take(("status",), method, path)
        if fault is not None:
            await error_response(fault.status, f"injected fault: HTTP {fault.status}")(scope, receive, send)
            return
        await self.app(scope, receive, _BodyFaults(self.faults, method, path, send))


def fault_middleware(faults: FaultInjector) -> Middleware:
    """The middleware entry for ``create_app(..., middleware=[...])`` / ``BackgroundServer``."""
    return Middleware(FaultMiddleware, faults=faults)


# ---- observation --------------------------------------------------------------------------------
class Probe:
    """What the server did with requests, as events a test can wait on (no sleeps, no clocks).

    ``reading``: the app asked for body bytes (it has seen the headers and decided what to do);
    ``answered``: a response was sent to its end; ``bytes_read``: body bytes the app read;
    ``started`` / ``finished``: requests that entered / left the app.
    """

    def __init__(self) -> None:
        self.reading, self.answered = threading.Event(), threading.Event()
        self.bytes_read = self.started = self.finished = 0
        self._idle = threading.Condition()

    def wait_idle(self, timeout: float = 30) -> bool:
        """True once every request that entered the app has left it (nothing left running)."""
        with self._idle:
            return self._idle.wait_for(lambda: self.started == self.finished, timeout)

    def enter(self) -> None:
        with self._idle:
            self.started += 1

    def leave(self) -> None:
        with self._idle:
            self.finished += 1
            self._idle.notify_all()


class ProbeMiddleware:
    """ASGI middleware reporting to a :class:`Probe`; add it last (``app.add_middleware``) to see everything."""

    def __init__(self, app, probe: Probe):
        self.app, self.probe = app, probe

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        probe = self.probe

        async def counting_receive():
            probe.reading.set()
            message = await receive()
            if message["type"] == "http.request":
                probe.bytes_read += len(message.get("body", b""))
            return message

        async def watching_send(message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                probe.answered.set()

        probe.enter()
        try:
            await self.app(scope, counting_receive, watching_send)
        finally:
            probe.leave()
