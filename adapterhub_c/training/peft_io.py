"""PEFT glue for training: placing a model, choosing and freezing the trainable parameters.

Attaching a LoRA, copying tensors in and reading them back out live in
:mod:`adapterhub_c.adapters.attach` (every consumer uses that one implementation); the
names are re-exported here for existing callers.
"""
from __future__ import annotations

import torch.nn as nn

from adapterhub_c.adapters.attach import (
    ADAPTER,
    adaptable_names,
    attach_lora,
    attach_source_lora,
    copy_extra_tensors,
    copy_lora,
    extract_lora,
    json_config,
    linear_names,
    load_adapted,
    lora_config,
    lora_layers,
    peft_targets,
    retarget,
    retarget_names,
)
from adapterhub_c.adapters.recovery import CHILD

__all__ = ["ADAPTER", "adaptable_names", "attach_lora", "attach_source_lora", "copy_extra_tensors", "copy_lora",
           "extract_lora", "json_config", "linear_names", "load_adapted", "lora_config", "lora_layers",
           "peft_targets", "retarget", "retarget_names", "is_quantized_model", "place", "lora_parameters",
           "recovery_parameters", "set_trainable"]


def is_quantized_model(model: nn.Module) -> bool:
    """True when the model holds bitsandbytes 8-bit or 4-bit linear layers."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bnb is a dependency
        return False
    return any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


def place(model: nn.Module, device: str) -> nn.Module:
    """Move a model to ``device`` unless it holds bnb layers (those stay where they were loaded)."""
    if not is_quantized_model(model):
        model.to(device)
    return model


def lora_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """{PEFT parameter name: parameter} of the default adapter's lora_A / lora_B (lora bias, DoRA magnitude)."""
    wanted = set()
    for layer in lora_layers(peft_model).values():
        if ADAPTER in getattr(layer, "lora_embedding_A", {}):  # an embedding LoRA: bare parameters
            wanted.update({id(layer.lora_embedding_A[ADAPTER]), id(layer.lora_embedding_B[ADAPTER])})
            continue
        wanted.update(id(p) for p in layer.lora_A[ADAPTER].parameters())
        wanted.update(id(p) for p in layer.lora_B[ADAPTER].parameters())
        if ADAPTER in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: the magnitude trains too
            wanted.update(id(p) for p in layer.lora_magnitude_vector[ADAPTER].parameters())
    return {n: p for n, p in peft_model.named_parameters() if id(p) in wanted}


def recovery_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of every recovery module (D, U)."""
    return {n: p for n, p in model.named_parameters() if f".{CHILD}." in f".{n}"
            and n.rsplit(".", 1)[-1] in ("D", "U")}


def set_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything but ``params``; assert the trainable set is exactly their names."""
    keep = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {n for n, _ in trainable}
    if names != set(params):
        raise AssertionError(f"trainable parameters differ from the expected set: {sorted(names ^ set(params))[:5]}")
    return trainable
