"""Reading a servable artefact into its resident form, on the served target's device.

An adapter becomes :class:`~.layers.AdapterWeights` (LoRA factors, retargeted to the served
model's module names and sliced to an ``ffn-channels`` variant as ``adapters.slicing`` does;
recovery parts with the scale ``adapters.recovery`` gives them), a prompt
:class:`~.layers.PromptWeights`. Nothing here knows names or residency.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub_c.adapters.attach import retarget_names
from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.recovery import RecoveryConfig
from adapterhub_c.adapters.slicing import target_factors
from adapterhub_c.errors import UsageError
from adapterhub_c.models.arch import Architecture
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.runtime.prompts import read_prompt_artifact
from adapterhub_c.serve.layers import AdapterWeights, LoraPart, PromptWeights, RecoveryPart
from adapterhub_c.serve.names import PROMPT_KIND

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


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


Pending = list[tuple[torch.Tensor, object, str]]  # (source tensor, part, attribute)


def _lora_parts(art: Artifact, loaded: LoadedAdapter, target: Target, out: AdapterWeights) -> Pending:
    """Fill ``out.lora``; the tensors still to place on the device."""
    lora = loaded.lora
    extra = [k for k in lora.tensors if not k.endswith(_LORA_SUFFIXES)]
    if extra:
        raise UsageError(f"adapter {art.name!r} carries non-LoRA tensors ({', '.join(extra[:3])}); "
                         "adapt serve attaches LoRA factors and recovery modules only")
    mapping = retarget_names(lora.modules(), sorted(target.linears))
    target_variant = target.variant.id if target.variant else None
    kept = target.kept_indices if (target.kept_indices and art.variant_id != target_variant) else None
    parts = target_factors(lora, mapping, kept, target.arch)
    scales = {mapping[m]: layer.scale for m, layer in lora.layers().items() if m in mapping}
    pending: Pending = []
    for module, t in parts.items():
        d_in, d_out = target.linears[module]
        A, B = t["A"], t["B"]
        if A.shape[1] != d_in or B.shape[0] != d_out or A.shape[0] != B.shape[1]:
            raise UsageError(f"adapter {art.name!r}: LoRA of {module} is {tuple(B.shape)}·{tuple(A.shape)}, "
                             f"the served layer is {d_in}→{d_out}")
        part = out.lora[module] = LoraPart(A, B, scales[module], t.get("bias"))
        pending += [(A, part, "A"), (B, part, "B")] + ([(part.bias, part, "bias")] if part.bias is not None else [])
    return pending


def _recovery_parts(art: Artifact, loaded: LoadedAdapter, target: Target, out: AdapterWeights) -> Pending:
    """Fill ``out.recovery`` (scale per module as ``adapters.recovery.load_recovery`` gives it)."""
    state = loaded.recovery_state
    if not state:
        return []
    cfg = loaded.recovery_config or RecoveryConfig()
    pending: Pending = []
    for name in sorted({k.rsplit(".", 1)[0] for k in state}):
        if name not in target.linears:
            raise UsageError(f"adapter {art.name!r}: recovery module beside {name}, which the served model "
                             "does not have")
        D, U = state[f"{name}.recovery_D"], state[f"{name}.recovery_U"]
        d_in, d_out = target.linears[name]
        if D.shape[1] != d_in or U.shape[0] != d_out or D.shape[0] != U.shape[1]:
            raise UsageError(f"adapter {art.name!r}: recovery tensors of {name} do not fit a {d_in}→{d_out} layer")
        part = out.recovery[name] = RecoveryPart(D, U, cfg.for_rank(D.shape[0]).scale, cfg.act)
        pending += [(D, part, "D"), (U, part, "U")]
    return pending


def _place(pending: Pending, device: torch.device) -> None:
    """One float32 buffer per adapter on the device, the factors views into it: a single
    allocation (and a single host→device copy) whatever the number of modules."""
    flat = torch.empty(sum(t.numel() for t, _, _ in pending), dtype=torch.float32)
    offset = 0
    views = []
    for t, _, _ in pending:
        n = t.numel()
        flat[offset:offset + n].copy_(t.reshape(-1))
        views.append((offset, n, t.shape))
        offset += n
    flat = flat.to(device)
    for (start, n, shape), (_, part, attr) in zip(views, pending, strict=True):
        setattr(part, attr, flat[start:start + n].view(shape))


def adapter_weights(art: Artifact, loaded: LoadedAdapter, target: Target) -> AdapterWeights:
    """The resident form of a loaded adapter on ``target``: factors on its device, float32.

    A LoRA made on the uncompressed base, served on an ``ffn-channels`` variant, is sliced
    by the variant's kept indices (as ``runtime.adapters.attach_adapter`` does).
    """
    out = AdapterWeights(key=art.id, name=art.name)
    pending = _lora_parts(art, loaded, target, out) + _recovery_parts(art, loaded, target, out)
    _place(pending, target.device)
    if not out.lora and not out.recovery:
        raise UsageError(f"adapter {art.name!r} has no LoRA modules")
    return out


class AdapterLoader:
    """Reads artefacts from the registry into resident entries for one target."""

    def __init__(self, reg: Registry, target: Target):
        self.reg, self.target = reg, target

    def load(self, art: Artifact) -> AdapterWeights | PromptWeights:
        """The resident form of ``art`` (an adapter of any kind, or a prompt); UsageError when it does not fit."""
        if art.kind == PROMPT_KIND:
            return self._prompt(art)
        return adapter_weights(art, load_adapter_artifact(self.reg, art), self.target)

    def _prompt(self, art: Artifact) -> PromptWeights:
        target = self.target
        sp = read_prompt_artifact(self.reg, art, target.base, expected_hidden=target.hidden)
        if target.context is not None and sp.num_virtual_tokens >= target.context:
            raise UsageError(f"prompt {art.name!r} has {sp.num_virtual_tokens} tokens, the context is "
                             f"{target.context}")
        emb = sp.embeddings.detach().to(target.device, torch.float32)
        return PromptWeights(key=art.id, name=art.name, embeddings=emb)


__all__ = ["Target", "AdapterLoader", "adapter_weights"]
