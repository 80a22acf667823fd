"""Merging A and B separately (PEFT ``linear``/``ties``/``dare_*``, ComPEFT, LoraHub).

Kept for comparison with published numbers; it is not the merge of the updates:
(Σ a_i B_i)(Σ b_i A_i) has cross terms B_i·A_j. Following PEFT, input i's weight
w_i·scale_i is split as a_i = √|w_i·s_i| on B and b_i = sign(w_i·s_i)·√|w_i·s_i| on A
(the sign on one side only, PEFT PR #2918), and the result has scale 1. Every input
must have the same rank in a module (UsageError otherwise).
"""
from __future__ import annotations

import torch

from adapterhub_c.adapters.lora import LoraLayer
from adapterhub_c.errors import UsageError
from adapterhub_c.merging.batching import DEFAULT_CHUNK_BYTES, chunks_by_key
from adapterhub_c.merging.delta import Progress
from adapterhub_c.merging.inputs import ModuleInputs, stack_padded
from adapterhub_c.merging.rules import dare_keep_mask, merge_dense, module_seed
from adapterhub_c.merging.spec import MergeSpec


def check_equal_ranks(modules: list[ModuleInputs], names: list[str], what: str = "space=factors") -> int:
    """Every present layer of every module must share one rank; returns it."""
    ranks = {}
    for m in modules:
        for layer, name in zip(m.layers, names, strict=False):
            if layer is not None:
                ranks.setdefault(layer.rank, (name, m.name))
    if len(ranks) > 1:
        detail = ", ".join(f"{name} has rank {r} at {mod}" for r, (name, mod) in sorted(ranks.items()))
        raise UsageError(f"{what} needs equal ranks: {detail}")
    return next(iter(ranks))


def factor_weights(weights, modules: list[ModuleInputs], dtype: torch.dtype,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input and module the weights (w_A, w_B) [N, C] put on A and B: w·scale split as
    √|w·s| on B and sign(w·s)·√|w·s| on A (0 where an input lacks the module)."""
    ws = torch.tensor([[w * (layer.scale if layer is not None else 0.0)
                        for w, layer in zip(weights, m.layers, strict=False)] for m in modules],
                      dtype=dtype, device=device).T  # [N, C]
    w_B = ws.abs().sqrt()
    return ws.sign() * w_B, w_B


def merge_factors(modules: list[ModuleInputs], spec: MergeSpec, names: list[str], device: torch.device,
                  dtype: torch.dtype, out_dtype: torch.dtype, progress: Progress | None = None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  elections: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, LoraLayer]:
    """Merge the A and B factors separately; returns {module: LoraLayer(scale=1)}.

    ``elections``: {module: (elected sign of A, of B)} computed elsewhere (the popcount
    path over packs); the TIES vote is then skipped for those modules.
    """
    r = check_equal_ranks(modules, names)
    if spec.rank is not None and spec.rank != r:
        raise UsageError(f"space=factors keeps the input rank {r}; rank={spec.rank} needs space=delta")
    n = len(spec.weights)
    elem = torch.finfo(dtype).bits // 8
    out, done = {}, 0
    for chunk in chunks_by_key(modules, key=lambda m: (m.out_features, m.in_features),
                               cost=lambda m: n * r * (m.out_features + m.in_features) * elem,
                               budget=chunk_bytes):
        out_f, in_f = chunk[0].out_features, chunk[0].in_features
        w_A, w_B = factor_weights(spec.weights, chunk, dtype, device)
        A = torch.stack([stack_padded(m.layers, "A", r, in_f, dtype, device) for m in chunk], 1)
        B = torch.stack([stack_padded(m.layers, "B", r, out_f, dtype, device) for m in chunk], 1)
        keep_A = keep_B = None
        if spec.uses_dare:
            keep_A = dare_keep_mask(n, r, in_f, spec.density,
                                    [module_seed(spec.seed, m.name, "A") for m in chunk], device)
            keep_B = dare_keep_mask(n, out_f, r, spec.density,
                                    [module_seed(spec.seed, m.name, "B") for m in chunk], device)
        el_A = el_B = None
        if elections is not None and spec.uses_sign_election:
            el_A = torch.stack([elections[m.name][0] for m in chunk])
            el_B = torch.stack([elections[m.name][1] for m in chunk])
        A_m = merge_dense(A, w_A, spec.method, spec.density, spec.majority, spec.convention, keep_A, el_A,
                          spec.rescale)
        B_m = merge_dense(B, w_B, spec.method, spec.density, spec.majority, spec.convention, keep_B, el_B,
                          spec.rescale)
        for i, m in enumerate(chunk):
            out[m.name] = LoraLayer(A=A_m[i].to(out_dtype).contiguous(), B=B_m[i].to(out_dtype).contiguous(),
                                    scale=1.0)
        done += len(chunk)
        if progress:
            progress(f"merging ({spec.method}, factors)", done, len(modules))
    return out
