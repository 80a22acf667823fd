"""Merging in ΔW space: ΔW_i = scale_i·B_i·A_i per module, merged, then re-factorised.

- task arithmetic: exact without a dense matrix. Σ w_i·ΔW_i = [w_i·s_i·B_i]·[A_i]
  (concatenation along the rank, like PEFT ``cat``), rank Σ r_i; a smaller rank is
  the exact truncated SVD through QR of the stacked factors (lowrank.py).
- TIES / DARE act on entries of ΔW, so the dense [N, out, in] stack is formed (one
  batched matmul per chunk of same-shape modules), merged, and truncated by
  :func:`~adapterhub_c.merge.lowrank.truncate_dense`.

Default output rank: Σ r_i for task arithmetic (exact), the largest input rank of the
module otherwise. Output layers have scale 1.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..adapters.lora import LoraLayer
from .batching import DEFAULT_CHUNK_BYTES, chunks_by_key
from .inputs import ModuleInputs, stack_padded
from .lowrank import truncate_dense, truncate_lowrank_sum
from .ops import dare_keep_mask, merge_dense, module_seed
from .spec import MergeSpec

Progress = Callable[[str, int, "int | None"], None]


def merge_delta(modules: list[ModuleInputs], spec: MergeSpec, device: torch.device, dtype: torch.dtype,
                out_dtype: torch.dtype, progress: Progress | None = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, LoraLayer]:
    """Merge every module in ΔW space; returns {module: LoraLayer(scale=1)}."""
    if spec.method == "task-arithmetic":
        return _task_arithmetic(modules, spec, device, dtype, out_dtype, progress, chunk_bytes)
    return _dense(modules, spec, device, dtype, out_dtype, progress, chunk_bytes)


def _weights(spec: MergeSpec, device, dtype) -> torch.Tensor:
    return torch.tensor(spec.weights, dtype=dtype, device=device)


def _task_arithmetic(modules, spec, device, dtype, out_dtype, progress, chunk_bytes):
    """Concatenate [w_i·s_i·B_i] and [A_i]; truncate exactly when a smaller rank is asked."""
    cat = {}
    for m in modules:
        present = [(w, layer) for w, layer in zip(spec.weights, m.layers) if layer is not None]
        B = torch.cat([layer.B.to(device=device, dtype=dtype) * (w * layer.scale) for w, layer in present], 1)
        A = torch.cat([layer.A.to(device=device, dtype=dtype) for _, layer in present], 0)
        cat[m.name] = (B, A)
    out, done = {}, 0
    for chunk in chunks_by_key(
            modules, key=lambda m: (m.out_features, m.in_features, cat[m.name][1].shape[0]),
            cost=lambda m: cat[m.name][1].numel() * 8 + cat[m.name][0].numel() * 8, budget=chunk_bytes):
        K = cat[chunk[0].name][1].shape[0]
        rank = spec.rank if spec.rank is not None else K
        B = torch.stack([cat[m.name][0] for m in chunk])
        A = torch.stack([cat[m.name][1] for m in chunk])
        B, A = truncate_lowrank_sum(B, A, rank)
        for i, m in enumerate(chunk):
            out[m.name] = LoraLayer(A=A[i].to(out_dtype).contiguous(), B=B[i].to(out_dtype).contiguous(), scale=1.0)
        done += len(chunk)
        if progress:
            progress("merging (task-arithmetic, delta)", done, len(modules))
    return out


def _dense(modules, spec, device, dtype, out_dtype, progress, chunk_bytes):
    """TIES / DARE on the dense ΔW stack, batched over chunks of same-shape modules."""
    n = len(spec.weights)
    weights = _weights(spec, device, dtype)
    elem = torch.finfo(dtype).bits // 8
    out, done = {}, 0
    for chunk in chunks_by_key(modules, key=lambda m: (m.out_features, m.in_features),
                               cost=lambda m: n * m.out_features * m.in_features * elem,
                               budget=chunk_bytes):
        out_f, in_f = chunk[0].out_features, chunk[0].in_features
        r_max = max(max(m.ranks) for m in chunk)
        # [N, C, out, r] @ [N, C, r, in]; scales folded into B, missing inputs are zeros
        B = torch.stack([_scaled_B(m, r_max, device, dtype) for m in chunk], 1)
        A = torch.stack([stack_padded(m.layers, "A", r_max, in_f, dtype, device) for m in chunk], 1)
        delta = B @ A
        del A, B
        keep = None
        if spec.uses_dare:
            keep = dare_keep_mask(n, out_f, in_f, spec.density,
                                  [module_seed(spec.seed, m.name) for m in chunk], device)
        merged = merge_dense(delta, weights, spec.method, spec.density, spec.majority,
                             spec.convention, keep)
        del delta, keep
        ranks = [spec.rank if spec.rank is not None else max(m.ranks) for m in chunk]
        Bo, Ao = truncate_dense(merged, max(ranks))
        for i, (m, r) in enumerate(zip(chunk, ranks)):
            out[m.name] = LoraLayer(A=Ao[i, :r].to(out_dtype).contiguous(),
                                    B=Bo[i, :, :r].to(out_dtype).contiguous(), scale=1.0)
        done += len(chunk)
        if progress:
            progress(f"merging ({spec.method}, delta)", done, len(modules))
    return out


def _scaled_B(m: ModuleInputs, rank: int, device, dtype) -> torch.Tensor:
    B = stack_padded(m.layers, "B", rank, m.out_features, dtype, device)
    scales = torch.tensor([layer.scale if layer is not None else 0.0 for layer in m.layers],
                          dtype=dtype, device=device)
    return B * scales.view(-1, 1, 1)

