"""The adapters a server holds: names (:mod:`.names`), the resident LRU (:mod:`.resident`)
and loading (:mod:`.loading`), put together by :class:`AdapterCache`.

A request's ``model`` resolves to a :class:`~.names.Route`; :meth:`AdapterCache.acquire`
makes its parts resident (reading them once, however many requests wait) and pins them
until :meth:`AdapterCache.release`. An evicted entry is read again from the registry
(packs decoded again) on its next request.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from adapterhub_c.registry.models import Artifact
from adapterhub_c.registry.store import Registry
from adapterhub_c.serve.layers import AdapterWeights, PromptWeights
from adapterhub_c.serve.loading import AdapterLoader, Target, adapter_weights
from adapterhub_c.serve.metrics import Metrics
from adapterhub_c.serve.names import JOIN, PROMPT_KIND, SERVABLE_KINDS, Route, ServableNames
from adapterhub_c.serve.resident import Entry, ResidentLRU


@dataclass
class Acquired:
    """The resident entries of one request (pinned until :meth:`AdapterCache.release`)."""

    adapter: AdapterWeights | None
    prompt: PromptWeights | None
    hit: bool            # every part was already resident
    switch_s: float      # time to make the parts resident and pin them (a load, or a lookup)


class AdapterCache:
    """Servable names, the LRU of resident entries and the loader of one target (thread-safe)."""

    def __init__(self, reg: Registry, target: Target, metrics: Metrics, max_resident: int | None = None,
                 max_bytes: int | None = None):
        self._lock = threading.RLock()  # shared: dropping a name and its entry is one step
        self.lru = ResidentLRU(metrics, max_resident, max_bytes, lock=self._lock)
        self.reg, self.target, self.metrics = reg, target, metrics
        self.names = ServableNames(reg, target, lock=self._lock)
        self.loader = AdapterLoader(reg, target)
        self._load_locks: dict[str, threading.Lock] = {}

    # ---- names -------------------------------------------------------------------------
    def target_names(self) -> set[str]:
        """The names of the served base or variant itself."""
        return self.names.target_names()

    def add(self, ref: str) -> Artifact:
        """Make a registered adapter or prompt servable (by name or id prefix)."""
        return self.names.add(ref)

    def add_all(self) -> list[Artifact]:
        """Every adapter and prompt artefact of the target's base."""
        return self.names.add_all()

    def remove(self, name: str) -> Artifact:
        """Stop serving ``name`` and drop it from memory (once no request uses it)."""
        with self._lock:
            art = self.names.pop(name)
            self.lru.drop_unpinned(art.id)
        return art

    def evict(self, name: str) -> bool:
        """Drop ``name`` from memory (it stays servable); False when not resident or in use."""
        art = self.names.get(name)
        return art is not None and self.lru.drop_unpinned(art.id)

    def listing(self) -> list[dict]:
        """One row per servable name (``/v1/models``)."""
        with self._lock:
            return self.names.listing(self.lru.keys())

    def resolve(self, model: str) -> Route:
        """The route for a request's ``model``; APIError 404 (with the closest names) or 400."""
        return self.names.resolve(model)

    # ---- residency -----------------------------------------------------------------------
    def acquire(self, route: Route) -> Acquired:
        """Make the route's parts resident (loading them when needed) and pin them.

        Runs in a worker thread (loading reads and decodes files). Errors: APIError 400
        (adapter does not fit the target), 500 (corrupt files), from ``errors.from_exception``.
        """
        t0 = time.perf_counter()
        hit = True
        adapter = prompt = None
        try:
            if route.adapter is not None:
                adapter, h = self._get(route.adapter)
                hit &= h
            if route.prompt is not None:
                prompt, h = self._get(route.prompt)
                hit &= h
        except BaseException:
            self.release(Acquired(adapter, prompt, False, 0.0))
            raise
        return Acquired(adapter, prompt, hit, time.perf_counter() - t0)

    def _hit(self, art: Artifact) -> Entry | None:
        entry = self.lru.pin(art.id)
        if entry is not None:
            self.metrics.inc("cache_hits_total")
        return entry

    def _get(self, art: Artifact) -> tuple[Entry, bool]:
        entry = self._hit(art)
        if entry is not None:
            return entry, True
        with self._lock:
            lock = self._load_locks.setdefault(art.id, threading.Lock())
        with lock:  # one load per artefact, however many requests wait for it
            entry = self._hit(art)
            if entry is not None:
                return entry, True
            self.metrics.inc("cache_misses_total")
            t0 = time.perf_counter()
            entry = self.loader.load(art)
            seconds = time.perf_counter() - t0
            self.metrics.inc("adapter_loads_total", kind=art.kind)
            self.metrics.observe("adapter_load_seconds", seconds, kind=art.kind)
            self.lru.insert_pinned(entry)
            return entry, False

    def release(self, acquired: Acquired) -> None:
        """Unpin a request's entries; an entry no longer servable goes once unused."""
        with self._lock:
            for entry in (acquired.adapter, acquired.prompt):
                if entry is not None and self.lru.unpin(entry.key) == 0 and not self.names.serves_id(entry.key):
                    self.lru.drop(entry.key)  # unloaded while in use
            self.lru.evict_over_budget()

    def resident_bytes(self) -> int:
        """Bytes of the resident tensors."""
        return self.lru.nbytes()

    def resident_names(self) -> list[str]:
        """Names of the resident entries, least recently used first."""
        return self.lru.names()


__all__ = ["AdapterCache", "Route", "Acquired", "Target", "adapter_weights", "JOIN", "PROMPT_KIND",
           "SERVABLE_KINDS"]
