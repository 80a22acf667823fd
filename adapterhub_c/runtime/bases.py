"""Loading registered models into memory."""
from __future__ import annotations

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.models.device import resolve_device
from adapterhub_c.models.weights import load_model
from adapterhub_c.registry.models import BaseModel
from adapterhub_c.registry.store import Registry


def load_base_model(reg: Registry, base: BaseModel, device: str | None = "cpu", dtype=torch.float32):
    """(model, tokenizer) of a registered base with stored weights, in eval mode."""
    from transformers import AutoTokenizer

    if base.is_reference:
        raise UsageError(f"base {base.name!r} is only a reference; fetch its weights with `adapt base add {base.name}`")
    folder = reg.materialize(base)
    model = load_model(folder, dtype)  # a GGUF base: its dequantized tensors
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(device)).eval()
    return model, tokenizer


def load_base_tokenizer(reg: Registry, base: BaseModel):
    """The tokenizer of a registered base (no weights loaded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reg.materialize(base))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_label(base: BaseModel) -> str:
    """The name a pack or PEFT config records for its base (Hub id when known)."""
    return base.hub_id or base.name


def linear_weights(reg: Registry, base: BaseModel, variant=None, modules=None, device: str | None = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """{module: float32 [out, in] weight} of the decoder-block linears of a base (or of its
    variant: pruned and dequantized, the weights a DoRA adapter attached to it sees).

    ``modules``: only these names. A Conv1D weight comes back transposed, like every layer.
    """
    from adapterhub_c.models.arch import describe
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.variants.quantize import dequantize_linear

    if variant is not None:
        model = load_variant(reg, variant, device)
    else:
        model, _ = load_base_model(reg, base, device)
    wanted = set(modules) if modules is not None else None
    out = {}
    for name, info in describe(model, warn=False).linears().items():
        if wanted is None or name in wanted:
            out[name] = dequantize_linear(info.module).detach().float().cpu()
    if wanted is not None and wanted - set(out):
        missing = sorted(wanted - set(out))
        raise UsageError(f"{base.name}: no decoder-block linear layers {', '.join(missing[:5])}")
    return out
