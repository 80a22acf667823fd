"""Hugging Face ↔ GGUF tensor names, and the q/k row order llama.cpp expects for Llama.

The GGUF names come from the ``gguf`` package's ``TensorNameMap`` (the table llama.cpp's own
converter uses); the Hugging Face names are those of the families we export, listed in
:data:`FAMILIES` (``gguf_arch`` refuses any other ``model_type``, naming it).

Row permutation: llama.cpp's Llama graph applies rotary embeddings to interleaved pairs
(``x[2i], x[2i+1]``) while transformers rotates halves (``x[i], x[i + d/2]``), so its
converter reorders the rows of ``q_proj`` and ``k_proj`` (and of their biases) head by head:
a head's rows ``[h0 … h(d/2-1) | h(d/2) … h(d-1)]`` become ``h0, h(d/2), h1, h(d/2+1), …``.
``k_proj`` is reordered with the KV head count. Qwen2 uses NeoX-style rotation in llama.cpp,
so nothing is reordered there. This module is the only place that knows this; a LoRA's B
(rows = output units) is reordered the same way as the weight it adapts.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import gguf
import torch

from adapterhub_c.errors import AdaptError, UsageError

# HF model_type → (llama.cpp architecture, q/k rows reordered for interleaved rotary)
FAMILIES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
}
# the module names of the Llama-style decoders above (Qwen2 adds q/k/v biases)
_GLOBAL_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
_BLOCK_MODULES = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SUFFIXES = (".weight", ".bias")
_PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a config dict or a transformers ``PretrainedConfig`` (``default`` if absent)."""
    if isinstance(config, dict):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def gguf_arch(hf_model_type: str | None) -> str:
    """The llama.cpp architecture name for a Hugging Face ``model_type``; AdaptError for another family."""
    family = FAMILIES.get(hf_model_type or "")
    if family is None:
        raise AdaptError(f"GGUF export supports the {', '.join(sorted(FAMILIES))} families, not "
                         f"{hf_model_type!r}")
    return family[0]


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    for value, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch and name in {a for a, _ in FAMILIES.values()}:
            return value
    raise AdaptError(f"GGUF architecture {arch!r} is not one we read or write "
                     f"({', '.join(sorted(a for a, _ in FAMILIES.values()))})")


@lru_cache(maxsize=32)
def _name_tables(arch: str, n_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    """({hf tensor name: gguf name}, its inverse) for every tensor of an ``n_layers`` model."""
    tmap = gguf.get_tensor_name_map(_model_arch(arch), n_layers)
    modules = list(_GLOBAL_MODULES) + [f"model.layers.{i}.{m}" for i in range(n_layers) for m in _BLOCK_MODULES]
    forward: dict[str, str] = {}
    for module in modules:
        target = tmap.get_name(module)
        if target is None:  # the gguf package's table has no name for it: a bug in FAMILIES
            raise AdaptError(f"the gguf package names no {arch} tensor for {module}")
        for suffix in _SUFFIXES:
            forward[module + suffix] = target + suffix
    return forward, {g: h for h, g in forward.items()}


def hf_to_gguf(arch: str, hf_name: str, n_layers: int) -> str:
    """The GGUF name of Hugging Face tensor ``hf_name`` (e.g. ``blk.0.attn_q.weight``); UsageError if none."""
    name = _name_tables(arch, n_layers)[0].get(hf_name)
    if name is None:
        raise UsageError(f"{hf_name} has no llama.cpp ({arch}) tensor name")
    return name


def gguf_to_hf(arch: str, gguf_name: str, n_layers: int) -> str:
    """The Hugging Face name of GGUF tensor ``gguf_name``; UsageError for a tensor we do not know."""
    name = _name_tables(arch, n_layers)[1].get(gguf_name)
    if name is None:
        raise UsageError(f"GGUF tensor {gguf_name} is not part of a {n_layers}-layer {arch} model")
    return name


def _heads_for(name: str, config: Any) -> int | None:
    """The head count whose rows ``name`` reorders (None: the tensor is not reordered)."""
    family = FAMILIES.get(config_value(config, "model_type", ""))
    if family is None or not family[1]:
        return None
    module = name.rsplit(".", 1)[0]
    if not module.endswith(_PERMUTED):
        return None
    heads = config_value(config, "num_attention_heads")
    if module.endswith("k_proj"):
        heads = config_value(config, "num_key_value_heads", heads)
    return int(heads)


def permute_for_gguf(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    """``tensor`` (HF weight / bias / LoRA B of module weight ``name``) in llama.cpp's row order."""
    heads = _heads_for(name, config)
    if heads is None:
        return tensor
    rows = tensor.shape[0]
    return (tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:])
            .transpose(1, 2).reshape(tensor.shape))


def unpermute_from_gguf(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    """The inverse of :func:`permute_for_gguf`: llama.cpp's row order back to Hugging Face's."""
    heads = _heads_for(name, config)
    if heads is None:
        return tensor
    rows = tensor.shape[0]
    return (tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:])
            .transpose(1, 2).reshape(tensor.shape))
