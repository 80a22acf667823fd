"""Merging in ΔW space: ΔW_i = scale_i·B_i·A_i per module, merged, then re-factorised.

- task arithmetic: exact without a dense matrix. Σ w_i·ΔW_i = [w_i·s_i·B_i]·[A_i]
  (concatenation along the rank, like PEFT ``cat``), rank Σ r_i; a smaller rank is a
  truncated SVD of the stacked factors (lowrank.py), never of a dense matrix.
- TIES / DARE act on entries of ΔW, so the dense [N, out, in] stack is formed (one
  batched matmul per chunk of same-shape modules), merged, and truncated by
  :func:`~adapterhub_c.merging.lowrank.truncate_dense`. On CPU, TIES and DARE-TIES run
  the fused numba kernels of :mod:`adapterhub_c.kernels.ties_cpu` one module at a time
  (its ΔW stack stays in cache); elsewhere (CUDA, and DARE-linear) the batched torch
  rules of :mod:`.ops`.

Default output rank: Σ r_i for task arithmetic (exact), the largest input rank of the
module otherwise. Output layers have scale 1.
"""
from __future__ import annotations

import torch

from adapterhub_c.adapters.lora import LoraLayer
from adapterhub_c.merging.batching import DEFAULT_CHUNK_BYTES, chunks_by_key
from adapterhub_c.merging.inputs import ModuleInputs, stack_padded
from adapterhub_c.merging.lowrank import truncate_dense, truncate_lowrank_sum
from adapterhub_c.merging.rules import dare, dare_keep_mask, merge_dense, module_seed
from adapterhub_c.merging.spec import MergeSpec
from adapterhub_c.progress import Progress

# On CPU, modules are truncated together in groups of about this size (the subspace
# iteration's products then run from cache; 8–16 MB measured fastest between 1 and 256 MB); TIES and
# DARE-TIES form one module's ΔW stack at a time, which stays in cache through the kernels.
CPU_TRUNCATE_BYTES = 8 << 20


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
        present = [(w, layer) for w, layer in zip(spec.weights, m.layers, strict=False) if layer is not None]
        B = torch.cat([layer.B.to(device=device, dtype=dtype) * (w * layer.scale) for w, layer in present], 1)
        A = torch.cat([layer.A.to(device=device, dtype=dtype) for _, layer in present], 0)
        cat[m.name] = (B, A)
    out, done = {}, 0
    budget = min(chunk_bytes, CPU_TRUNCATE_BYTES) if device.type == "cpu" else chunk_bytes
    for chunk in chunks_by_key(
            modules, key=lambda m: (m.out_features, m.in_features, cat[m.name][1].shape[0]),
            cost=lambda m: cat[m.name][1].numel() * 8 + cat[m.name][0].numel() * 8, budget=budget):
        K = cat[chunk[0].name][1].shape[0]
        rank = spec.rank if spec.rank is not None else K
        B = torch.stack([cat[m.name][0] for m in chunk])
        A = torch.stack([cat[m.name][1] for m in chunk])
        B, A = truncate_lowrank_sum(B, A, rank, spec.svd)
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
    fused = device.type == "cpu" and spec.uses_sign_election
    if fused:
        cost, budget = (lambda m: m.out_features * m.in_features * elem), min(chunk_bytes, CPU_TRUNCATE_BYTES)
    else:
        cost, budget = (lambda m: n * m.out_features * m.in_features * elem), chunk_bytes
    out, done = {}, 0
    for chunk in chunks_by_key(modules, key=lambda m: (m.out_features, m.in_features), cost=cost, budget=budget):
        if fused:
            merged = torch.stack([_fused_module(m, spec, weights, device, dtype) for m in chunk])
        else:
            merged = _batched_chunk(chunk, spec, weights, device, dtype)
        ranks = [spec.rank if spec.rank is not None else max(m.ranks) for m in chunk]
        Bo, Ao = truncate_dense(merged, max(ranks), spec.svd)
        del merged
        for i, (m, r) in enumerate(zip(chunk, ranks, strict=False)):
            out[m.name] = LoraLayer(A=Ao[i, :r].to(out_dtype).contiguous(),
                                    B=Bo[i, :, :r].to(out_dtype).contiguous(), scale=1.0)
        done += len(chunk)
        if progress:
            progress(f"merging ({spec.method}, delta)", done, len(modules))
    return out


def _batched_chunk(chunk: list[ModuleInputs], spec: MergeSpec, weights: torch.Tensor, device,
                   dtype) -> torch.Tensor:
    """The merged ΔW [C, out, in] of a chunk by the batched torch rules of :mod:`.ops`."""
    n = len(spec.weights)
    out_f, in_f = chunk[0].out_features, chunk[0].in_features
    r_max = max(max(m.ranks) for m in chunk)
    # [N, C, out, r] @ [N, C, r, in]; scales folded into B, missing inputs are zeros
    B = torch.stack([_scaled_B(m, r_max, device, dtype) for m in chunk], 1)
    A = torch.stack([stack_padded(m.layers, "A", r_max, in_f, dtype, device) for m in chunk], 1)
    delta = B @ A
    del A, B
    keep = None
    if spec.uses_dare:
        keep = dare_keep_mask(n, out_f, in_f, spec.density, [module_seed(spec.seed, m.name) for m in chunk], device)
    return merge_dense(delta, weights, spec.method, spec.density, spec.majority, spec.convention, keep,
                       rescale=spec.rescale)


def _fused_module(m: ModuleInputs, spec: MergeSpec, weights: torch.Tensor, device, dtype) -> torch.Tensor:
    """TIES / DARE-TIES of one module on CPU with the numba kernels: merged ΔW [out, in]."""
    from adapterhub_c.kernels.ties_cpu import drop_excess_ties, ties_merge, trim_thresholds

    r = max(m.ranks)
    tau = _scaled_B(m, r, device, dtype) @ stack_padded(m.layers, "A", r, m.in_features, dtype, device)
    if spec.uses_dare:  # DARE-TIES: drop and rescale, then elect among every non-zero entry
        keep = dare_keep_mask(len(m.layers), m.out_features, m.in_features, spec.density,
                              [module_seed(spec.seed, m.name)], device)[:, 0]
        tau = dare(tau, keep, spec.density, spec.rescale)
        thresholds = torch.zeros(tau.shape[0], dtype=dtype)
    else:
        thresholds = trim_thresholds(tau, spec.density, spec.convention)
        if spec.convention == "mergekit":  # exactly k entries at a magnitude tie
            tau = drop_excess_ties(tau, thresholds, spec.density)
    return ties_merge(tau, thresholds, weights, spec.majority, spec.convention)


def _scaled_B(m: ModuleInputs, rank: int, device, dtype) -> torch.Tensor:
    B = stack_padded(m.layers, "B", rank, m.out_features, dtype, device)
    scales = torch.tensor([layer.scale if layer is not None else 0.0 for layer in m.layers],
                          dtype=dtype, device=device)
    return B * scales.view(-1, 1, 1)

