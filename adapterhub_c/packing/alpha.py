"""Choosing ComPEFT's alpha on validation data, with the model built once.

The paper sweeps alpha by hand over ``ALPHA_GRID`` (``../shared/ANCHORS.md``); we
evaluate every grid point and keep the best. For ``delta-fit`` packs, whose scale is
already fitted to each module in closed form, the search is over a gain around that fit
(:data:`.deltafit.GAIN_GRID`). The model (base or variant) is loaded once
and the adapter is attached once; each grid point only copies new LoRA factors (and
recovery D/U) into the attached layers (:class:`AdapterSlot`), so a grid costs one model
load plus one evaluation per alpha.

Criterion (``metric``):

- ``perplexity`` (text corpora; lower is better): strided perplexity of the validation
  texts with windows of 512 tokens moved by 512 (no overlap: every token scored once,
  half the cost of ``adapt eval``'s stride 256), at most ``max_tokens`` tokens. Asked
  for on a task, it means ``completion_ppl``.
- ``completion_ppl`` (tasks; lower is better): completion perplexity
  (:func:`~adapterhub_c.evals.metrics.completion_perplexity`) of at most ``max_examples``
  validation examples.
- ``exact_match`` (tasks; higher is better): greedy exact match on the same examples,
  ties broken by their completion perplexity.

The top-k selection does not depend on alpha, only the magnitude ``alpha · std`` does;
the grid still goes through the full pack path for each alpha so the evaluated weights
are bit for bit those a pack with that alpha decodes to.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from adapterhub_c.adapters.attach import copy_lora, load_adapted, retarget
from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.recovery import recovery_modules
from adapterhub_c.errors import UsageError
from adapterhub_c.evals.metrics import completion_perplexity, exact_match, perplexity
from adapterhub_c.packing.deltafit import GAIN_GRID

ALPHA_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
GRIDS = {"compeft": ALPHA_GRID, "delta-fit": GAIN_GRID}  # stc has no alpha
METRICS = ("auto", "perplexity", "completion_ppl", "exact_match")
SEARCH_WINDOW = 512


class AdapterSlot:
    """A model with an adapter attached once, whose weights can be swapped in place.

    ``model`` is the bare base or variant (it is wrapped in place by PEFT). Every adapter
    given to :meth:`set` must have the same modules and shapes as the first one.
    """

    def __init__(self, model: torch.nn.Module, first: LoadedAdapter):
        # module names as the model has them, computed before PEFT wraps the model
        self._mapping = retarget(first.lora.modules(), model)
        self.model = load_adapted(model, first.lora, first.recovery_state, first.recovery_config)
        self._recovery = recovery_modules(self.model) if first.recovery_state else {}
        self._modules = set(first.lora.modules())

    @torch.no_grad()
    def set(self, adapter: LoadedAdapter) -> None:
        """Copy ``adapter``'s LoRA factors (and recovery D/U) into the attached layers."""
        layers = adapter.lora.layers()
        if set(layers) != self._modules:
            raise UsageError("the adapter's modules differ from those attached")
        parts = {}
        for module, layer in layers.items():
            parts[self._mapping[module]] = {"A": layer.A, "B": layer.B,
                                            **({"bias": layer.bias} if layer.bias is not None else {})}
        copy_lora(self.model, parts)
        state = adapter.recovery_state or {}
        if set(state) != {f"{n}.recovery_{p}" for n in self._recovery for p in "DU"}:
            raise UsageError("the adapter's recovery modules differ from those attached")
        for name, rec in self._recovery.items():
            rec.D.copy_(state[f"{name}.recovery_D"].to(rec.D.device, rec.D.dtype))
            rec.U.copy_(state[f"{name}.recovery_U"].to(rec.U.device, rec.U.dtype))


def search_grid(method: str) -> tuple[float, ...]:
    """The values ``--alpha auto`` tries for a pack method: ComPEFT's alpha grid, delta-fit's gains."""
    try:
        return GRIDS[method]
    except KeyError:
        raise UsageError(f"--alpha auto needs method {' or '.join(GRIDS)} ({method} ignores alpha)") from None


def resolve_metric(metric: str, is_task: bool) -> str:
    """The criterion actually used: ``auto`` → exact_match on tasks, perplexity on text;
    on a task, ``perplexity`` is its completion perplexity."""
    if metric not in METRICS:
        raise UsageError(f"alpha metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "auto":
        return "exact_match" if is_task else "perplexity"
    if metric in ("exact_match", "completion_ppl") and not is_task:
        raise UsageError(f"{metric} needs a task dataset (prompt/completion pairs)")
    if metric == "perplexity" and is_task:
        return "completion_ppl"
    return metric


def evaluate_for_search(model, tokenizer, dataset, metric: str, max_tokens: int | None,
                        max_examples: int | None) -> dict[str, float]:
    """The search criterion for one set of weights: perplexity on text; completion
    perplexity (+ exact match) of the first ``max_examples`` examples of a task."""
    if not dataset.is_task:
        return {"perplexity": perplexity(model, tokenizer, dataset.texts, max_length=SEARCH_WINDOW,
                                         stride=SEARCH_WINDOW, max_tokens=max_tokens)["perplexity"]}
    out = {"completion_ppl": completion_perplexity(model, tokenizer, dataset.pairs,
                                                   max_examples=max_examples)["completion_ppl"]}
    if metric == "exact_match":
        out["exact_match"] = exact_match(model, tokenizer, dataset.pairs, max_examples=max_examples)["exact_match"]
    return out


def sort_key(metric: str) -> Callable[[dict], tuple]:
    """Smaller is better: perplexity, completion perplexity, or (-exact match, completion perplexity)."""
    if metric == "exact_match":
        return lambda p: (-p["exact_match"], _finite(p["completion_ppl"]))
    return lambda p: (_finite(p[metric]),)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def search_alpha(evaluate: Callable[[float], dict], metric: str, grid: Sequence[float] = ALPHA_GRID,
                 progress=None) -> tuple[float, list[dict]]:
    """Evaluate every alpha of ``grid``; returns (best alpha, curve).

    ``evaluate(alpha)`` returns the metrics of the model with that alpha's weights. The
    curve is ``[{"alpha", "perplexity"}, …]`` on text, ``[{"alpha", "completion_ppl",
    ("exact_match")}, …]`` on a task, in grid order; the best is the first point with the smallest :func:`sort_key`.
    """
    if not grid:
        raise UsageError("empty alpha grid")
    curve = []
    for i, a in enumerate(grid):
        curve.append({"alpha": float(a), **evaluate(float(a))})
        if progress:
            progress("alpha search", i + 1, len(grid))
    best = min(curve, key=sort_key(metric))
    return best["alpha"], curve


def plot_alpha_curve(curve: list[dict], path: str | Path, metric: str, best: float,
                     reference: dict | None = None, title: str | None = None) -> Path:
    """Draw the curve (primary metric against alpha, log x) as a PNG; the unpacked
    adapter's value as a dashed line when ``reference`` is given; the best alpha marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    xs = [p["alpha"] for p in curve]
    ys = [p[metric] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.plot(xs, ys, "o-", label="pack", color="tab:blue")
        b = next(p for p in curve if p["alpha"] == best)
        ax.plot([best], [b[metric]], "*", markersize=16, color="tab:red", label=f"best alpha = {best:g}")
        if reference is not None and metric in reference:
            ax.axhline(reference[metric], linestyle="--", color="gray", label="unpacked adapter")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_xlabel("alpha (magnitude = alpha · std)")
        ax.set_ylabel(metric.replace("_", " ") + ("" if metric == "exact_match" else " (lower is better)"))
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
