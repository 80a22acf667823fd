"""Which entries a top-k by magnitude keeps when magnitudes tie: the reference tools' own orders."""
from __future__ import annotations

import torch


def mergekit_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The entries of ``x`` that mergekit 0.1.5's ``sparsify.magnitude`` keeps: a bool mask of ``x``'s shape.

    mergekit keeps the first ``k`` of ``torch.argsort(|x|.view(-1), descending=True)`` (in
    float32 on CPU). Among equal magnitudes that order is the sort's own, not the index
    order, so the only faithful rule is the same call on the same values: this one.
    """
    w = x.detach().abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    keep = torch.zeros(w.numel(), dtype=torch.bool, device=x.device)
    keep[torch.argsort(w, descending=True)[:k]] = True
    return keep.view(x.shape)
