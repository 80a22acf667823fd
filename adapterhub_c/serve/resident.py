"""The LRU of resident adapters and prompts, under an entry count and/or a byte budget.

Entries (:class:`~.layers.AdapterWeights`, :class:`~.layers.PromptWeights`) are keyed by
artefact id, in least-recently-used order. An entry in use by a running request is pinned
and never evicted; over budget with everything pinned, the LRU stays over budget until a
request ends. Nothing here knows names or how entries are loaded.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from adapterhub_c.errors import UsageError
from adapterhub_c.serve.layers import AdapterWeights, PromptWeights
from adapterhub_c.serve.metrics import Metrics

Entry = AdapterWeights | PromptWeights


class ResidentLRU:
    """Resident entries with pins and eviction (thread-safe; ``lock`` may be shared)."""

    def __init__(self, metrics: Metrics, max_resident: int | None = None, max_bytes: int | None = None,
                 lock: threading.RLock | None = None):
        if max_resident is not None and max_resident < 1:
            raise UsageError(f"--max-resident must be at least 1 (got {max_resident})")
        if max_bytes is not None and max_bytes <= 0:
            raise UsageError("--max-resident-mb must be positive")
        self.metrics = metrics
        self.max_resident, self.max_bytes = max_resident, max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._lock = lock or threading.RLock()
        self._update_gauges()

    def pin(self, key: str) -> Entry | None:
        """The entry for ``key``, marked most recently used and pinned once more; None if not resident."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._pins[key] = self._pins.get(key, 0) + 1
            return entry

    def insert_pinned(self, entry: Entry) -> None:
        """Make ``entry`` resident, pinned once, then evict what the budget asks for."""
        with self._lock:
            self._entries[entry.key] = entry
            self._pins[entry.key] = self._pins.get(entry.key, 0) + 1
            self.evict_over_budget()

    def unpin(self, key: str) -> int:
        """Unpin ``key`` once; returns the pins left (0: no request uses it)."""
        with self._lock:
            n = self._pins.get(key, 0) - 1
            if n <= 0:
                self._pins.pop(key, None)
                return 0
            self._pins[key] = n
            return n

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            return bool(self._pins.get(key))

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def drop(self, key: str) -> None:
        """Forget ``key``'s entry (pinned or not)."""
        with self._lock:
            self._entries.pop(key, None)
            self._update_gauges()

    def drop_unpinned(self, key: str) -> bool:
        """Forget ``key``'s entry unless a request uses it; False when pinned or not resident."""
        with self._lock:
            if key not in self._entries or self._pins.get(key):
                return False
            self.drop(key)
            return True

    def evict_over_budget(self) -> None:
        """Evict least recently used unpinned entries while over budget."""
        with self._lock:
            while self._over():
                victim = next((k for k in self._entries if not self._pins.get(k)), None)
                if victim is None:
                    break  # everything resident is in use: over budget until a request ends
                self.drop(victim)
                self.metrics.inc("cache_evictions_total")
            self._update_gauges()

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def names(self) -> list[str]:
        """Names of the resident entries, least recently used first."""
        with self._lock:
            return [e.name for e in self._entries.values()]

    def nbytes(self) -> int:
        """Bytes of the resident tensors."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def _over(self) -> bool:
        if self.max_resident is not None and len(self._entries) > self.max_resident:
            return True
        return self.max_bytes is not None and self.nbytes() > self.max_bytes

    def _update_gauges(self) -> None:
        self.metrics.set("resident_adapters", len(self._entries))
        self.metrics.set("resident_bytes", self.nbytes())


__all__ = ["ResidentLRU", "Entry"]
