"""Loading registered models into memory."""
from __future__ import annotations

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.models.device import resolve_device
from adapterhub_c.registry.models import BaseModel
from adapterhub_c.registry.store import Registry


def load_base_model(reg: Registry, base: BaseModel, device: str | None = "cpu", dtype=torch.float32):
    """(model, tokenizer) of a registered base with stored weights, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base.is_reference:
        raise UsageError(f"base {base.name!r} is only a reference; fetch its weights with `adapt base add {base.name}`")
    folder = reg.materialize(base)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
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
