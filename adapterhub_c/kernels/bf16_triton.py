"""bfloat16 conversions done with integer ops inside Triton kernels.

Triton's CPU interpreter truncates float32 → bfloat16 where the GPU rounds to nearest
even; doing the rounding on the bit pattern (data passed as an int16 view) makes the
kernel give the same bits on both, and the same as torch's ``.to(torch.bfloat16)``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_bits_to_f32(x):
    """int16 bit patterns of bfloat16 values → float32 (exact)."""
    u = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    return u.to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits(v):
    """float32 (finite) → int16 bit pattern of the nearest bfloat16, ties to even."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.int16, bitcast=True)
