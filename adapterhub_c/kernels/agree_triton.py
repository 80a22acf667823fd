"""Triton kernel for :func:`.agree.ternary_agreement` (imported lazily).

Popcount by bit tricks on uint32 (the interpreter runs them; ``libdevice.popc`` it may not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # words per program: at most 32·1024 set bits, fits an int32 partial sum


@triton.jit
def _popc(v):
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    return (v & 0x3F).to(tl.int32)


@triton.jit
def _agree_kernel(ap_ptr, an_ptr, bp_ptr, bn_ptr, part_ptr, n_words, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_words
    ap = tl.load(ap_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    an = tl.load(an_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    bp = tl.load(bp_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    bn = tl.load(bn_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    base = part_ptr + pid * 6
    tl.store(base + 0, tl.sum(_popc(ap & bp), axis=0))
    tl.store(base + 1, tl.sum(_popc(an & bn), axis=0))
    tl.store(base + 2, tl.sum(_popc(ap & bn), axis=0))
    tl.store(base + 3, tl.sum(_popc(an & bp), axis=0))
    tl.store(base + 4, tl.sum(_popc(ap) + _popc(an), axis=0))
    tl.store(base + 5, tl.sum(_popc(bp) + _popc(bn), axis=0))


def agree_launch(ap, an, bp, bn) -> list[int]:
    """[pp, nn, pn, np, nnz_a, nnz_b] summed over all programs."""
    n = ap.numel()
    grid = max(1, triton.cdiv(n, BLOCK))
    part = torch.zeros(grid * 6, dtype=torch.int32, device=ap.device)
    if n:
        _agree_kernel[(grid,)](ap, an, bp, bn, part, n, BLOCK=BLOCK)
    return [int(x) for x in part.view(grid, 6).sum(dim=0, dtype=torch.int64).tolist()]
