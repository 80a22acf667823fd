"""Which names a server answers to, and the LRU of resident adapters and prompts.

A request's ``model`` resolves to a :class:`Route`: the target itself, an adapter
artefact (LoRA, converted LoRA with recovery, pack, merged, composed), a prompt artefact,
or ``adapter+prompt``. Resident entries (:class:`~.layers.AdapterWeights`,
:class:`~.layers.PromptWeights`) live here, outside the model, keyed by artefact id, in
least-recently-used order under ``max_resident`` entries and/or ``max_bytes``. An entry in
use by a running request is pinned and never evicted; an evicted one is read again from
the registry (packs decoded again) on its next request.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from sqlalchemy import select

from adapterhub_c.adapters.attach import retarget_names
from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.recovery import RecoveryConfig
from adapterhub_c.adapters.slicing import target_factors
from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.models.arch import Architecture
from adapterhub_c.registry.kinds import ADAPTER_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.runtime.prompts import read_prompt_artifact
from adapterhub_c.serve.errors import bad_request, model_not_found
from adapterhub_c.serve.layers import AdapterWeights, LoraPart, PromptWeights, RecoveryPart
from adapterhub_c.serve.metrics import Metrics

PROMPT_KIND = "prompt"
SERVABLE_KINDS = ADAPTER_KINDS + (PROMPT_KIND,)
JOIN = "+"


@dataclass
class Route:
    """What a request's ``model`` names: the target, an adapter, a prompt, or both."""

    model: str
    adapter: Artifact | None = None
    prompt: Artifact | None = None


@dataclass
class Acquired:
    """The resident entries of one request (pinned until :meth:`AdapterCache.release`)."""

    adapter: AdapterWeights | None
    prompt: PromptWeights | None
    hit: bool            # every part was already resident
    switch_s: float      # time to make the parts resident and pin them (a load, or a lookup)


@dataclass
class Target:
    """The served base or variant and what adapter loading needs to know about it."""

    name: str
    base: BaseModel
    variant: Variant | None
    linears: dict[str, tuple[int, int]]        # module name → (in, out), output head excluded
    context: int | None
    hidden: int
    kept_indices: dict[str, torch.Tensor] | None
    device: torch.device
    arch: Architecture | None = None  # the served model's description (MLP pairing for ffn-channels slicing)


def adapter_weights(art: Artifact, loaded: LoadedAdapter, target: Target) -> AdapterWeights:
    """The resident form of a loaded adapter on ``target``: factors on its device, float32.

    A LoRA made on the uncompressed base, served on an ``ffn-channels`` variant, is sliced
    by the variant's kept indices (as ``runtime.adapters.attach_adapter`` does).
    """
    lora = loaded.lora
    extra = [k for k in lora.tensors if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias"))]
    if extra:
        raise UsageError(f"adapter {art.name!r} carries non-LoRA tensors ({', '.join(extra[:3])}); "
                         "adapt serve attaches LoRA factors and recovery modules only")
    names = sorted(target.linears)
    mapping = retarget_names(lora.modules(), names)
    target_variant = target.variant.id if target.variant else None
    kept = target.kept_indices if (target.kept_indices and art.variant_id != target_variant) else None
    parts = target_factors(lora, mapping, kept, target.arch)
    scales = {mapping[m]: layer.scale for m, layer in lora.layers().items() if m in mapping}
    out = AdapterWeights(key=art.id, name=art.name)
    pending: list[tuple[torch.Tensor, object, str]] = []  # (source tensor, part, attribute)
    for module, t in parts.items():
        d_in, d_out = target.linears[module]
        A, B = t["A"], t["B"]
        if A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
            raise UsageError(f"adapter {art.name!r}: LoRA of {module} is {tuple(B.shape)}·{tuple(A.shape)}, "
                             f"the served layer is {d_in}→{d_out}")
        part = out.lora[module] = LoraPart(A, B, scales[module], t.get("bias"))
        pending += [(A, part, "A"), (B, part, "B")] + ([(part.bias, part, "bias")] if part.bias is not None else [])
    if loaded.recovery_state:
        cfg = loaded.recovery_config or RecoveryConfig()
        for name in sorted({k.rsplit(".", 1)[0] for k in loaded.recovery_state}):
            if name not in target.linears:
                raise UsageError(f"adapter {art.name!r}: recovery module beside {name}, which the served model "
                                 "does not have")
            D = loaded.recovery_state[f"{name}.recovery_D"]
            U = loaded.recovery_state[f"{name}.recovery_U"]
            d_in, d_out = target.linears[name]
            if D.shape[1] != d_in or U.shape[0] != d_out or D.shape[0] != U.shape[1]:
                raise UsageError(f"adapter {art.name!r}: recovery tensors of {name} do not fit a {d_in}→{d_out} layer")
            scale = cfg.for_rank(D.shape[0]).scale  # as adapters.recovery.load_recovery gives it
            part = out.recovery[name] = RecoveryPart(D, U, scale, cfg.act)
            pending += [(D, part, "D"), (U, part, "U")]
    # one float32 buffer per adapter on the device, the factors views into it: a single
    # allocation (and a single host→device copy) whatever the number of modules
    total = sum(t.numel() for t, _, _ in pending)
    flat = torch.empty(total, dtype=torch.float32)
    offset = 0
    views = []
    for t, _, _ in pending:
        n = t.numel()
        flat[offset:offset + n].copy_(t.reshape(-1))
        views.append((offset, n, t.shape))
        offset += n
    flat = flat.to(target.device)
    for (start, n, shape), (_, part, attr) in zip(views, pending, strict=True):
        setattr(part, attr, flat[start:start + n].view(shape))
    if not out.lora and not out.recovery:
        raise UsageError(f"adapter {art.name!r} has no LoRA modules")
    return out


class AdapterCache:
    """Servable names, and the LRU of resident entries (thread-safe)."""

    def __init__(self, reg: Registry, target: Target, metrics: Metrics, max_resident: int | None = None,
                 max_bytes: int | None = None):
        if max_resident is not None and max_resident < 1:
            raise UsageError(f"--max-resident must be at least 1 (got {max_resident})")
        if max_bytes is not None and max_bytes <= 0:
            raise UsageError("--max-resident-mb must be positive")
        self.reg, self.target, self.metrics = reg, target, metrics
        self.max_resident, self.max_bytes = max_resident, max_bytes
        self.servable: dict[str, Artifact] = {}
        self.parents: dict[str, str] = {}
        self._resident: OrderedDict[str, AdapterWeights | PromptWeights] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._update_gauges()

    # ---- names -------------------------------------------------------------------------
    def target_names(self) -> set[str]:
        names = {self.target.name}
        names.add(self.target.variant.name if self.target.variant else self.target.base.name)
        if self.target.variant is None and self.target.base.hub_id:
            names.add(self.target.base.hub_id)
        return names

    def _check_servable(self, s, art: Artifact) -> None:
        if art.kind not in SERVABLE_KINDS:
            raise bad_request(f"{art.name!r} is a {art.kind}, not an adapter or a prompt", "model")
        if art.base_id != self.target.base.id:
            other = s.get(BaseModel, art.base_id)
            raise bad_request(f"{art.name!r} is an adapter for base {other.name if other else art.base_id!r}, "
                              f"but this server runs base {self.target.base.name!r}", "model", "wrong_base")

    def add(self, ref: str) -> Artifact:
        """Make a registered adapter or prompt servable (by name or id prefix)."""
        with self.reg.session() as s:
            try:
                art = self.reg.resolve(s, ref, "artifact")
            except NotFoundError:
                raise model_not_found(ref, self._registered_names(s)) from None
            self._check_servable(s, art)
            parent = self._parent_name(s, art)
        with self._lock:
            self.servable[art.name] = art
            self.parents[art.name] = parent
        return art

    def add_all(self) -> list[Artifact]:
        """Every adapter and prompt artefact of the target's base."""
        with self.reg.session() as s:
            arts = list(s.scalars(select(Artifact).where(Artifact.base_id == self.target.base.id,
                                                         Artifact.kind.in_(SERVABLE_KINDS))
                                  .order_by(Artifact.created_at)))
            parents = {a.name: self._parent_name(s, a) for a in arts}
        with self._lock:
            for a in arts:
                self.servable[a.name] = a
            self.parents.update(parents)
        return arts

    def remove(self, name: str) -> Artifact:
        """Stop serving ``name`` and drop it from memory (once no request uses it)."""
        with self._lock:
            art = self.servable.pop(name, None)
            if art is None:
                raise model_not_found(name, self.servable, "not loaded")
            self.parents.pop(name, None)
            if not self._pins.get(art.id):
                self._drop(art.id)
        return art

    def evict(self, name: str) -> bool:
        """Drop ``name`` from memory (it stays servable); False when not resident or in use."""
        with self._lock:
            art = self.servable.get(name)
            if art is None or art.id not in self._resident or self._pins.get(art.id):
                return False
            self._drop(art.id)
            return True

    def _registered_names(self, s) -> list[str]:
        return list(s.scalars(select(Artifact.name).where(Artifact.kind.in_(SERVABLE_KINDS))))

    def _parent_name(self, s, art: Artifact) -> str:
        """The artefact's source (packed-from, converted-from, …) or the base / variant it targets."""
        for _role, parent in self.reg.parents(s, art):
            if isinstance(parent, Artifact):
                return parent.name
        if art.variant_id:
            v = s.get(Variant, art.variant_id)
            if v is not None:
                return v.name
        base = s.get(BaseModel, art.base_id)
        return base.name if base else self.target.base.name

    def listing(self) -> list[dict]:
        with self._lock:
            resident = set(self._resident)
            return [{"id": name, "kind": art.kind, "parent": self.parents.get(name, self.target.name),
                     "resident": art.id in resident} for name, art in self.servable.items()]

    def resolve(self, model: str) -> Route:
        """The route for a request's ``model``; APIError 404 (with the closest names) or 400."""
        if not isinstance(model, str) or not model:
            raise bad_request("'model' must be a non-empty string", "model")
        if model in self.target_names():
            return Route(model)
        with self._lock:
            art = self.servable.get(model)
            pair = None
            if art is None and JOIN in model:
                a_name, _, p_name = model.partition(JOIN)
                pair = (a_name, p_name, self.servable.get(a_name), self.servable.get(p_name))
        if pair is not None:
            a_name, p_name, a, p = pair
            if a is None or p is None:
                self._not_servable(a_name if a is None else p_name)
            if a.kind == PROMPT_KIND and p.kind != PROMPT_KIND:
                a, p = p, a
            if a.kind == PROMPT_KIND or p.kind != PROMPT_KIND:
                raise bad_request(f"{model!r}: 'adapter+prompt' needs one adapter and one prompt", "model")
            return Route(model, adapter=a, prompt=p)
        if art is None:
            self._not_servable(model)
        if art.kind == PROMPT_KIND:
            return Route(model, prompt=art)
        return Route(model, adapter=art)

    def _not_servable(self, name: str) -> None:
        known = sorted(self.target_names() | set(self.servable))
        with self.reg.session() as s:
            try:
                art = self.reg.resolve(s, name, "artifact")
            except (NotFoundError, UsageError):
                raise model_not_found(name, known) from None
            self._check_servable(s, art)  # 400 when it belongs to another base
        raise model_not_found(name, known, f"{art.name!r} is registered but not served; "
                                           "POST /v1/load_adapter or start with --all")

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

    def _pin(self, key: str) -> AdapterWeights | PromptWeights | None:
        with self._lock:
            entry = self._resident.get(key)
            if entry is not None:
                self._resident.move_to_end(key)
                self._pins[key] = self._pins.get(key, 0) + 1
            return entry

    def _get(self, art: Artifact):
        entry = self._pin(art.id)
        if entry is not None:
            self.metrics.inc("cache_hits_total")
            return entry, True
        with self._lock:
            lock = self._load_locks.setdefault(art.id, threading.Lock())
        with lock:  # one load per artefact, however many requests wait for it
            entry = self._pin(art.id)
            if entry is not None:
                self.metrics.inc("cache_hits_total")
                return entry, True
            self.metrics.inc("cache_misses_total")
            t0 = time.perf_counter()
            entry = self._load(art)
            seconds = time.perf_counter() - t0
            self.metrics.inc("adapter_loads_total", kind=art.kind)
            self.metrics.observe("adapter_load_seconds", seconds, kind=art.kind)
            with self._lock:
                self._resident[art.id] = entry
                self._pins[art.id] = self._pins.get(art.id, 0) + 1
                self._evict()
            return entry, False

    def _load(self, art: Artifact) -> AdapterWeights | PromptWeights:
        if art.kind == PROMPT_KIND:
            sp = read_prompt_artifact(self.reg, art, self.target.base, expected_hidden=self.target.hidden)
            if self.target.context is not None and sp.num_virtual_tokens >= self.target.context:
                raise UsageError(f"prompt {art.name!r} has {sp.num_virtual_tokens} tokens, the context is "
                                 f"{self.target.context}")
            emb = sp.embeddings.detach().to(self.target.device, torch.float32)
            return PromptWeights(key=art.id, name=art.name, embeddings=emb)
        return adapter_weights(art, load_adapter_artifact(self.reg, art), self.target)

    def release(self, acquired: Acquired) -> None:
        with self._lock:
            for entry in (acquired.adapter, acquired.prompt):
                if entry is None:
                    continue
                n = self._pins.get(entry.key, 0) - 1
                if n <= 0:
                    self._pins.pop(entry.key, None)
                    if entry.key not in {a.id for a in self.servable.values()}:
                        self._drop(entry.key)  # unloaded while in use
                else:
                    self._pins[entry.key] = n
            self._evict()

    def _over(self) -> bool:
        if self.max_resident is not None and len(self._resident) > self.max_resident:
            return True
        return self.max_bytes is not None and self.resident_bytes() > self.max_bytes

    def _evict(self) -> None:
        while self._over():
            victim = next((k for k in self._resident if not self._pins.get(k)), None)
            if victim is None:
                break  # everything resident is in use: over budget until a request ends
            self._drop(victim)
            self.metrics.inc("cache_evictions_total")
        self._update_gauges()

    def _drop(self, key: str) -> None:
        self._resident.pop(key, None)
        self._update_gauges()

    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._resident.values())

    def resident_names(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._resident.values()]

    def _update_gauges(self) -> None:
        self.metrics.set("resident_adapters", len(self._resident))
        self.metrics.set("resident_bytes", self.resident_bytes())


__all__ = ["AdapterCache", "Route", "Acquired", "Target", "adapter_weights", "JOIN"]
