"""The merge rules on stacked task vectors, batched: tensors are [N, *batch, rows, cols].

N indexes the inputs; every matrix (one module of one input) is trimmed on its own;
``weights`` are [N] or [N, *batch] and broadcast over the matrix entries.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from adapterhub_c.kernels.topk import mergekit_topk_mask

L1_RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def _bcast(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.reshape(weights.shape + (1,) * (like.dim() - weights.dim())).to(like.dtype)


def weighted_sum(tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i·τ_i."""
    return (tau * _bcast(weights, tau)).sum(0)


def trim_count(density: float, numel: int, convention: str = "peft") -> int:
    """How many entries of a ``numel``-entry matrix the TIES trim keeps.

    k = int(density·numel) as in PEFT; under mergekit (≥ 0.1.5, ``sparsify.magnitude``)
    at least one entry of a non-empty matrix, max(1, int(density·numel)).
    """
    k = int(density * numel)
    return max(1, k) if convention == "mergekit" and numel else k


def _mergekit_keep(tau: torch.Tensor, mag: torch.Tensor, thr: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask [..., n] of exactly ``k`` entries per matrix of ``tau``: every magnitude at or
    above ``thr`` where that is k entries, else (ties at the threshold) the k mergekit keeps."""
    keep = mag >= thr
    flat_keep, flat_tau = keep.reshape(-1, keep.shape[-1]), tau.reshape(-1, *tau.shape[-2:])
    for j in torch.nonzero(flat_keep.sum(-1) > k).flatten().tolist():
        flat_keep[j] = mergekit_topk_mask(flat_tau[j], k).reshape(-1)
    return keep


def trim_magnitude(tau: torch.Tensor, density: float, convention: str = "peft") -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude in each matrix, zero the rest.

    k as :func:`trim_count` gives. The threshold is the k-th largest magnitude
    (``kthvalue``, O(n), faster than ``topk`` on CPU). Entries tied with it: the ``peft``
    convention keeps them all (which only matters for exactly equal magnitudes; PEFT's
    own ``topk`` keeps k of them); ``mergekit`` keeps exactly k, the tied ones in the
    order of the ``torch.argsort`` mergekit itself calls (:func:`mergekit_topk_mask`).
    """
    rows, cols = tau.shape[-2:]
    numel = rows * cols
    k = trim_count(density, numel, convention)
    if k >= numel:
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    mag = tau.abs().reshape(*tau.shape[:-2], numel)
    thr = torch.kthvalue(mag, numel - k + 1, dim=-1, keepdim=True).values
    keep = _mergekit_keep(tau, mag, thr, k) if convention == "mergekit" else mag >= thr
    return torch.where(keep.reshape(tau.shape), tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def module_seed(seed: int, module: str, part: str = "") -> int:
    """A per-module seed, so a module's DARE mask does not depend on which others are merged."""
    h = hashlib.sha256(f"{seed}\0{module}\0{part}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def dare_keep_mask(n: int, rows: int, cols: int, density: float, seeds: Sequence[int],
                   device: torch.device) -> torch.Tensor:
    """Bernoulli(density) keep masks [N, len(seeds), rows, cols], one generator per module seed."""
    masks = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        masks.append(torch.rand(n, rows, cols, generator=g, device=device) < density)
    return torch.stack(masks, dim=1)


def dare(tau: torch.Tensor, keep: torch.Tensor, density: float, rescale: str = "inverse-p") -> torch.Tensor:
    """Drop the entries where ``keep`` is False and rescale the kept ones.

    ``inverse-p``: by 1/density (the DARE paper, PEFT). ``l1``: each matrix of each
    input by ‖τ‖₁ / ‖keep·τ‖₁, so it keeps its L1 norm (mergekit ≥ 0.1, ``sparsify``
    with ``rescale_norm: l1``); left unscaled where either norm is below
    :data:`L1_RESCALE_EPS`, as mergekit does.
    """
    zero = torch.zeros((), dtype=tau.dtype, device=tau.device)
    if rescale == "inverse-p":
        return torch.where(keep, tau / density, zero)
    if rescale != "l1":
        raise ValueError(f"unknown DARE rescale {rescale!r}")
    masked = torch.where(keep, tau, zero)
    before = tau.abs().sum((-2, -1), keepdim=True)
    after = masked.abs().sum((-2, -1), keepdim=True)
    scaled = (before >= L1_RESCALE_EPS) & (after >= L1_RESCALE_EPS)
    # where() picks 1 wherever after is 0, so the inf/NaN of before/after never shows
    return masked * torch.where(scaled, before / after, torch.ones((), dtype=tau.dtype, device=tau.device))


def elected_signs(tau: torch.Tensor, weights: torch.Tensor, majority: str = "total",
                  convention: str = "peft") -> torch.Tensor:
    """The TIES elected sign (+1/-1, a tie elects +1) per entry of stacked τ [N, …] → […]."""
    voters = tau if convention == "peft" else tau * _bcast(weights, tau)
    vote = voters.sum(0) if majority == "total" else voters.sign().sum(0)
    return torch.where(vote >= 0, 1.0, -1.0).to(tau.dtype)


def elect_and_merge(tau: torch.Tensor, weights: torch.Tensor, majority: str = "total",
                    convention: str = "peft", elected: torch.Tensor | None = None) -> torch.Tensor:
    """TIES sign election and disjoint merge of (already trimmed) task vectors.

    ``peft``: elect on the unweighted τ, result = Σ w_i τ_i [agree] / #agree.
    ``mergekit``: elect on w_i τ_i, result = Σ w_i τ_i [agree] / Σ w_i [agree].
    ``majority``: ``total`` = sign of the sum, ``frequency`` = sign of the count; ties → +.
    Zero entries have no sign: they neither vote by count nor agree. ``elected`` (+1/-1
    per entry, as :func:`elected_signs` gives) skips the vote: the popcount election over
    packs (:mod:`adapterhub_c.workflows.merges`) passes it where it is exact.
    """
    w = _bcast(weights, tau)
    wtau = tau * w
    voters = tau if convention == "peft" else wtau
    sign = voters.sign()
    if elected is None:
        vote = voters.sum(0) if majority == "total" else sign.sum(0)
        elected = torch.where(vote >= 0, 1.0, -1.0).to(tau.dtype)
    else:
        elected = elected.to(device=tau.device, dtype=tau.dtype)
    agree = sign == elected
    total = torch.where(agree, wtau, torch.zeros((), dtype=tau.dtype, device=tau.device)).sum(0)
    if convention == "peft":
        divisor = agree.sum(0).clamp(min=1).to(tau.dtype)
    else:
        divisor = (agree.to(tau.dtype) * w).sum(0)
        divisor = torch.where(divisor == 0, torch.ones((), dtype=tau.dtype, device=tau.device), divisor)
    return total / divisor


def merge_dense(tau: torch.Tensor, weights: torch.Tensor, method: str, density: float | None,
                majority: str, convention: str, keep: torch.Tensor | None = None,
                elected: torch.Tensor | None = None, rescale: str = "inverse-p") -> torch.Tensor:
    """Apply ``method`` to stacked task vectors τ [N, *batch, rows, cols] → [*batch, rows, cols].

    ``keep`` is the DARE keep mask (required for the dare methods) and ``rescale`` how
    DARE rescales (see :func:`dare`); ``elected`` an already elected TIES sign
    [*batch, rows, cols] (see :func:`elect_and_merge`).
    """
    if method == "task-arithmetic":
        return weighted_sum(tau, weights)
    if method == "ties":
        return elect_and_merge(trim_magnitude(tau, density, convention), weights, majority, convention, elected)
    if keep is None:
        raise ValueError("DARE needs a keep mask")
    dropped = dare(tau, keep, density, rescale)
    if method == "dare-linear":
        return weighted_sum(dropped, weights)
    if method == "dare-ties":
        return elect_and_merge(dropped, weights, majority, convention, elected)
    raise ValueError(f"unknown method {method}")
