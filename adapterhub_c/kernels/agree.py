"""Agreement and dot product of two bitmask-encoded ternary tensors, by popcount.

``agree`` = positions where both are non-zero with the same sign, ``disagree`` = both
non-zero with opposite signs, ``dot`` = Σ sign_a · sign_b = agree - disagree, plus the
non-zero counts of each. Integers, so every path is exact. Multiply ``dot`` by
``scale_a · scale_b`` for the dot product of the scaled tensors.
"""
from __future__ import annotations

import numpy as np
import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.kernels.layout import use_triton


def _np_words(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().view(np.uint32)


def _result(pp: int, nn: int, pn: int, np_: int, nnz_a: int, nnz_b: int) -> dict[str, int]:
    agree, disagree = pp + nn, pn + np_
    return {"agree": agree, "disagree": disagree, "dot": agree - disagree,
            "overlap": agree + disagree, "nnz_a": nnz_a, "nnz_b": nnz_b}


def ternary_agreement_ref(a_pos, a_neg, b_pos, b_neg) -> dict[str, int]:
    """Reference twin of :func:`ternary_agreement` (numpy ``bitwise_count``)."""
    ap, an, bp, bn = (_np_words(t) for t in (a_pos, a_neg, b_pos, b_neg))

    def pc(x):
        return int(np.bitwise_count(x).sum(dtype=np.int64))

    return _result(pc(ap & bp), pc(an & bn), pc(ap & bn), pc(an & bp), pc(ap) + pc(an), pc(bp) + pc(bn))


def ternary_agreement(a_pos: torch.Tensor, a_neg: torch.Tensor, b_pos: torch.Tensor, b_neg: torch.Tensor,
                      *, impl: str = "auto") -> dict[str, int]:
    """Counts {agree, disagree, dot, overlap, nnz_a, nnz_b} for two ternary tensors of equal size."""
    planes = (a_pos, a_neg, b_pos, b_neg)
    if any(not isinstance(p, torch.Tensor) or p.dtype != torch.int32 or p.ndim != 1 for p in planes):
        raise UsageError("planes must be 1-d int32 tensors")
    if len({p.numel() for p in planes}) != 1 or len({p.device for p in planes}) != 1:
        raise UsageError("all four planes must have the same length and device")
    if not use_triton(impl, *planes):
        return ternary_agreement_ref(*planes)
    from adapterhub_c.kernels.agree_triton import agree_launch

    return _result(*agree_launch(*planes))
