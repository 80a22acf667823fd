from __future__ import annotations

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.metrics import DEFAULT_MAX_LENGTH, DEFAULT_STRIDE, exact_match, perplexity


def evaluate_model(model, tokenizer, data: str, split: str = "test", max_tokens: int | None = None,
                   max_examples: int | None = None, metrics: tuple[str, ...] | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH, stride: int = DEFAULT_STRIDE,
                   progress=None) -> dict[str, float]:
    """Metrics of a loaded model on a dataset: perplexity always, exact match for tasks."""
    dataset = load_dataset(data, split)
    if metrics is None:
        metrics = ("perplexity", "exact_match") if dataset.is_task else ("perplexity",)
    out: dict[str, float] = {}
    details: dict[str, dict] = {}
    if "perplexity" in metrics:
        # a soft prompt takes positions of the context: shrink the windows so both fit
        k = getattr(model, "num_virtual_tokens", 0)
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if k and context and max_length + k > context:
            max_length = context - k
            stride = min(stride, max(1, max_length // 2))
        ppl = perplexity(model, tokenizer, dataset.as_texts(), max_length=max_length, stride=stride,
                         max_tokens=max_tokens, progress=progress)
        out["perplexity"] = ppl["perplexity"]
        details["perplexity"] = ppl
    if "exact_match" in metrics:
        if not dataset.is_task:
            raise UsageError(f"{data} has no prompt/completion pairs; exact match needs a task")
        em = exact_match(model, tokenizer, dataset.pairs, max_examples=max_examples, progress=progress)
        out["exact_match"] = em["exact_match"]
        details["exact_match"] = em
    out["_details"] = details  # type: ignore[assignment]
    return out
