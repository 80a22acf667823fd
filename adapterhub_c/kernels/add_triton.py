"""Triton kernel for :func:`.add.bitmask_add_` (imported lazily)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapterhub_c.kernels.bf16_triton import bf16_bits_to_f32, f32_to_bf16_bits
from adapterhub_c.kernels.planes_triton import ternary_at

BLOCK = 1024


@triton.jit
def _add_kernel(w_ptr, pos_ptr, neg_ptr, numel, scale, BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    t = ternary_at(pos_ptr, neg_ptr, offs, mask)
    touched = mask & (t != 0)  # only touched positions are written: W keeps its bits where T = 0
    w = tl.load(w_ptr + offs, mask=touched, other=0)
    if BF16:
        new = f32_to_bf16_bits(bf16_bits_to_f32(w) + t.to(tl.float32) * scale)
    else:
        new = (w.to(tl.float32) + t.to(tl.float32) * scale).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs, new, mask=touched)


def add_launch(w, pos, neg, numel: int, scale: float) -> None:
    """``w`` (flat, contiguous) += scale · T in place."""
    if not numel:
        return
    bf16 = w.dtype == torch.bfloat16
    target = w.view(torch.int16) if bf16 else w
    _add_kernel[(triton.cdiv(numel, BLOCK),)](target, pos, neg, numel, scale, BF16=bf16, BLOCK=BLOCK)
