"""Slicing base-shaped adapter tensors to an ``ffn-channels`` variant's kept channels.

An ``ffn-channels`` variant keeps some intermediate channels of every MLP (kept indices
per MLP, e.g. ``{"model.layers.0.mlp": tensor([...])}``). A tensor made for the base
follows them: the rows of an MLP input linear (gate/up, fused gate_up: the kept channels in
every half, c_fc, …) and the columns of the MLP output linear. The MLP pairing is
``models.arch``'s description of the variant, so any architecture it describes works.

One implementation for every consumer: conversion (``training.convert``), the compensated
conversion (``training.compensate``), the runtime loader and the server.
"""
from __future__ import annotations

from typing import Mapping

import torch

from adapterhub_c.adapters.lora import LoraAdapter, LoraLayer
from adapterhub_c.errors import UsageError
from adapterhub_c.models.arch import Architecture

KeptIndices = Mapping[str, torch.Tensor]


def ffn_slice(name: str, kept_indices: KeptIndices | None, arch: Architecture | None
              ) -> tuple[str, torch.Tensor, int] | None:
    """How an ffn-channels variant slices the base's [out, in] layer ``name``: ("rows", kept, halves)
    for an MLP input linear (the kept channels in every half of a fused gate/up), ("cols", kept, 1)
    for the MLP output linear, or None (not an MLP linear, or no kept indices for its MLP).

    UsageError when ``kept_indices`` names the layer's parent but ``arch`` has no MLP there."""
    parent, _, leaf = name.rpartition(".")
    kept = (kept_indices or {}).get(parent)
    if kept is None:
        return None
    mlp = arch.mlp_of(parent) if arch is not None else None
    if mlp is None:
        raise UsageError(f"{name}: the variant has no MLP at {parent} to slice to its kept channels")
    kept = torch.as_tensor(kept, dtype=torch.long)
    if leaf in mlp.inputs:
        return "rows", kept, mlp.halves.get(leaf, 1)
    if leaf == mlp.output:
        return "cols", kept, 1
    return None


def channel_rows(kept: torch.Tensor, halves: int, size: int) -> torch.Tensor:
    """Rows of a base-sized input linear of ``size`` rows that hold channels ``kept``, every half."""
    return torch.cat([kept + j * (size // halves) for j in range(halves)])


def slice_to_variant(weight: torch.Tensor, name: str, kept_indices: KeptIndices | None,
                     arch: Architecture | None = None) -> torch.Tensor:
    """A base-shaped [out, in] tensor of ``name`` sliced to an ffn-channels variant's kept channels."""
    how = ffn_slice(name, kept_indices, arch)
    if how is None:
        return weight
    axis, kept, halves = how
    if axis == "rows":
        return weight.index_select(0, channel_rows(kept, halves, weight.shape[0]).to(weight.device))
    return weight.index_select(1, kept.to(weight.device))


def slice_lora_layer(layer: LoraLayer, name: str, kept_indices: KeptIndices | None,
                     arch: Architecture | None) -> LoraLayer:
    """``layer`` (the source's LoRA at ``name``) sliced to an ffn-channels variant: B's rows, the
    bias and a DoRA magnitude for an MLP input linear, A's columns for the MLP output linear.
    Unsliced layers come back as they are (same object)."""
    how = ffn_slice(name, kept_indices, arch)
    if how is None:
        return layer
    axis, kept, halves = how
    if axis == "cols":
        return LoraLayer(A=layer.A.index_select(1, kept), B=layer.B, scale=layer.scale, bias=layer.bias,
                         magnitude=layer.magnitude)
    rows = channel_rows(kept, halves, layer.B.shape[0])

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, rows)

    return LoraLayer(A=layer.A, B=pick(layer.B), scale=layer.scale, bias=pick(layer.bias),
                     magnitude=pick(layer.magnitude))


def target_factors(source: LoraAdapter, mapping: dict[str, str], kept_indices: KeptIndices | None,
                   arch: Architecture | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per target module {"A", "B", "bias"?, "magnitude"?} of ``source``: the source modules
    renamed by ``mapping`` (source module → target module; others left out) and sliced to an
    ffn-channels variant's kept channels (:func:`slice_lora_layer`)."""
    out = {}
    for src, layer in source.layers().items():
        if src not in mapping:
            continue
        name = mapping[src]
        sliced = slice_lora_layer(layer, name, kept_indices, arch)
        parts = {"A": sliced.A, "B": sliced.B}
        if sliced.bias is not None:
            parts["bias"] = sliced.bias
        if sliced.magnitude is not None:
            parts["magnitude"] = sliced.magnitude
        out[name] = parts
    return out


__all__ = ["ffn_slice", "channel_rows", "slice_to_variant", "slice_lora_layer", "target_factors"]
