"""Fault injection for the local Hub server, for tests of the client's retry paths.

Faults are switched on only through this object, in the server's own process
(``app.state.faults``); no HTTP route reaches it, so normal clients cannot trigger them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Fault:
    """One armed fault: what it does, on which requests, how many more times."""

    kind: str                   # "status" | "drop_body" | "slow_body"
    remaining: int
    status: int = 429
    path_contains: str | None = None
    method: str | None = None
    after_bytes: int = 0        # drop_body: bytes sent before the connection is cut
    delay: float = 0.0          # slow_body: seconds slept between chunks
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
