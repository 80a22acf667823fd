"""Quantization through bitsandbytes, applied when a variant is loaded.

Decision: a variant stores plain (pruned) weights; quantization happens at load time
through transformers' `BitsAndBytesConfig` passed to `from_pretrained`. With
bitsandbytes >= 0.48 this works on CPU as well as on CUDA (verified on CPU with bnb
0.50.2 and transformers 5: int8 → `bnb.nn.Linear8bitLt`, nf4/fp4 with or without
double quantization → `bnb.nn.Linear4bit`). Why this way:
- the model comes back marked `is_quantized` with its `hf_quantizer`, which is what
  PEFT inspects to wrap bnb layers (`peft.tuners.lora.bnb.Linear4bit` / `Linear8bitLt`);
- the stored blob is device-independent (bnb's packed layouts and states differ by
  backend and version), so one blob serves CPU and CUDA;
- the stored weights are the exact pruned weights, so adapters can also be evaluated
  against the unquantized variant.
Only the decoder-block linears are quantized unless `include_lm_head` (transformers'
default keeps the LM head in full precision); embeddings never are.

CPU finding (bnb 0.50.2): on a CPU with AVX512-BF16, the first eval-mode no-grad
forward of a `Linear4bit` repacks its weight IN PLACE into a CPU layout (absmax cast to
bf16, double quantization dissolved) and from then on computes through
`bitsandbytes::gemv_4bit` in bf16 — in train mode too — and that op has no autograd
kernel: after one evaluation, LoRA training on the model silently gets no gradients at
all (only a torch UserWarning). Results also change precision between eval and train.
`load_quantized` therefore turns that fast path off by default (`cpu_bf16_kernel=False`):
4-bit layers then dequantize and matmul in the compute dtype, as on CUDA.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub_c.errors import UsageError
from adapterhub_c.models.arch import linear_kind
from adapterhub_c.models.weights import from_state, gguf_weights, lazy_state, read_state

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _DropInt8CastNotice(logging.Filter):
    """bnb >= 0.45 logs (not warns) this on EVERY int8 forward with float32 inputs; it is by design of LLM.int8."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in str(record.msg)


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastNotice())


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a name ('float32', 'bfloat16', 'float16'), a dtype or None (default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def bnb_config(quant: str, double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
               include_lm_head: bool = False):
    """The transformers `BitsAndBytesConfig` for a quant method, or None for 'none'."""
    from transformers import BitsAndBytesConfig

    skip = [] if include_lm_head else None  # None → transformers skips the LM head
    if quant == "none":
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    raise UsageError(f"unknown quantization {quant!r}")


def device_map_for(device: str | torch.device) -> dict[str, str]:
    """A device_map placing the whole model on one device ('cpu', 'cuda', 'cuda:1')."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": str(device)}


def load_quantized(folder: str | Path, quant: str, double_quant: bool = False,
                   compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
                   include_lm_head: bool = False, dtype: torch.dtype | None = None,
                   cpu_bf16_kernel: bool = False):
    """Load a HF causal LM folder (safetensors, or one GGUF file: dequantized), quantizing its linears
    with bitsandbytes on `device`. Safetensors weights are read and quantized one tensor at a time.

    `cpu_bf16_kernel=True` keeps bnb's CPU repack-to-bf16 fast path for 4-bit layers:
    inference only, never train after an eval forward (see the module docstring).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    args = (quant, double_quant, compute_dtype, device, include_lm_head, dtype, cpu_bf16_kernel)
    if gguf_weights(folder) is not None:  # a GGUF base's weights: its dequantized tensors
        return load_quantized_state(config, read_state(folder), *args)
    with ExitStack() as stack:
        return load_quantized_state(config, lazy_state(folder, stack), *args, folder=folder)


def load_quantized_state(config, state_dict: Mapping[str, Any], quant: str, double_quant: bool = False,
                         compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
                         include_lm_head: bool = False, dtype: torch.dtype | None = None,
                         cpu_bf16_kernel: bool = False, folder: str | Path | None = None):
    """`load_quantized` from a state dict and a transformers config (no files written).

    The state dict may be in any float dtype (a bf16 base is upcast to `dtype`); its values may be
    tensors or anything transformers materializes with ``value[...]`` (`models.weights.lazy_state`
    slices, read one at a time). It is consumed: transformers moves its tensors into the model.
    `folder`: the model folder it comes from (its generation config and name).
    """
    qconfig = bnb_config(quant, double_quant, compute_dtype, include_lm_head)
    kwargs = {"dtype": dtype or compute_dtype}
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map=device_map_for(device))
    model = from_state(config, state_dict, folder, **kwargs)
    if qconfig is None:
        model.to(device)
    elif not cpu_bf16_kernel:
        disable_cpu_repack(model)
    return model.eval()


def disable_cpu_repack(model: nn.Module) -> int:
    """Turn off bnb's in-place CPU repacking of 4-bit weights (see the module docstring); returns the count."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_bnb_linear(module: nn.Module) -> bool:
    """True for bitsandbytes' Linear8bitLt / Linear4bit."""
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


@torch.no_grad()
def dequantize_linear(module: nn.Module) -> torch.Tensor:
    """The float32 [out, in] weight that a bitsandbytes linear (or a plain / Conv1D layer) stands for."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        w = module.weight
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU bf16 forward
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        w = module.weight
        cb = w.CB if getattr(w, "CB", None) is not None else w.data
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return cb.float() * scb.float()[:, None] / 127.0
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if linear_kind(module) == "conv1d":
        return module.weight.detach().float().t()  # [out, in], like every other layer
    raise UsageError(f"not a linear layer: {type(module).__name__}")


def quantized_storage_bits(module: nn.Module) -> int:
    """Bits actually held by a bnb linear's weight and scales (for checking sizes.py)."""
    import bitsandbytes as bnb

    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        qs = w.quant_state
        bits = w.data.numel() * w.data.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
        if qs.nested:
            bits += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8 + 32  # + offset
        return bits
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb = w.CB if getattr(w, "CB", None) is not None else w.data
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return cb.numel() * 8 + scb.numel() * scb.element_size() * 8
    return w.numel() * w.element_size() * 8
