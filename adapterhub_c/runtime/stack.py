"""Resolving and loading what ``eval`` / ``generate`` run: base, variant, adapter, prompt.

A *stack* is a base, optionally compressed (a variant), optionally with an adapter and a
soft prompt. ``TARGET`` may name any of base, variant or artefact; ``--variant``,
``--adapter`` and ``--prompt`` complete it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import PROMPT_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import attach_adapter
from adapterhub_c.runtime.bases import load_base_model, load_base_tokenizer
from adapterhub_c.runtime.prompts import attach_prompt
from adapterhub_c.runtime.variants import load_variant


@dataclass
class StackSpec:
    """Registry objects making up a stack (all detached, fully loaded)."""

    base: BaseModel
    variant: Variant | None = None
    adapter: Artifact | None = None
    prompt: Artifact | None = None

    def describe(self) -> str:
        parts = [self.variant.name if self.variant else self.base.name]
        if self.adapter:
            parts.append(f"+ {self.adapter.name}")
        if self.prompt:
            parts.append(f"+ prompt {self.prompt.name}")
        return " ".join(parts)

    def ids(self) -> dict[str, Any]:
        return {"base_id": self.base.id, "variant_id": self.variant.id if self.variant else None,
                "artifact_id": self.adapter.id if self.adapter else None,
                "prompt_id": self.prompt.id if self.prompt else None}


def resolve_stack(reg: Registry, target: str, variant: str | None = None, adapter: str | None = None,
                  prompt: str | None = None) -> StackSpec:
    """Resolve names into a ``StackSpec``, checking that everything shares one base."""
    with reg.session() as s:
        obj = reg.resolve(s, target)
        spec = StackSpec(base=None)  # type: ignore[arg-type]
        if isinstance(obj, BaseModel):
            spec.base = obj
        elif isinstance(obj, Variant):
            spec.variant, spec.base = obj, s.get(BaseModel, obj.base_id)
        else:
            _place_artifact(spec, obj)
            spec.base = s.get(BaseModel, obj.base_id)
            if obj.variant_id and spec.variant is None:
                spec.variant = s.get(Variant, obj.variant_id)
        if variant:
            spec.variant = reg.resolve(s, variant, "variant")
        if adapter:
            spec.adapter = reg.resolve(s, adapter, "artifact")
        if prompt:
            spec.prompt = reg.resolve(s, prompt, "artifact")
            if spec.prompt.kind not in PROMPT_KINDS:
                raise UsageError(f"{spec.prompt.name!r} is a {spec.prompt.kind}, not a prompt")
        for part in (spec.variant, spec.adapter, spec.prompt):
            if part is not None and part.base_id != spec.base.id:
                other = s.get(BaseModel, part.base_id)
                raise UsageError(f"{part.name!r} belongs to base {other.name!r}, not {spec.base.name!r}")
        return spec


def _place_artifact(spec: StackSpec, obj: Artifact) -> None:
    if obj.kind in PROMPT_KINDS:
        spec.prompt = obj
    else:
        spec.adapter = obj


def load_stack(reg: Registry, spec: StackSpec, device: str | None = "cpu"):
    """(model, tokenizer) for a stack, in eval mode: variant or base, then adapter, then prompt."""
    if spec.variant is not None:
        model = load_variant(reg, spec.variant, device)
        tokenizer = load_base_tokenizer(reg, spec.base)
    else:
        model, tokenizer = load_base_model(reg, spec.base, device)
    if spec.adapter is not None:
        model = attach_adapter(reg, spec, model, device)
    if spec.prompt is not None:
        model = attach_prompt(reg, spec, model, device)
    model.eval()
    return model, tokenizer
