"""Triton kernel for :func:`.elect.elect_signs` (imported lazily)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS = 32  # words per program; each expands to WORDS x 32 positions


@triton.jit
def _elect_kernel(pos_ptr, neg_ptr, w_ptr, out_pos_ptr, out_neg_ptr, n_tensors, n_words,
                  WEIGHTED: tl.constexpr, WORDS: tl.constexpr):
    words = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, WORDS)
    mask = words < n_words
    shifts = tl.arange(0, 32).to(tl.uint32)
    if WEIGHTED:
        acc = tl.zeros((WORDS, 32), dtype=tl.float32)
    else:
        acc = tl.zeros((WORDS, 32), dtype=tl.int32)
    for i in range(n_tensors):
        p = tl.load(pos_ptr + i * n_words + words, mask=mask, other=0).to(tl.uint32, bitcast=True)
        n = tl.load(neg_ptr + i * n_words + words, mask=mask, other=0).to(tl.uint32, bitcast=True)
        t = ((p[:, None] >> shifts[None, :]) & 1).to(tl.int32) - ((n[:, None] >> shifts[None, :]) & 1).to(tl.int32)
        if WEIGHTED:
            acc = acc + t.to(tl.float32) * tl.load(w_ptr + i)
        else:
            acc = acc + t
    # padding positions have T = 0 in every input, so they elect nothing
    up = tl.sum((acc > 0).to(tl.uint32) << shifts[None, :], axis=1)
    down = tl.sum((acc < 0).to(tl.uint32) << shifts[None, :], axis=1)
    tl.store(out_pos_ptr + words, up.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_neg_ptr + words, down.to(tl.int32, bitcast=True), mask=mask)


def elect_launch(pos, neg, numel: int, weights):
    """Elected (pos, neg) planes; ``weights`` a float32 tensor on the planes' device or None."""
    n_tensors, n_words = pos.shape
    out_pos = torch.zeros(n_words, dtype=torch.int32, device=pos.device)
    out_neg = torch.zeros(n_words, dtype=torch.int32, device=pos.device)
    if n_words:
        w = weights if weights is not None else torch.zeros(1, dtype=torch.float32, device=pos.device)
        _elect_kernel[(triton.cdiv(n_words, WORDS),)](
            pos, neg, w, out_pos, out_neg, n_tensors, n_words, WEIGHTED=weights is not None, WORDS=WORDS)
    return out_pos, out_neg
