"""Pruning of a Hugging Face causal LM, in place, on torch.

Targets are the linear layers of the decoder blocks as :mod:`adapterhub_c.models.arch`
finds them (Llama's q/k/v/o/gate/up/down, Phi-3's fused qkv_proj/gate_up_proj, GPT-2's
Conv1D c_attn/c_proj/c_fc, NeoX's query_key_value/dense_h_to_4h/…); embeddings and the
LM head only when asked. Every score and mask is formed on the weight as [out, in]
(a Conv1D's [in, out] weight is transposed for it), so "row" means one output unit and
2:4 groups run along the inputs whatever the storage layout. Methods:

- magnitude: zero the smallest |W|, per output row ("row") or per matrix ("layer"; for
  a fused linear, per part: q, k and v of a qkv projection are pruned as if separate).
- wanda: zero the smallest |W_ij| * ||X_j||_2, X the layer's calibration inputs.
  Like the Wanda reference code, blocks are processed in order and the statistics of
  block i are taken with blocks < i already pruned; all linears of one block are scored
  from the same (unpruned-block) pass.
- 2:4: in every group of 4 consecutive inputs of a row, zero the 2 smallest by |W|
  (or by the Wanda score when calibration data is given).
- ffn-channels: remove whole MLP intermediate channels (rows of the MLP input linears —
  both halves of a fused gate/up — and columns of the MLP output linear), shrinking the
  layers; gated or not.

Exact counts: a group of n weights keeps round_half_up((1 - sparsity) * n) of them;
ties are broken by position (stable sort), so results are deterministic.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from adapterhub_c.errors import UsageError
from adapterhub_c.models import arch as archmod
from adapterhub_c.progress import Progress
from adapterhub_c.variants.calibration import BlockwiseCalibrator, input_sq_norms, normalise_calibration


def kept_at_sparsity(n: int, *, sparsity: float) -> int:
    """How many of ``n`` weights a group keeps at this sparsity: round((1 - s) * n), halves up."""
    return int(math.floor((1.0 - sparsity) * n + 0.5 + 1e-9))


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the decoder blocks (see ``models.arch``; UsageError when there are none)."""
    return [(b.name, b.module) for b in archmod.describe(model).blocks]


def target_linears(model: nn.Module) -> dict[str, nn.Module]:
    """All decoder-block linear layers of the model (nn.Linear, Conv1D, bnb), by full module name."""
    return {name: info.module for name, info in archmod.describe(model).linears().items()}


# ---- masks ---------------------------------------------------------------------------


def unstructured_mask(scores: torch.Tensor, sparsity: float, granularity: str = "row") -> torch.Tensor:
    """Boolean keep-mask zeroing the lowest scores: per row (dim 1) or over the whole matrix."""
    if granularity == "row":
        n_prune = scores.shape[1] - kept_at_sparsity(scores.shape[1], sparsity=sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if n_prune:
            idx = torch.argsort(scores, dim=1, stable=True)[:, :n_prune]
            mask.scatter_(1, idx, False)
        return mask
    if granularity == "layer":
        flat = scores.reshape(-1)
        n_prune = flat.numel() - kept_at_sparsity(flat.numel(), sparsity=sparsity)
        mask = torch.ones_like(flat, dtype=torch.bool)
        if n_prune:
            mask[torch.argsort(flat, stable=True)[:n_prune]] = False
        return mask.view_as(scores)
    raise UsageError(f"unknown prune granularity {granularity!r}")


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask zeroing the n lowest scores in every group of m consecutive inputs of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise UsageError(f"{n}:{m} pruning needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(groups, dim=2, stable=True)[:, :, :n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, False)
    return mask.reshape(rows, cols)


def _score(weight: torch.Tensor, sq_norm: torch.Tensor | None) -> torch.Tensor:
    """|W| (· ||X_j||_2 with calibration statistics) of an [out, in] weight."""
    score = weight.detach().abs().float()
    if sq_norm is not None:
        score = score * sq_norm.sqrt().to(score.device)[None, :]
    return score


@torch.no_grad()
def _apply_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero a layer's weight where the [out, in] keep-mask is False (any storage layout)."""
    module.weight.mul_(archmod.to_weight_layout(mask, module).to(module.weight.dtype))


def _linear_mask(info: archmod.LinearInfo, score: torch.Tensor, method: str, sparsity: float,
                 granularity: str) -> torch.Tensor:
    """The keep-mask of one block linear; "layer" granularity ranks each fused part on its own."""
    if method == "2:4":
        return n_m_mask(score)
    if granularity != "layer" or info.fused is None:
        return unstructured_mask(score, sparsity, granularity)
    mask = torch.ones_like(score, dtype=torch.bool)
    for label in info.fused.labels:
        rows = info.fused.rows(label).to(score.device)
        mask[rows] = unstructured_mask(score[rows], sparsity, "layer")
    return mask


# ---- unstructured / semi-structured ---------------------------------------------------


def prune_unstructured(
    model: nn.Module,
    method: str,
    sparsity: float = 0.5,
    granularity: str = "row",
    calib_input_ids: Sequence[torch.Tensor] | torch.Tensor | None = None,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Prune in place by `method` (magnitude, wanda, 2:4); returns achieved sparsity per pruned tensor.

    wanda requires calibration input_ids; 2:4 uses them when given. Embeddings are
    always scored by |W| (an embedding has no input activation).
    """
    if method not in ("magnitude", "wanda", "2:4"):
        raise UsageError(f"unknown unstructured pruning method {method!r}")
    rows = normalise_calibration(calib_input_ids)
    if method == "wanda" and not rows:
        raise UsageError("wanda pruning needs calibration input_ids")
    if method == "magnitude":
        rows = []  # magnitude never looks at activations

    def mask_for(weight: torch.Tensor, sq_norm: torch.Tensor | None) -> torch.Tensor:
        score = _score(weight, sq_norm)
        return n_m_mask(score) if method == "2:4" else unstructured_mask(score, sparsity, granularity)

    extras = _extra_targets(model, include_embeddings, include_lm_head)
    arch = archmod.describe(model)
    blocks = arch.blocks
    total = len(blocks) + len(extras)
    result: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        calibrator = BlockwiseCalibrator(model, rows, [b.module for b in blocks]) if rows else None
        for i, block in enumerate(blocks):
            infos = {info.name: info for info in block.linears.values()}
            norms = calibrator.stats(i, {n: info.module for n, info in infos.items()}) if calibrator else {}
            for name, info in infos.items():
                score = _score(archmod.weight_out_in(info.module), norms.get(name))
                mask = _linear_mask(info, score, method, sparsity, granularity)
                _apply_mask(info.module, mask)
                result[name] = 1.0 - mask.float().mean().item()
            if calibrator:
                calibrator.advance(i)
            if progress:
                progress(f"pruning {block.name} ({method})", i + 1, total)
        for j, (name, module) in enumerate(extras.items()):
            sq = None
            if rows and isinstance(module, nn.Linear):
                sq = input_sq_norms(model, rows, {name: module})[name]
            mask = mask_for(module.weight, sq)
            _apply_mask(module, mask)
            result[name] = 1.0 - mask.float().mean().item()
            if progress:
                progress(f"pruning {name} ({method})", len(blocks) + j + 1, total)
    finally:
        model.train(was_training)
    return result


def prune_magnitude(model: nn.Module, sparsity: float, granularity: str = "row", **kw) -> dict[str, float]:
    """Magnitude pruning in place; see `prune_unstructured` for the keyword options."""
    return prune_unstructured(model, "magnitude", sparsity, granularity, **kw)


def prune_wanda(
    model: nn.Module, sparsity: float, calib_input_ids, granularity: str = "row", **kw
) -> dict[str, float]:
    """Wanda pruning in place (score |W|·||X_j||_2, per output row by default)."""
    return prune_unstructured(model, "wanda", sparsity, granularity, calib_input_ids=calib_input_ids, **kw)


def prune_2_4(model: nn.Module, calib_input_ids=None, **kw) -> dict[str, float]:
    """2:4 semi-structured pruning in place (by |W|, or by Wanda score with calibration data)."""
    return prune_unstructured(model, "2:4", 0.5, "row", calib_input_ids=calib_input_ids, **kw)


def _extra_targets(model: nn.Module, include_embeddings: bool, include_lm_head: bool) -> dict[str, nn.Module]:
    """Embeddings / LM head to prune besides the blocks; a tied pair is pruned once."""
    extras: dict[str, nn.Module] = {}
    emb = model.get_input_embeddings() if include_embeddings or include_lm_head else None
    head = model.get_output_embeddings() if include_embeddings or include_lm_head else None
    tied = emb is not None and head is not None and head.weight is emb.weight
    if tied and include_embeddings != include_lm_head:
        raise UsageError("this model ties its LM head to its embeddings: include both or neither")
    names = {id(m): n for n, m in model.named_modules()}
    if include_embeddings and emb is not None:
        extras[names[id(emb)]] = emb
    if include_lm_head and head is not None and not tied:
        if not isinstance(head, nn.Linear):
            raise UsageError(f"the LM head is a {type(head).__name__}, not a linear layer")
        extras[names[id(head)]] = head
    return extras


# ---- structured: MLP intermediate channels -------------------------------------------


def block_mlp(model: nn.Module, block_index: int = 0) -> archmod.MlpInfo:
    """The MLP pairing of one decoder block (UsageError when the block has no recognisable MLP)."""
    arch = archmod.describe(model)
    mlp = arch.blocks[block_index].mlp
    if mlp is None:
        raise UsageError(_no_mlp_message(arch, arch.blocks[block_index]))
    return mlp


def _no_mlp_message(arch: archmod.Architecture, block: archmod.BlockInfo) -> str:
    roles = ", ".join(f"{i.local} ({i.role})" for i in block.linears.values())
    return (f"ffn-channels pruning needs an MLP with input linears and one output linear in one module; "
            f"model type {arch.model_type!r} block {block.name} has {roles}")


def channel_scores(mlp: archmod.MlpInfo, down_sq_norm: torch.Tensor | None) -> torch.Tensor:
    """Importance of each intermediate channel.

    With calibration statistics: ||h_c||_2 · ||W_out[:, c]||_2, h the input of the MLP
    output linear (the channel's activation) — the channel's contribution to the output.
    Without: the product of ||W_in[c]||_2 over the input linears (each half of a fused
    gate/up linear counts as one) and ||W_out[:, c]||_2, a weight-only proxy.
    """
    n = mlp.intermediate
    down = archmod.weight_out_in(getattr(mlp.module, mlp.output)).detach().float().norm(dim=0)
    if down_sq_norm is not None:
        return down_sq_norm.sqrt().to(down.device) * down
    score = down
    for attr in mlp.inputs:
        rows = archmod.weight_out_in(getattr(mlp.module, attr)).detach().float().norm(dim=1)
        for j in range(mlp.halves.get(attr, 1)):
            score = score * rows[j * n:(j + 1) * n].to(score.device)
    return score


def _sliced_linear(lin: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """A copy of ``lin`` keeping ``index`` along ``dim`` of its [out, in] weight (0: outputs, 1: inputs)."""
    w = archmod.weight_out_in(lin).detach().index_select(dim, index.to(lin.weight.device))
    out_f, in_f = w.shape
    if archmod.fan_in_fan_out(lin):
        new = type(lin)(out_f, in_f)  # transformers' Conv1D(nf=out, nx=in), weight [in, out]
        new.to(device=w.device, dtype=w.dtype)
        if lin.bias is None:
            new.bias = None
    else:
        new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(archmod.to_weight_layout(w, lin))
        if lin.bias is not None:
            bias = lin.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.train(lin.training)
    return new


@torch.no_grad()
def shrink_mlp(mlp: archmod.MlpInfo, kept: torch.Tensor) -> None:
    """Keep only the intermediate channels ``kept`` (sorted indices) of an MLP, in place.

    Input linears keep those rows (every half of a fused gate/up linear), the output
    linear those columns.
    """
    kept = torch.as_tensor(kept, dtype=torch.int64)
    rows = {attr: mlp.channel_rows(attr, kept) for attr in mlp.inputs}
    for attr in mlp.inputs:
        setattr(mlp.module, attr, _sliced_linear(getattr(mlp.module, attr), rows[attr], 0))
    setattr(mlp.module, mlp.output, _sliced_linear(getattr(mlp.module, mlp.output), kept, 1))
    if hasattr(mlp.module, "intermediate_size"):
        mlp.module.intermediate_size = int(kept.numel())


def prune_ffn_channels(
    model: nn.Module,
    sparsity: float,
    calib_input_ids: Sequence[torch.Tensor] | torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Remove the least important MLP channels of every block, in place.

    Every block keeps the same number of channels, round((1 - sparsity) * intermediate),
    so the config's MLP width (``intermediate_size``, GPT-2's ``n_inner``, …) stays
    uniform and is updated. Returns the kept channel indices (sorted int64) per MLP
    module name, e.g. 'model.layers.0.mlp'.
    """
    rows = normalise_calibration(calib_input_ids)
    arch = archmod.describe(model)
    for block in arch.blocks:
        if block.mlp is None:
            raise UsageError(_no_mlp_message(arch, block))
    if arch.intermediate_key is None:
        raise UsageError(f"ffn-channels pruning of model type {arch.model_type!r}: no config key holds the "
                         "MLP width, so the pruned model could not be loaded again")
    mlps = [(b.mlp, b) for b in arch.blocks]
    sizes = {mlp.intermediate for mlp, _ in mlps}
    if len(sizes) != 1:
        raise UsageError("ffn-channels pruning needs the same intermediate size in every block")
    size = sizes.pop()
    keep = kept_at_sparsity(size, sparsity=sparsity)
    if keep < 1:
        raise UsageError(f"sparsity {sparsity} would remove every MLP channel")
    kept_all: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        calibrator = BlockwiseCalibrator(model, rows, [b.module for _, b in mlps]) if rows else None
        for i, (mlp, _block) in enumerate(mlps):
            out = getattr(mlp.module, mlp.output)
            sq = calibrator.stats(i, {mlp.name: out})[mlp.name] if calibrator else None
            scores = channel_scores(mlp, sq)
            order = torch.argsort(scores, descending=True, stable=True)[:keep]
            kept = torch.sort(order).values.to(torch.int64).cpu()
            shrink_mlp(mlp, kept)
            kept_all[mlp.name] = kept
            if calibrator:
                calibrator.advance(i)
            if progress:
                progress(f"pruning channels of {mlp.name}", i + 1, len(mlps))
    finally:
        model.train(was_training)
    archmod.set_intermediate_size(model, arch, keep)
    return kept_all
