"""Checking merge/compose inputs and laying their layers out module by module.

Modules that some inputs do not adapt are merged as if those inputs had ΔW = 0 there
(the union of modules; a zero neither votes nor counts in TIES).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from adapterhub_c.adapters.lora import LoraAdapter, LoraLayer, check_lora_config
from adapterhub_c.errors import UsageError

_FACTOR_KEY = re.compile(r"\.lora_[AB]\.weight$")


def dora_as_lora(adapter: LoraAdapter, weights: Mapping[str, torch.Tensor]) -> LoraAdapter:
    """A DoRA adapter as the plain LoRA of its weight-space update, exactly.

    Per module ΔW = m / ‖W + s·B·A‖_c · (W + s·B·A) − W (``adapters.lora.dora_delta``; W
    from ``weights``, [out, in], the model the adapter is attached to), factored exactly
    as ΔW · I (rank = min(out, in)); merging then acts on the true ΔW and truncates it to
    the output rank. A plain LoRA is returned unchanged.
    """
    if not adapter.is_dora:
        return adapter
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in adapter.tensors.values()) else torch.float32
    layers = {}
    for module, layer in adapter.layers().items():
        if module not in weights:
            raise UsageError(f"DoRA module {module}: no base weight given")
        if layer.bias is not None:
            raise UsageError(f"DoRA module {module} has a LoRA bias: no merge rule")
        w = weights[module].to(device=layer.A.device)
        delta = layer.dora_delta(w, dtype)
        out_f, in_f = delta.shape
        eye = torch.eye(min(out_f, in_f), dtype=dtype, device=delta.device)
        A, B = (eye, delta) if in_f <= out_f else (delta, eye)
        layers[module] = LoraLayer(A=A.contiguous(), B=B.contiguous(), scale=1.0)
    config = {k: v for k, v in adapter.config.items() if k != "use_dora"}
    out = LoraAdapter.from_layers(layers, config)
    out.config["base_model_name_or_path"] = adapter.config.get("base_model_name_or_path")
    out.config["modules_to_save"] = adapter.config.get("modules_to_save")
    out.tensors.update(adapter.full_tensors())
    return out


@dataclass
class ModuleInputs:
    """One module across the N inputs: per input a LoraLayer or None (not adapted)."""

    name: str
    layers: list[LoraLayer | None]
    out_features: int
    in_features: int

    @property
    def ranks(self) -> list[int]:
        return [layer.rank if layer is not None else 0 for layer in self.layers]


def input_names(adapters: Sequence[LoraAdapter], names: Sequence[str] | None) -> list[str]:
    """Caller-given names, or ``input 1..N``."""
    if names is None:
        return [f"input {i + 1}" for i in range(len(adapters))]
    if len(names) != len(adapters):
        raise UsageError(f"got {len(names)} names for {len(adapters)} adapters")
    return [str(n) for n in names]


def check_inputs(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> None:
    """Refuse inputs that cannot be merged faithfully (UsageError naming the culprit)."""
    if not adapters:
        raise UsageError("no adapters given")
    for adapter, name in zip(adapters, names, strict=False):
        if not isinstance(adapter, LoraAdapter):
            raise UsageError(f"{name}: not a LoraAdapter ({type(adapter).__name__})")
        check_lora_config(adapter.config, name)
        full = adapter.full_tensors()  # modules_to_save copies: averaged (full_tensor_average)
        extra = [k for k in adapter.tensors if not _FACTOR_KEY.search(k) and k not in full]
        if extra:
            # biases (lora_bias), embedding LoRAs, DoRA magnitudes not turned into weight
            # space first (dora_as_lora): no merge rule
            raise UsageError(f"{name}: cannot merge non-LoRA-factor tensor {extra[0]!r}"
                             f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}")
        if not adapter.modules():
            raise UsageError(f"{name}: adapter has no LoRA layers")
    base0 = adapters[0].config.get("base_model_name_or_path")
    for adapter, name in zip(adapters[1:], names[1:], strict=False):
        base = adapter.config.get("base_model_name_or_path")
        if base != base0:
            raise UsageError(f"adapters are for different bases: {names[0]} targets {base0!r}, "
                             f"{name} targets {base!r}")


def module_inputs(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> list[ModuleInputs]:
    """The union of adapted modules, sorted by name, each with its per-input layers."""
    per_input = [a.layers() for a in adapters]
    modules = sorted(set().union(*per_input))
    out = []
    for module in modules:
        layers = [layers.get(module) for layers in per_input]
        shapes = {(layer.B.shape[0], layer.A.shape[1]) for layer in layers if layer is not None}
        if len(shapes) != 1:
            raise UsageError(f"module {module}: inputs disagree on its shape {sorted(shapes)}")
        for layer, name in zip(layers, names, strict=False):
            if layer is not None and layer.B.shape[1] != layer.A.shape[0]:
                raise UsageError(f"{name}: {module} has lora_A rank {layer.A.shape[0]} "
                                 f"but lora_B rank {layer.B.shape[1]}")
        (out_f, in_f), = shapes
        out.append(ModuleInputs(name=module, layers=layers, out_features=out_f, in_features=in_f))
    return out


def compute_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    """float64 if any input is float64, else float32 (never merge in half precision)."""
    dtypes = {t.dtype for a in adapters for t in a.tensors.values()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def output_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    """The dtype the result is stored in: that of the first input's factors."""
    first = adapters[0]
    factors = [t for k, t in first.tensors.items() if _FACTOR_KEY.search(k)]
    return (factors or list(first.tensors.values()))[0].dtype


def input_device(adapters: Sequence[LoraAdapter]) -> torch.device:
    """Where the inputs live (the merge runs there)."""
    return next(iter(adapters[0].tensors.values())).device


def output_base_config(adapters: Sequence[LoraAdapter]) -> dict:
    """The first input's config minus what the merge redefines (rank, alpha, patterns)."""
    drop = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
            "target_modules", "modules_to_save", "lora_bias", "layers_to_transform", "layers_pattern",
            "exclude_modules")
    config = {k: v for k, v in adapters[0].config.items() if k not in drop}
    config["lora_bias"] = False
    return config


def stack_padded(layers: list[LoraLayer | None], factor: str, rank: int, shape_other: int,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Stack A ([N, rank, in]) or B ([N, out, rank]) zero-padded to ``rank``; None → zeros."""
    n = len(layers)
    if factor == "A":
        out = torch.zeros(n, rank, shape_other, dtype=dtype, device=device)
        for i, layer in enumerate(layers):
            if layer is not None:
                out[i, :layer.rank] = layer.A.to(device=device, dtype=dtype)
    else:
        out = torch.zeros(n, shape_other, rank, dtype=dtype, device=device)
        for i, layer in enumerate(layers):
            if layer is not None:
                out[i, :, :layer.rank] = layer.B.to(device=device, dtype=dtype)
    return out


def full_tensor_average(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> tuple[dict, list[str]]:
    """``modules_to_save`` copies merged by weighted average: (tensors, warnings).

    Each full tensor (e.g. a retrained ``lm_head``) is Σ w_i·T_i / Σ w_i over the inputs that
    carry it (a plain mean when those weights sum to zero): full weights have no task vector
    to merge, so this is a heuristic, and the report says so.
    """
    keys = sorted({k for a in adapters for k in a.full_tensors()})
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        have = [(w, a.tensors[key]) for a, w in zip(adapters, weights, strict=False) if key in a.tensors]
        shapes = {tuple(t.shape) for _, t in have}
        if len(shapes) != 1:
            raise UsageError(f"full tensor {key}: inputs disagree on its shape {sorted(shapes)}")
        total = sum(w for w, _ in have)
        ws = [w / total for w, _ in have] if total else [1.0 / len(have)] * len(have)
        acc = sum(wi * t.double() for wi, (_, t) in zip(ws, have, strict=True))
        out[key] = acc.to(have[0][1].dtype).contiguous()
    warnings = []
    if keys:
        names = sorted({k[len("base_model.model."):].rsplit(".", 1)[0] for k in keys})
        warnings.append(f"modules_to_save tensors ({', '.join(names)}) merged by weighted average of the inputs "
                        "that carry them (full weights, not updates: a heuristic)")
    return out, warnings
