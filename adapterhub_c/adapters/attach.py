"""Attaching adapters to a model through PEFT: one implementation for every consumer.

Training (conversion, the CA-LoRA student), the runtime loader, the alpha search of packing
and the workflows all attach a registered LoRA the same way: :func:`attach_source_lora`
(PEFT LoRA with the source's config on the modules the source names, retargeted to the
model's names and sliced to an ffn-channels variant) and :func:`load_adapted` (that, plus
recovery modules, frozen and in eval mode).

Module names here are bare (as in the unwrapped model, e.g. ``model.layers.0.self_attn.q_proj``);
PEFT's own names carry ``base_model.model.`` in front and ``.default`` inside.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter
from adapterhub_c.adapters.recovery import (
    CHILD,
    FILE_NAME,
    RecoveryConfig,
    bare_name,
    load_recovery,
    read_recovery_file,
)
from adapterhub_c.adapters.slicing import KeptIndices, target_factors
from adapterhub_c.errors import UsageError
from adapterhub_c.models import arch as archmod
from adapterhub_c.models.arch import is_linear

ADAPTER = "default"
_BIAS = ".lora_B.bias"
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", _BIAS, ".lora_magnitude_vector")


def linear_names(model: nn.Module) -> list[str]:
    """Bare names of every linear layer (``nn.Linear``, bnb layers, Conv1D) of an unwrapped model."""
    return [n for n, m in model.named_modules() if is_linear(m)]


def adaptable_names(model: nn.Module) -> list[str]:
    """Linear layers and embeddings (an embedding LoRA adapts ``nn.Embedding``), bare names."""
    return [n for n, m in model.named_modules() if is_linear(m) or isinstance(m, nn.Embedding)]


def json_config(config) -> dict:
    """A PEFT config (object or dict) as plain JSON data (sets → sorted lists, enums → values)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def default(o):
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if isinstance(o, enum.Enum):
            return o.value
        raise TypeError(f"cannot store {type(o).__name__} in adapter_config.json")

    return json.loads(json.dumps(data, default=default))


def lora_config(config: dict, target_modules=None):
    """A ``peft.LoraConfig`` from an adapter_config dict (unknown keys dropped), for training."""
    from peft import LoraConfig

    init_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    # the base is whatever model the LoRA is attached to (PEFT warns when the names differ)
    kwargs = {k: v for k, v in config.items() if k in init_fields and k != "base_model_name_or_path"}
    kwargs.update(inference_mode=False, task_type="CAUSAL_LM")
    for k in ("rank_pattern", "alpha_pattern"):
        kwargs[k] = kwargs.get(k) or {}
    if target_modules is not None:
        kwargs["target_modules"] = target_modules
    return LoraConfig(**kwargs)


def retarget(source_modules: list[str], model: nn.Module) -> dict[str, str]:
    """{source module: model module} for the adaptable linears of ``model`` (see :func:`retarget_names`)."""
    return retarget_names(source_modules, adaptable_names(model))


def retarget_names(source_modules: list[str], names: list[str]) -> dict[str, str]:
    """{source module: module of ``names``}: same name, else the one name that ends with the
    source's (or vice versa). UsageError naming every module not found."""
    present = set(names)
    mapping, missing = {}, []
    for src in source_modules:
        if src in present:
            mapping[src] = src
            continue
        hits = [n for n in names if n.endswith("." + src) or src.endswith("." + n)]
        if len(hits) == 1:
            mapping[src] = hits[0]
        else:
            missing.append(src)
    if missing:
        raise UsageError(f"the adapter targets modules the model does not have: {', '.join(missing[:8])}"
                         + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    return mapping


def peft_targets(config: dict, wanted: list[str], model: nn.Module):
    """The ``target_modules`` to give PEFT so that exactly ``wanted`` get a LoRA: the
    config's own value when it selects exactly those in ``model``, else the explicit names."""
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = lora_config(config)
    if cfg.target_modules is None:  # null in the config: PEFT would guess by model type; the weights say
        return sorted(wanted)
    selected = {n for n in adaptable_names(model) if check_target_module_exists(cfg, n)}
    if selected == set(wanted):
        return cfg.target_modules
    return sorted(wanted)


def attach_lora(model: nn.Module, config: dict, modules: list[str]):
    """Wrap ``model`` (in place) with a PEFT LoRA on exactly ``modules`` (bare names)."""
    from peft import get_peft_model

    targets = peft_targets(config, modules, model)
    peft_model = get_peft_model(model, lora_config(config, targets))
    got = set(lora_layers(peft_model))
    if got != set(modules):
        raise UsageError(f"PEFT adapted {sorted(got ^ set(modules))[:5]} differently from what was asked")
    return peft_model


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """{bare name: PEFT LoRA layer} of the default adapter."""
    from peft.tuners.lora import LoraLayer

    return {bare_name(n): m for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and (ADAPTER in m.lora_A or ADAPTER in getattr(m, "lora_embedding_A", {}))}


@torch.no_grad()
def copy_lora(peft_model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``{bare module: {"A", "B", "bias"?, "magnitude"?}}`` into the default adapter, checking shapes."""
    layers = lora_layers(peft_model)
    for module, parts in tensors.items():
        layer = layers[module]
        mags = getattr(layer, "lora_magnitude_vector", {})
        if parts.get("magnitude") is not None and ADAPTER not in mags:
            raise UsageError(f"{module}: a DoRA magnitude vector but the attached layer is plain LoRA")
        magnitude = mags[ADAPTER].weight if ADAPTER in mags else None
        for key, target in (("A", layer.lora_A[ADAPTER].weight), ("B", layer.lora_B[ADAPTER].weight),
                            ("bias", getattr(layer.lora_B[ADAPTER], "bias", None)), ("magnitude", magnitude)):
            value = parts.get(key)
            if value is None:
                continue
            if target is None or tuple(value.shape) != tuple(target.shape):
                got = None if target is None else tuple(target.shape)
                raise UsageError(f"LoRA {key} of {module} has shape {tuple(value.shape)} but the model's "
                                 f"layer needs {got} (an ffn-channels variant needs its kept indices)")
            target.copy_(value.to(target.device, target.dtype))


def extract_lora(peft_model: nn.Module) -> LoraAdapter:
    """The default adapter as a ``LoraAdapter`` (PEFT keys; base_model_name_or_path left unset)."""
    from peft import get_peft_model_state_dict

    # PEFT counts every tensor inside a LoRA layer as the adapter's, recovery included
    full = {k: v for k, v in peft_model.state_dict().items() if f".{CHILD}." not in k}
    state = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=ADAPTER)
    config = json_config(peft_model.peft_config[ADAPTER])
    config["base_model_name_or_path"] = None
    config["inference_mode"] = True
    return LoraAdapter(config=config, tensors={k: v.detach().cpu().clone() for k, v in state.items()})



def check_attachable(source: LoraAdapter) -> None:
    """What attaching ``source`` asks of the adapter alone, before any model: PEFT accepts its config,
    and every LoRA bias (``lora_B.bias``) belongs to a module with both factors, is [out] like its
    lora_B, and has ``lora_bias: true`` in the config (PEFT gives lora_B a bias only then). UsageError
    naming the problem. :func:`attach_source_lora` runs it, and so does pull's validation: what pulls, loads."""
    try:
        cfg = lora_config(source.config)
    except (ValueError, TypeError) as e:
        raise UsageError(f"PEFT refuses its adapter_config.json ({str(e).splitlines()[0][:200]})") from None
    layers = source.layers()
    for key, tensor in sorted(source.tensors.items()):
        if not key.endswith(_BIAS):
            continue
        module = key[len(PREFIX):-len(_BIAS)] if key.startswith(PREFIX) else key[:-len(_BIAS)]
        if module not in layers:
            raise UsageError(f"tensor {key} is a LoRA bias of module {module!r}, which has no lora_A / lora_B")
        if not getattr(cfg, "lora_bias", False):
            raise UsageError(f"tensor {key} is a LoRA bias but adapter_config.json does not set lora_bias: true "
                             "(PEFT's lora_B has no bias then)")
        if tuple(tensor.shape) != (layers[module].B.shape[0],):
            raise UsageError(f"tensor {key} has shape {list(tensor.shape)}; expected "
                             f"[{layers[module].B.shape[0]}] like its lora_B")


def attach_source_lora(model: nn.Module, source: LoraAdapter, targets=None,
                       kept_indices: KeptIndices | None = None, copy: bool = True):
    """PEFT LoRA with the source's config on ``model`` (in place); returns (peft_model, module names).

    - ``targets``: only the source's modules equal to or ending in these names (default: all).
    - ``kept_indices``: an ffn-channels variant's kept channels; the source's factors are
      sliced to them (``adapters.slicing``).
    - ``copy``: copy the source's factors (and ``modules_to_save`` tensors) in; False leaves
      PEFT's fresh initialisation (B = 0).
    """
    if copy:
        check_attachable(source)
    modules = source.modules() + source.embedding_modules()
    if targets:
        modules = [m for m in modules if any(m == t or m.endswith("." + t) for t in targets)]
        if not modules:
            raise UsageError(f"the adapter has no modules matching {', '.join(targets)}")
    mapping = retarget(modules, model)
    arch = archmod.describe(model, warn=False) if kept_indices else None
    peft_model = attach_lora(model, source.config, sorted(mapping.values()))
    if copy:
        copy_lora(peft_model, target_factors(source, mapping, kept_indices, arch))
        copy_extra_tensors(peft_model, source)
    return peft_model, sorted(mapping.values())


def copy_extra_tensors(peft_model: nn.Module, source: LoraAdapter) -> None:
    """Load the source's non-LoRA tensors (``modules_to_save`` copies) when it has any."""
    extra = {k: v for k, v in source.tensors.items() if not k.endswith(_LORA_SUFFIXES)}
    if not extra:
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, extra, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise UsageError(f"the model has no place for adapter tensors {', '.join(result.unexpected_keys[:5])}")


def load_adapted(variant_model: nn.Module, lora: LoraAdapter, recovery_state: Any = None,
                 recovery_config: RecoveryConfig | dict | None = None,
                 kept_indices: KeptIndices | None = None) -> nn.Module:
    """A PEFT model of ``variant_model`` with ``lora`` (and recovery) attached, frozen, eval mode.

    ``recovery_state``: None, a {name: tensor} dict (then ``recovery_config`` gives its
    act/scale/dropout; default ``RecoveryConfig()``), or a path to ``recovery.safetensors``
    or to a folder holding one. ``kept_indices``: slice a base LoRA to an ffn-channels variant.
    """
    peft_model, _ = attach_source_lora(variant_model, lora, kept_indices=kept_indices)
    if recovery_state is not None:
        if isinstance(recovery_state, (str, Path)):
            path = Path(recovery_state)
            recovery_state, recovery_config = read_recovery_file(path / FILE_NAME if path.is_dir() else path)
        if isinstance(recovery_config, dict):
            recovery_config = RecoveryConfig.from_dict(recovery_config)
        load_recovery(peft_model, recovery_state, recovery_config or RecoveryConfig())
    peft_model.requires_grad_(False)
    return peft_model.eval()


__all__ = ["ADAPTER", "linear_names", "adaptable_names", "json_config", "lora_config", "retarget",
           "retarget_names", "peft_targets", "attach_lora", "lora_layers", "copy_lora", "extract_lora",
           "check_attachable", "attach_source_lora", "copy_extra_tensors", "load_adapted"]
