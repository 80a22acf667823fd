"""Checking a downloaded (or about to be pushed) PEFT LoRA folder before anyone uses it.

What is checked, in order, with messages that name the file or tensor at fault:
config present, valid JSON and LoRA (DoRA included, not another PEFT type); the safetensors
header parses and every tensor lies inside the file; every ``lora_A`` has its ``lora_B``;
shapes agree with ``r`` / ``rank_pattern`` (A is [r, in], B is [out, r]); a DoRA adapter
(``use_dora``) has a magnitude vector [out] per module, and only a DoRA adapter has one;
embedding LoRAs pair ``lora_embedding_A`` [r, vocab] with ``lora_embedding_B`` [hidden, r];
keys with an adapter name inside (``.default.``) or without ``base_model.model.`` are read
under their canonical names; Kohya-style ``lora_down``/``lora_up`` files are refused;
module names are matched by ``target_modules`` (a list of name suffixes, a regex string, or
``all-linear``). rsLoRA, ``alpha_pattern``, ``rank_pattern``, LoRA biases and
``modules_to_save`` are carried. Last, the checks attaching runs before it touches a model
(``adapters.attach.check_attachable``: PEFT accepts the config, LoRA biases fit): what validates, loads.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from adapterhub_c.adapters.attach import check_attachable
from adapterhub_c.adapters.lora import (
    PREFIX,
    WEIGHTS_NAME,
    LoraAdapter,
    canonical_key,
    pattern_value,
    read_folder_config,
)
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import read_safetensors_header

_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)(\.[^.]+)?\.weight$"
                        r"|^(?P<mmodule>.+)\.(?P<mfactor>lora_magnitude_vector)(\.[^.]+)?(\.weight)?$")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")


def _target_matches(target, module: str) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches exact names or suffixes."""
    if target is None or target == "all-linear":
        return True
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def _module_of(key: str) -> tuple[str, str] | None:
    m = _FACTOR_RE.match(key)
    if not m:
        return None
    module, factor = (m["module"], m["factor"]) if m["module"] else (m["mmodule"], m["mfactor"])
    return (module[len(PREFIX):] if module.startswith(PREFIX) else module), factor


def validate_lora_folder(path: str | Path) -> LoraAdapter:
    """Validate a PEFT LoRA folder and return it loaded as a :class:`LoraAdapter`.

    Raises UsageError for folders that are not (supported) LoRA adapters and
    IntegrityError for corrupt weights or tensors that contradict the config.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder")
    config = read_folder_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (path / p).is_file()]
        if pickles:
            raise UsageError(f"{path}: only pickle weights ({', '.join(pickles)}); "
                             f"adapterhub-c reads {WEIGHTS_NAME} only and never unpickles")
        raise UsageError(f"{path}: no {WEIGHTS_NAME}")
    header = read_safetensors_header(weights)
    _refuse_kohya(header, weights)
    header = {canonical_key(k) if k != "__metadata__" else k: v for k, v in header.items()}
    _check_shapes(config, header, weights)
    adapter = LoraAdapter.from_folder(path)
    _check_values(adapter, weights)
    try:
        check_attachable(adapter)  # what use runs first: a folder that validates, loads
    except UsageError as e:
        raise UsageError(f"{weights}: not a valid LoRA: {e}") from None
    return adapter


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max().double()) if t.numel() else 0.0


def _check_values(adapter: LoraAdapter, weights: Path) -> None:
    """Every tensor is floating point and finite: integer or NaN weights load but cannot be used."""
    for key, tensor in adapter.tensors.items():
        if not tensor.is_floating_point():
            raise IntegrityError(f"{weights}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; "
                                 "adapter weights must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise IntegrityError(f"{weights}: tensor {key} holds NaN or infinite values")
    # each entry of s·B·A is at most r·s·max|A|·max|B|: when that bound is finite, so is ΔW
    for module, layer in adapter.layers().items():
        bound = layer.rank * abs(layer.scale) * _max_abs(layer.A) * _max_abs(layer.B)
        if not bound < FLOAT32_MAX:
            raise IntegrityError(f"{weights}: module {module}: its factors' values are so large that "
                                 "scale · B @ A overflows float32")


def _refuse_kohya(header: dict, weights: Path) -> None:
    """Kohya-style files (``lora_down`` / ``lora_up`` / ``alpha``) are refused, with the reason."""
    kohya = [k for k in header if k.endswith((".lora_down.weight", ".lora_up.weight"))]
    if kohya:
        raise UsageError(kohya_message(f"{weights}: tensor {kohya[0]}"))


def kohya_message(where: str) -> str:
    """Why a Kohya-style LoRA is refused (one line)."""
    return (f"{where} is a Kohya-style LoRA (lora_down / lora_up / alpha), not a PEFT adapter; refused: its "
            "module names are flattened with underscores and cannot be mapped to a model's modules without "
            "guessing. Convert it to a PEFT folder first (adapter_config.json + lora_A/lora_B keys)")


def _check_embedding_factors(header: dict, weights: Path) -> None:
    """Embedding LoRA: every lora_embedding_A [r, vocab] has its lora_embedding_B [hidden, r]."""
    for key, info in header.items():
        if not key.endswith(".lora_embedding_A"):
            continue
        other = key[: -len("A")] + "B"
        if other not in header:
            raise IntegrityError(f"{weights}: tensor {key} has no matching lora_embedding_B tensor")
        a, b = info["shape"], header[other]["shape"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise IntegrityError(f"{weights}: embedding LoRA {key} {a} and {other} {b} disagree on the rank")


def _factors_by_module(header: dict) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """{module: {factor: (tensor key, shape)}} of the LoRA / DoRA tensors in a safetensors header."""
    factors: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, info in header.items():
        parsed = None if key == "__metadata__" else _module_of(key)
        if parsed is not None:
            module, factor = parsed
            factors.setdefault(module, {})[factor] = (key, info["shape"])
    return factors


def _check_pairing(module: str, pair: dict, mag, dora: bool, weights: Path) -> None:
    """The module has lora_A and lora_B, and a magnitude vector exactly when the adapter is DoRA."""
    if mag is not None and not dora:
        raise IntegrityError(f"{weights}: tensor {mag[0]} is a DoRA magnitude vector but "
                             "adapter_config.json does not set use_dora")
    if mag is None and dora:
        raise UsageError(f"{weights}: a DoRA adapter (use_dora) but module {module!r} has no "
                         "lora_magnitude_vector tensor")
    if not pair:
        raise IntegrityError(f"{weights}: tensor {mag[0]} has no matching lora_A / lora_B tensors")
    for need in ("lora_A", "lora_B"):
        if need not in pair:
            other = next(iter(pair.values()))[0]
            raise IntegrityError(f"{weights}: tensor {other} has no matching {need} tensor")


def _check_module(config: dict, module: str, pair: dict, weights: Path) -> None:
    """One module's factors: paired, shaped for its rank (``rank_pattern``), and targeted."""
    mag = pair.pop("lora_magnitude_vector", None)
    _check_pairing(module, pair, mag, bool(config.get("use_dora")), weights)
    (a_key, a_shape), (b_key, b_shape) = pair["lora_A"], pair["lora_B"]
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    if len(a_shape) < 2 or a_shape[0] != r:
        raise IntegrityError(f"{weights}: tensor {a_key} has shape {a_shape}; expected "
                             f"[r={r}, in_features] for rank {r}")
    if len(b_shape) < 2 or b_shape[1] != r:
        raise IntegrityError(f"{weights}: tensor {b_key} has shape {b_shape}; expected "
                             f"[out_features, r={r}] for rank {r}")
    if mag is not None and (len(mag[1]) != 1 or mag[1][0] != b_shape[0]):
        raise IntegrityError(f"{weights}: tensor {mag[0]} has shape {mag[1]}; expected "
                             f"[out_features={b_shape[0]}] like {b_key}")
    target = config.get("target_modules")
    if not _target_matches(target, module):
        raise IntegrityError(f"{weights}: tensor {a_key} adapts module {module!r}, which "
                             f"target_modules {target!r} does not match")


def _check_shapes(config: dict, header: dict, weights: Path) -> None:
    """Every factor pairs up, agrees with the configured rank and is a targeted module."""
    factors = _factors_by_module(header)
    _check_embedding_factors(header, weights)
    if not factors and not any(k.endswith(".lora_embedding_A") for k in header):
        raise IntegrityError(f"{weights}: no lora_A / lora_B tensors")
    for module, pair in sorted(factors.items()):
        _check_module(config, module, pair, weights)
