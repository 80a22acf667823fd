"""PEFT glue: attach a LoRA described by a config dict, copy tensors in, read it back out.

Module names here are bare (as in the unwrapped model, e.g. ``model.layers.0.self_attn.q_proj``);
PEFT's own names carry ``base_model.model.`` in front and ``.default`` inside.
"""
from __future__ import annotations

import dataclasses
import enum
import json

import torch
import torch.nn as nn

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.models.arch import is_linear
from adapterhub_c.training.recovery import CHILD, bare_name

ADAPTER = "default"


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
