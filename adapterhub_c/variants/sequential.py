"""GPTQ / SparseGPT over a whole model: the decoder blocks in order, each calibrated on the
outputs of the blocks already compressed (the reference ``opt.py`` / ``llama.py`` scheme).

For block i, one pass of the cached calibration inputs through the block accumulates the
Hessian of every linear in it (hessian.HessianAccumulator, the reference's ``add_batch``);
every linear is then compressed (gptq.py / sparsegpt.py), its weight replaced by the Ŵ it
will be stored as (packed.py: codes × fp16 scales, or kept values in 16 bits, in the base's
storage dtype), and the block's outputs on the compressed weights become block i+1's inputs.
Every architecture models/arch.py describes works: a Conv1D's [in, out] weight is handled as
its [out, in] matrix, a fused qkv / gate-up linear as one matrix with one Hessian.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from adapterhub_c.errors import UsageError
from adapterhub_c.models import arch as archmod
from adapterhub_c.progress import Progress
from adapterhub_c.variants.calibration import BlockwiseCalibrator, normalise_calibration
from adapterhub_c.variants.gptq import QuantSpec, check_group_size, gptq_layer
from adapterhub_c.variants.hessian import HessianAccumulator
from adapterhub_c.variants.packed import StoredWeight, value_dtype
from adapterhub_c.variants.recipe import Recipe
from adapterhub_c.variants.sparsegpt import check_sparsity, sparsegpt_layer


def quant_spec(recipe: Recipe) -> QuantSpec | None:
    """The recipe's GPTQ settings (None without gptq); scales are stored, and chosen, in fp16."""
    if recipe.quant != "gptq":
        return None
    return QuantSpec(bits=recipe.bits, group_size=recipe.group_size, act_order=recipe.act_order, sym=recipe.sym)


def _n_m(recipe: Recipe) -> tuple[int, int]:
    return (2, 4) if recipe.prune == "sparsegpt:2:4" else (0, 0)


def check_layers(model: nn.Module, recipe: Recipe) -> None:
    """UsageError before any work when the group size or the n:m pattern does not fit a layer (named)."""
    spec, (n, m) = quant_spec(recipe), _n_m(recipe)
    for name, info in archmod.describe(model).linears().items():
        if spec is not None:
            check_group_size(spec, info.in_features, name)
        if recipe.prune != "none":
            check_sparsity(recipe.sparsity, n, m, info.in_features, name)


def compress_linear(info: archmod.LinearInfo, H: torch.Tensor, recipe: Recipe,
                    storage_dtype: torch.dtype | None) -> StoredWeight:
    """GPTQ and / or SparseGPT of one linear from its Hessian (consumed): what the variant stores of it."""
    W = archmod.weight_out_in(info.module).detach().float()
    shape, transposed = (int(W.shape[0]), int(W.shape[1])), info.fan_in_fan_out
    spec = quant_spec(recipe)
    if recipe.prune == "none":
        res = gptq_layer(W, H, spec, layer=info.name)
        perm = res.perm.to(torch.int32).cpu() if res.perm is not None else None
        return StoredWeight(shape, transposed, codes=res.codes.cpu(), scales=res.scales.half().cpu(),
                            zeros=res.zeros.to(torch.uint8).cpu(), perm=perm, bits=spec.bits)
    n, m = _n_m(recipe)
    res = sparsegpt_layer(W, H, sparsity=recipe.sparsity, n=n, m=m, quant=spec, layer=info.name)
    keep = res.keep.cpu()
    if res.grid is None:
        kept = res.Q.cpu()[keep]
        return StoredWeight(shape, transposed, keep=keep, values=kept.to(value_dtype(storage_dtype, kept)))
    grid = res.grid
    return StoredWeight(shape, transposed, keep=keep, codes=grid.codes.cpu()[keep], scales=grid.scales.half().cpu(),
                        zeros=grid.zeros.to(torch.uint8).cpu(), bits=spec.bits)


@torch.no_grad()
def _replace_weight(module: nn.Module, stored: StoredWeight, storage_dtype: torch.dtype | None) -> None:
    """Set the layer's weight to Ŵ as it will load: in the storage dtype, then the model's."""
    dtype = storage_dtype or module.weight.dtype
    module.weight.copy_(stored.tensor(dtype).to(device=module.weight.device, dtype=module.weight.dtype))


def _compress_block(calibrator: BlockwiseCalibrator, i: int, block: archmod.BlockInfo, recipe: Recipe,
                    storage_dtype: torch.dtype | None) -> dict[str, StoredWeight]:
    """Block i: Hessians of its linears from one pass of the current inputs, then each compressed in place."""
    infos = {info.name: info for info in block.linears.values()}
    accs = {name: HessianAccumulator(info.in_features, info.module.weight.device) for name, info in infos.items()}
    calibrator.observe(i, {n: info.module for n, info in infos.items()}, lambda n, x: accs[n].add(x))
    out = {}
    for name, info in infos.items():
        out[name] = compress_linear(info, accs.pop(name).H, recipe, storage_dtype)
        _replace_weight(info.module, out[name], storage_dtype)
    return out


def compress_sequential(model: nn.Module, recipe: Recipe, calib_input_ids: Sequence[torch.Tensor] | torch.Tensor,
                        storage_dtype: torch.dtype | None = None,
                        progress: Progress | None = None) -> tuple[dict[str, StoredWeight], dict[str, float]]:
    """Compress every decoder-block linear in place; returns ({weight name: StoredWeight}, {layer: sparsity})."""
    if not recipe.uses_obs:
        raise UsageError(f"recipe {recipe.describe()!r} uses neither gptq nor sparsegpt")
    rows = normalise_calibration(calib_input_ids)
    if not rows:
        raise UsageError(f"{recipe.describe()} needs calibration data (give calib, e.g. builtin:pydoc)")
    check_layers(model, recipe)
    blocks = archmod.describe(model).blocks
    stored: dict[str, StoredWeight] = {}
    sparsity: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        calibrator = BlockwiseCalibrator(model, rows, [b.module for b in blocks])
        for i, block in enumerate(blocks):
            for name, weight in _compress_block(calibrator, i, block, recipe, storage_dtype).items():
                stored[f"{name}.weight"] = weight
                if weight.keep is not None:
                    sparsity[name] = 1.0 - weight.keep.float().mean().item()
            calibrator.advance(i)
            if progress:
                progress(f"{recipe.describe()}: {block.name}", i + 1, len(blocks))
    finally:
        model.train(was_training)
    return stored, sparsity
