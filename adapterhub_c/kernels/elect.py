"""Per-position sign election over N bitmask-encoded ternary tensors (for TIES-style merges).

``weights=None``: by frequency, c = Σ_i T_i (integer count of + minus count of -).
``weights`` given (float32, one per tensor, e.g. merge weight × scale): by weighted
total, c = Σ_i w_i·T_i accumulated in float32 in the order i = 0, 1, …, N-1 (each term is
±w_i or 0, so both paths round identically). The elected sign is sign(c); c = 0 (a tie)
elects nothing. Returns the elected (pos, neg) planes.
"""
from __future__ import annotations

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.kernels.layout import n_words, unpack_bits, use_triton


def _check(pos: torch.Tensor, neg: torch.Tensor, numel: int, weights):
    for name, p in (("pos", pos), ("neg", neg)):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.int32 or p.ndim != 2:
            raise UsageError(f"{name} planes must be a 2-d int32 tensor [N, words]")
    if pos.shape != neg.shape or pos.shape[1] != n_words(numel) or pos.shape[0] < 1:
        raise UsageError(f"planes must be [N >= 1, {n_words(numel)}] for {numel} elements")
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32, device=pos.device).reshape(-1)
        if w.numel() != pos.shape[0] or not torch.isfinite(w).all():
            raise UsageError("weights must be N finite numbers")
        return w
    return None


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """[numel] 0/1 → int32 words (the layout of :mod:`.layout`)."""
    nw = n_words(bits.numel())
    padded = torch.zeros(nw * 32, dtype=torch.int64, device=bits.device)
    padded[: bits.numel()] = bits.to(torch.int64)
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    words = (padded.view(nw, 32) << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def elect_signs_ref(pos: torch.Tensor, neg: torch.Tensor, numel: int, weights=None):
    """Reference twin of :func:`elect_signs` in plain torch."""
    w = _check(pos, neg, numel, weights)
    t = unpack_bits(pos, numel) - unpack_bits(neg, numel)  # [N, numel]
    if w is None:
        c = t.sum(dim=0)
    else:
        c = torch.zeros(numel, dtype=torch.float32, device=pos.device)
        for i in range(t.shape[0]):  # fixed order: the kernel adds in the same order
            c = c + t[i].to(torch.float32) * w[i]
    return _pack(c > 0), _pack(c < 0)


def elect_signs(pos: torch.Tensor, neg: torch.Tensor, numel: int, weights=None, *, impl: str = "auto"):
    """Elected (pos, neg) planes of N stacked ternary tensors ``pos``/``neg`` [N, words]."""
    w = _check(pos, neg, numel, weights)
    if not use_triton(impl, pos, neg):
        return elect_signs_ref(pos, neg, numel, w)
    from adapterhub_c.kernels.elect_triton import elect_launch

    return elect_launch(pos.contiguous(), neg.contiguous(), numel, w)
