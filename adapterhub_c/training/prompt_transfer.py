"""Prompt transfer across compressed variants (Compress, Then Prompt, Figure 5).

``transfer_matrix`` applies every prompt to every model and measures perplexity: rows
are where a prompt was learned (plus a "no prompt" row), columns where it is applied.
``plot_transfer`` draws the matrix as an annotated heat map.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.metrics import DEFAULT_MAX_LENGTH, DEFAULT_STRIDE, perplexity
from adapterhub_c.fsutil import atomic_write_bytes
from adapterhub_c.progress import Progress
from adapterhub_c.training.prompt import PromptedModel, SoftPrompt, context_length

NO_PROMPT = "no prompt"


def transfer_matrix(prompts: dict[str, SoftPrompt], models: dict[str, object], tokenizer,
                    texts: list[str], max_tokens: int | None = None,
                    max_length: int = DEFAULT_MAX_LENGTH, stride: int = DEFAULT_STRIDE,
                    progress: Progress | None = None) -> dict:
    """Perplexity of each (prompt, model) pair on ``texts``.

    Returns ``{"rows": ["no prompt", *prompt names], "columns": [*model names],
    "values": [[ppl, …], …], "metric": "perplexity", "max_length", "stride", "tokens"}``.
    Every cell uses the same windows: ``max_length`` is shrunk, where needed, so that the
    longest prompt plus a window fits each model's context.
    """
    if not models:
        raise UsageError("no models to apply the prompts to")
    longest = max((p.num_virtual_tokens for p in prompts.values()), default=0)
    for name, model in models.items():
        context = context_length(getattr(model, "config", None))
        if context is not None:
            if longest >= context:
                raise UsageError(f"a {longest}-token prompt does not fit model {name!r} "
                                 f"(context {context})")
            max_length = min(max_length, context - longest)
    stride = min(stride, max_length)
    rows = [NO_PROMPT, *prompts]
    values: list[list[float]] = []
    total, done, tokens = len(rows) * len(models), 0, None
    for row in rows:
        line = []
        for model in models.values():
            target = model if row == NO_PROMPT else PromptedModel(model, prompts[row], freeze_inner=False)
            result = perplexity(target, tokenizer, texts, max_length=max_length, stride=stride,
                                max_tokens=max_tokens)
            line.append(result["perplexity"])
            tokens = result["tokens"]
            done += 1
            if progress:
                progress("prompt transfer", done, total)
        values.append(line)
    return {"rows": rows, "columns": list(models), "values": values, "metric": "perplexity",
            "max_length": max_length, "stride": stride, "tokens": tokens}


def plot_transfer(matrix: dict, path: str | Path, title: str = "Soft-prompt transfer (perplexity)") -> Path:
    """Draw ``matrix`` (from ``transfer_matrix``) as an annotated heat map PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols, values = matrix["rows"], matrix["columns"], matrix["values"]
    if not rows or not cols or len(values) != len(rows) or any(len(v) != len(cols) for v in values):
        raise UsageError("transfer matrix is empty or its values do not match rows × columns")
    # Figure + Agg canvas directly: no pyplot global state, no backend switch for callers.
    fig = Figure(figsize=(2.6 + 1.3 * len(cols), 1.6 + 0.7 * len(rows)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = [v for line in values for v in line if v is not None and math.isfinite(v)]
    image = ax.imshow([[math.nan if v is None else v for v in line] for line in values],
                      cmap="viridis_r", aspect="auto",
                      vmin=min(finite) if finite else None, vmax=max(finite) if finite else None)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("applied to")
    ax.set_ylabel("prompt learned on")
    ax.set_title(title)
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, line in enumerate(values):
        for j, v in enumerate(line):
            text = "—" if v is None or not math.isfinite(v) else f"{v:.2f}"
            # viridis_r is dark at high values: white text there, black elsewhere.
            colour = "white" if v is not None and math.isfinite(v) and v > middle else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    fig.colorbar(image, ax=ax, label=matrix.get("metric", "perplexity"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
