"""Checking a downloaded (or about to be pushed) PEFT LoRA folder before anyone uses it.

What is checked, in order, with messages that name the file or tensor at fault:
config present, valid JSON and LoRA (not DoRA, not another PEFT type); the safetensors
header parses and every tensor lies inside the file; every ``lora_A`` has its ``lora_B``;
shapes agree with ``r`` / ``rank_pattern`` (A is [r, in], B is [out, r]); module names are
matched by ``target_modules`` (a list of name suffixes, a regex string, or ``all-linear``).
rsLoRA, ``alpha_pattern``, ``rank_pattern``, LoRA biases and ``modules_to_save`` are carried.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from adapterhub_c.adapters.lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME, LoraAdapter, _pattern_value, check_lora_config
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import read_safetensors_header

_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)(\.[^.]+)?\.weight$")
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
    module = m["module"]
    return (module[len(PREFIX):] if module.startswith(PREFIX) else module), m["factor"]


def validate_lora_folder(path: str | Path) -> LoraAdapter:
    """Validate a PEFT LoRA folder and return it loaded as a :class:`LoraAdapter`.

    Raises UsageError for folders that are not (supported) LoRA adapters and
    IntegrityError for corrupt weights or tensors that contradict the config.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise UsageError(f"{path}: no {CONFIG_NAME}; not a PEFT adapter folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{cfg_path}: expected a JSON object")
    check_lora_config(config, str(path))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (path / p).is_file()]
        if pickles:
            raise UsageError(f"{path}: only pickle weights ({', '.join(pickles)}); "
                             f"adapterhub-c reads {WEIGHTS_NAME} only and never unpickles")
        raise UsageError(f"{path}: no {WEIGHTS_NAME}")
    header = read_safetensors_header(weights)
    _check_shapes(config, header, weights)
    return LoraAdapter.from_folder(path)


def _check_shapes(config: dict, header: dict, weights: Path) -> None:
    """Every factor pairs up, agrees with the configured rank and is a targeted module."""
    r_default = config["r"]
    factors: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        parsed = _module_of(key)
        if parsed is None:
            continue
        module, factor = parsed
        factors.setdefault(module, {})[factor] = (key, info["shape"])
    if not factors:
        raise IntegrityError(f"{weights}: no lora_A / lora_B tensors")
    target = config.get("target_modules")
    for module, pair in sorted(factors.items()):
        for need in ("lora_A", "lora_B"):
            if need not in pair:
                other = next(iter(pair.values()))[0]
                raise IntegrityError(f"{weights}: tensor {other} has no matching {need} tensor")
        (a_key, a_shape), (b_key, b_shape) = pair["lora_A"], pair["lora_B"]
        r = _pattern_value(config.get("rank_pattern"), module, r_default)
        if len(a_shape) < 2 or a_shape[0] != r:
            raise IntegrityError(f"{weights}: tensor {a_key} has shape {a_shape}; expected "
                                 f"[r={r}, in_features] for rank {r}")
        if len(b_shape) < 2 or b_shape[1] != r:
            raise IntegrityError(f"{weights}: tensor {b_key} has shape {b_shape}; expected "
                                 f"[out_features, r={r}] for rank {r}")
        if not _target_matches(target, module):
            raise IntegrityError(f"{weights}: tensor {a_key} adapts module {module!r}, which "
                                 f"target_modules {target!r} does not match")
