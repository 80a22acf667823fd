"""Triton kernel for :func:`.decode.bitmask_decode` (imported lazily)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapterhub_c.kernels.bf16_triton import f32_to_bf16_bits
from adapterhub_c.kernels.planes_triton import ternary_at

BLOCK = 1024


@triton.jit
def _decode_kernel(pos_ptr, neg_ptr, out_ptr, numel, scale, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    val = ternary_at(pos_ptr, neg_ptr, offs, mask).to(tl.float32) * scale
    if BF16:
        tl.store(out_ptr + offs, f32_to_bf16_bits(val), mask=mask)
    else:
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


def decode_launch(pos, neg, out, numel: int, scale: float) -> None:
    """Fill ``out`` (flat, contiguous) with the decoded values."""
    if not numel:
        return
    bf16 = out.dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16 else out
    _decode_kernel[(triton.cdiv(numel, BLOCK),)](pos, neg, target, numel, scale, BF16=bf16, BLOCK=BLOCK)
