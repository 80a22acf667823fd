"""One entry point for the quality of a loaded model on a dataset."""
from __future__ import annotations

from dataclasses import dataclass, field

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import Dataset, load_dataset
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


@dataclass(frozen=True)
class Scores:
    """Metric values of one model on one dataset, with each metric's details.

    ``details``: metric → what the metric function reported (counts, intervals; stored with
    the evaluation row). ``role``: what the measured model was ("teacher", …), if said.
    """

    values: dict[str, float]
    details: dict[str, dict] = field(default_factory=dict)
    role: str | None = None

    def tagged(self, role: str) -> "Scores":
        """The same scores, each metric's details saying the measured model's role."""
        return Scores(dict(self.values), {m: {**d, "role": role} for m, d in self.details.items()}, role)

    def as_dict(self) -> dict:
        """The legacy form: the values plus ``"_details"`` (what ``evaluate_model`` returns)."""
        return {**self.values, "_details": self.details}


def score_dataset(model, tokenizer, dataset: Dataset, max_tokens: int | None = None,
                  max_examples: int | None = None, metrics: tuple[str, ...] | None = None,
                  max_length: int = DEFAULT_MAX_LENGTH, stride: int = DEFAULT_STRIDE, progress=None) -> Scores:
    """Metrics of a loaded model on an already loaded dataset (:func:`default_metrics` unless ``metrics``).

    ``max_tokens`` bounds text perplexity; ``max_examples`` bounds both task metrics,
    which score the same first examples.
    """
    if metrics is None:
        metrics = default_metrics(dataset.is_task)
    if dataset.is_task and "perplexity" in metrics:
        raise UsageError(f"{dataset.name} is a prompt/completion task: measure completion_ppl, not text perplexity")
    if not dataset.is_task and {"completion_ppl", "exact_match"} & set(metrics):
        raise UsageError(f"{dataset.name} has no prompt/completion pairs; completion perplexity and exact match "
                         "need a task")
    # a soft prompt takes positions of the context: shrink the windows so both fit
    k = getattr(model, "num_virtual_tokens", 0)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if k and context and max_length + k > context:
        max_length = context - k
        stride = min(stride, max(1, max_length // 2))
    details: dict[str, dict] = {}
    if "perplexity" in metrics:
        details["perplexity"] = perplexity(model, tokenizer, dataset.as_texts(), max_length=max_length,
                                           stride=stride, max_tokens=max_tokens, progress=progress)
    if "completion_ppl" in metrics:
        details["completion_ppl"] = completion_perplexity(model, tokenizer, dataset.pairs, max_length=max_length,
                                                          max_examples=max_examples, progress=progress)
    if "exact_match" in metrics:
        details["exact_match"] = exact_match(model, tokenizer, dataset.pairs, max_examples=max_examples,
                                             progress=progress)
    return Scores({m: d[m] for m, d in details.items()}, details)


def evaluate_model(model, tokenizer, data: str, split: str = "test", max_tokens: int | None = None,
                   max_examples: int | None = None, metrics: tuple[str, ...] | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH, stride: int = DEFAULT_STRIDE,
                   progress=None) -> dict[str, float]:
    """Metrics of a loaded model on dataset ``data`` (``score_dataset`` after loading it), as a dict.

    The values by metric name, plus ``"_details"`` (each metric's details).
    """
    return score_dataset(model, tokenizer, load_dataset(data, split), max_tokens=max_tokens,
                         max_examples=max_examples, metrics=metrics, max_length=max_length, stride=stride,
                         progress=progress).as_dict()


@dataclass(frozen=True)
class EvalData:
    """An evaluation dataset named once and loaded once: its spec, split and texts or pairs."""

    spec: str
    split: str
    dataset: Dataset

    @classmethod
    def load(cls, spec: str, split: str = "test") -> "EvalData":
        """Load ``spec``'s ``split`` (bad names and files raise here, before any model is loaded)."""
        return cls(spec, split, load_dataset(spec, split))

    def score(self, model, tokenizer, *, max_tokens: int | None = None, max_examples: int | None = None,
              progress=None) -> Scores:
        """``score_dataset`` of ``model`` on this data."""
        return score_dataset(model, tokenizer, self.dataset, max_tokens=max_tokens, max_examples=max_examples,
                             progress=progress)
