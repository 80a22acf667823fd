"""Pruning of a Hugging Face causal LM, in place, on torch.

Targets are the linear layers of the decoder blocks (q/k/v/o/gate/up/down
projections); embeddings and the LM head only when asked. Methods:

- magnitude: zero the smallest |W|, per output row ("row") or per matrix ("layer").
- wanda: zero the smallest |W_ij| * ||X_j||_2, X the layer's calibration inputs.
  Like the Wanda reference code, blocks are processed in order and the statistics of
  block i are taken with blocks < i already pruned; all linears of one block are scored
  from the same (unpruned-block) pass.
- 2:4: in every group of 4 consecutive inputs of a row, zero the 2 smallest by |W|
  (or by the Wanda score when calibration data is given).
- ffn-channels: remove whole MLP intermediate channels of a gated MLP (rows of
  gate_proj / up_proj, columns of down_proj), shrinking the layers.

Exact counts: a group of n weights keeps round_half_up((1 - sparsity) * n) of them;
ties are broken by position (stable sort), so results are deterministic.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from adapterhub_c.errors import UsageError
from adapterhub_c.variants.calibration import BlockwiseCalibrator, input_sq_norms, normalise_calibration

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Progress = Callable[[str, int, "int | None"], None]


def kept_at_sparsity(n: int, *, sparsity: float) -> int:
    """How many of ``n`` weights a group keeps at this sparsity: round((1 - s) * n), halves up."""
    return int(math.floor((1.0 - sparsity) * n + 0.5 + 1e-9))


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the decoder blocks: the first ModuleList holding projection linears."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and block_linears(module[0]):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise UsageError(
        f"{type(model).__name__} has no decoder blocks with {'/'.join(PROJECTIONS)} linear layers; "
        "pruning supports Llama-style architectures"
    )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The projection linears of one block, by their name inside the block."""
    return {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All decoder-block projection linears of the model, by full module name."""
    out = {}
    for prefix, block in decoder_blocks(model):
        out.update({f"{prefix}.{name}": mod for name, mod in block_linears(block).items()})
    return out


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
    score = weight.detach().abs().float()
    if sq_norm is not None:
        score = score * sq_norm.sqrt().to(score.device)[None, :]
    return score


@torch.no_grad()
def _apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    weight.mul_(mask.to(weight.dtype))


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
    blocks = decoder_blocks(model)
    total = len(blocks) + len(extras)
    result: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        calibrator = BlockwiseCalibrator(model, rows, [b for _, b in blocks]) if rows else None
        for i, (prefix, block) in enumerate(blocks):
            linears = {f"{prefix}.{n}": m for n, m in block_linears(block).items()}
            norms = calibrator.stats(i, linears) if calibrator else {}
            for name, lin in linears.items():
                mask = mask_for(lin.weight, norms.get(name))
                _apply_mask(lin.weight, mask)
                result[name] = 1.0 - mask.float().mean().item()
            if calibrator:
                calibrator.advance(i)
            if progress:
                progress(f"pruning {prefix} ({method})", i + 1, total)
        for j, (name, module) in enumerate(extras.items()):
            sq = None
            if rows and isinstance(module, nn.Linear):
                sq = input_sq_norms(model, rows, {name: module})[name]
            mask = mask_for(module.weight, sq)
            _apply_mask(module.weight, mask)
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


def gated_mlp(block: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the block's gated MLP (with gate_proj, up_proj, down_proj linears)."""
    for name, mod in block.named_modules():
        parts = [getattr(mod, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if all(isinstance(p, nn.Linear) for p in parts):
            return name, mod
    raise UsageError("ffn-channels pruning needs a gated MLP (gate_proj, up_proj, down_proj); this model has none")


def channel_scores(mlp: nn.Module, down_sq_norm: torch.Tensor | None) -> torch.Tensor:
    """Importance of each intermediate channel.

    With calibration statistics: ||h_c||_2 · ||W_down[:, c]||_2, h the input of
    down_proj (the channel's activation) — the channel's contribution to the output.
    Without: ||W_gate[c]||_2 · ||W_up[c]||_2 · ||W_down[:, c]||_2, a weight-only proxy.
    """
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    if down_sq_norm is not None:
        return down_sq_norm.sqrt().to(down.device) * down
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    return gate * up * down


def _sliced_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    w = lin.weight.detach().index_select(dim, index.to(lin.weight.device))
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            bias = lin.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.train(lin.training)
    return new


@torch.no_grad()
def shrink_mlp(mlp: nn.Module, kept: torch.Tensor) -> None:
    """Keep only the intermediate channels `kept` (sorted indices) of a gated MLP, in place."""
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, kept, 0)
    mlp.up_proj = _sliced_linear(mlp.up_proj, kept, 0)
    mlp.down_proj = _sliced_linear(mlp.down_proj, kept, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(kept.numel())


def prune_ffn_channels(
    model: nn.Module,
    sparsity: float,
    calib_input_ids: Sequence[torch.Tensor] | torch.Tensor | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Remove the least important MLP channels of every block, in place.

    Every block keeps the same number of channels, round((1 - sparsity) * intermediate),
    so `model.config.intermediate_size` stays uniform and is updated. Returns the kept
    channel indices (sorted int64) per MLP module name, e.g. 'model.layers.0.mlp'.
    """
    rows = normalise_calibration(calib_input_ids)
    blocks = decoder_blocks(model)
    mlps = [(f"{prefix}.{gated_mlp(block)[0]}", gated_mlp(block)[1], block) for prefix, block in blocks]
    sizes = {mlp.down_proj.in_features for _, mlp, _ in mlps}
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
        calibrator = BlockwiseCalibrator(model, rows, [b for _, _, b in mlps]) if rows else None
        for i, (name, mlp, _block) in enumerate(mlps):
            sq = calibrator.stats(i, {name: mlp.down_proj})[name] if calibrator else None
            scores = channel_scores(mlp, sq)
            order = torch.argsort(scores, descending=True, stable=True)[:keep]
            kept = torch.sort(order).values.to(torch.int64).cpu()
            shrink_mlp(mlp, kept)
            kept_all[name] = kept
            if calibrator:
                calibrator.advance(i)
            if progress:
                progress(f"pruning channels of {name}", i + 1, len(mlps))
    finally:
        model.train(was_training)
    if hasattr(model, "config") and hasattr(model.config, "intermediate_size"):
        model.config.intermediate_size = keep
    return kept_all
