"""Which names a server answers to: the target, and the adapters and prompts made servable.

A request's ``model`` resolves to a :class:`Route`: the target itself, an adapter
artefact (LoRA, converted LoRA with recovery, pack, merged, composed), a prompt artefact,
or ``adapter+prompt``. Resolution only: nothing here loads or holds tensors (that is
:mod:`.resident` and :mod:`.loading`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import select

from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.registry.kinds import ADAPTER_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.serve.errors import bad_request, model_not_found

PROMPT_KIND = "prompt"
SERVABLE_KINDS = ADAPTER_KINDS + (PROMPT_KIND,)
JOIN = "+"


@dataclass
class Route:
    """What a request's ``model`` names: the target, an adapter, a prompt, or both."""

    model: str
    adapter: Artifact | None = None
    prompt: Artifact | None = None


class ServableNames:
    """The servable artefacts by name (and their parents, for ``/v1/models``); thread-safe.

    ``lock`` may be shared with the resident LRU so that removing a name and dropping its
    entry happen as one step.
    """

    def __init__(self, reg: Registry, target, lock: threading.RLock | None = None):
        self.reg, self.target = reg, target
        self.servable: dict[str, Artifact] = {}
        self.parents: dict[str, str] = {}
        self._lock = lock or threading.RLock()

    def target_names(self) -> set[str]:
        """The names of the served base or variant itself."""
        names = {self.target.name}
        names.add(self.target.variant.name if self.target.variant else self.target.base.name)
        if self.target.variant is None and self.target.base.hub_id:
            names.add(self.target.base.hub_id)
        return names

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

    def pop(self, name: str) -> Artifact:
        """Stop serving ``name``; APIError 404 when it is not served."""
        with self._lock:
            art = self.servable.pop(name, None)
            if art is None:
                raise model_not_found(name, self.servable, "not loaded")
            self.parents.pop(name, None)
            return art

    def get(self, name: str) -> Artifact | None:
        """The servable artefact called ``name``, or None."""
        with self._lock:
            return self.servable.get(name)

    def serves_id(self, key: str) -> bool:
        """Whether some servable name stands for artefact id ``key``."""
        with self._lock:
            return any(a.id == key for a in self.servable.values())

    def listing(self, resident: set[str]) -> list[dict]:
        """One row per servable name: id, kind, parent, whether resident (``resident``: artefact ids)."""
        with self._lock:
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
            return self._pair_route(model, *pair)
        if art is None:
            self._not_servable(model)
        if art.kind == PROMPT_KIND:
            return Route(model, prompt=art)
        return Route(model, adapter=art)

    def _pair_route(self, model: str, a_name: str, p_name: str, a: Artifact | None, p: Artifact | None) -> Route:
        if a is None or p is None:
            self._not_servable(a_name if a is None else p_name)
        if a.kind == PROMPT_KIND and p.kind != PROMPT_KIND:
            a, p = p, a
        if a.kind == PROMPT_KIND or p.kind != PROMPT_KIND:
            raise bad_request(f"{model!r}: 'adapter+prompt' needs one adapter and one prompt", "model")
        return Route(model, adapter=a, prompt=p)

    def _check_servable(self, s, art: Artifact) -> None:
        if art.kind not in SERVABLE_KINDS:
            raise bad_request(f"{art.name!r} is a {art.kind}, not an adapter or a prompt", "model")
        if art.base_id != self.target.base.id:
            other = s.get(BaseModel, art.base_id)
            raise bad_request(f"{art.name!r} is an adapter for base {other.name if other else art.base_id!r}, "
                              f"but this server runs base {self.target.base.name!r}", "model", "wrong_base")

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

    def _not_servable(self, name: str) -> None:
        with self._lock:
            known = sorted(self.target_names() | set(self.servable))
        with self.reg.session() as s:
            try:
                art = self.reg.resolve(s, name, "artifact")
            except (NotFoundError, UsageError):
                raise model_not_found(name, known) from None
            self._check_servable(s, art)  # 400 when it belongs to another base
        raise model_not_found(name, known, f"{art.name!r} is registered but not served; "
                                           "POST /v1/load_adapter or start with --all")


__all__ = ["Route", "ServableNames", "JOIN", "PROMPT_KIND", "SERVABLE_KINDS"]
