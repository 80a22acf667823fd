"""One entry point for the quality of a loaded model on a dataset."""
from __future__ import annotations

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.metrics import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_STRIDE,
    completion_perplexity,
    exact_match,
    perplexity,
)


def default_metrics(is_task: bool) -> tuple[str, ...]:
    """Tasks: completion perplexity and exact match; plain text: strided perplexity."""
    return ("completion_ppl", "exact_match") if is_task else ("perplexity",)


def evaluate_model(model, tokenizer, data: str, split: str = "test", max_tokens: int | None = None,
                   max_examples: int | None = None, metrics: tuple[str, ...] | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH, stride: int = DEFAULT_STRIDE,
                   progress=None) -> dict[str, float]:
    """Metrics of a loaded model on a dataset (:func:`default_metrics` unless ``metrics``).

    ``max_tokens`` bounds text perplexity; ``max_examples`` bounds both task metrics,
    which score the same first examples.
    """
    dataset = load_dataset(data, split)
    if metrics is None:
        metrics = default_metrics(dataset.is_task)
    if dataset.is_task and "perplexity" in metrics:
        raise UsageError(f"{data} is a prompt/completion task: measure completion_ppl, not text perplexity")
    if not dataset.is_task and {"completion_ppl", "exact_match"} & set(metrics):
        raise UsageError(f"{data} has no prompt/completion pairs; completion perplexity and exact match need a task")
    # a soft prompt takes positions of the context: shrink the windows so both fit
    k = getattr(model, "num_virtual_tokens", 0)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if k and context and max_length + k > context:
        max_length = context - k
        stride = min(stride, max(1, max_length // 2))
    out: dict[str, float] = {}
    details: dict[str, dict] = {}
    if "perplexity" in metrics:
        ppl = perplexity(model, tokenizer, dataset.as_texts(), max_length=max_length, stride=stride,
                         max_tokens=max_tokens, progress=progress)
        out["perplexity"] = ppl["perplexity"]
        details["perplexity"] = ppl
    if "completion_ppl" in metrics:
        cp = completion_perplexity(model, tokenizer, dataset.pairs, max_length=max_length,
                                   max_examples=max_examples, progress=progress)
        out["completion_ppl"] = cp["completion_ppl"]
        details["completion_ppl"] = cp
    if "exact_match" in metrics:
        em = exact_match(model, tokenizer, dataset.pairs, max_examples=max_examples, progress=progress)
        out["exact_match"] = em["exact_match"]
        details["exact_match"] = em
    out["_details"] = details  # type: ignore[assignment]
    return out
