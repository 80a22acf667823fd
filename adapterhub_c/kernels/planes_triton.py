"""Reading a ternary tensor from its two bit planes inside Triton kernels (the layout of :mod:`.layout`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ternary_at(pos_ptr, neg_ptr, offs, mask):
    """T at element indices ``offs``: +1 where the ``pos`` plane has the bit, -1 where ``neg`` has it, else 0."""
    word = offs >> 5
    bit = (offs & 31).to(tl.int32)
    p = (tl.load(pos_ptr + word, mask=mask, other=0) >> bit) & 1
    n = (tl.load(neg_ptr + word, mask=mask, other=0) >> bit) & 1
    return p - n
