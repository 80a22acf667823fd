"""Registry operations: evaluate a stack on a dataset, generate text."""
from __future__ import annotations

from ..errors import UsageError
from ..models.stack import StackSpec, load_stack, resolve_stack
from ..registry.models import Evaluation
from ..registry.runs import record_run
from ..registry.store import Registry
from .data import load_dataset
from .metrics import DEFAULT_MAX_LENGTH, DEFAULT_STRIDE, exact_match, perplexity


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


def record_evaluations(reg: Registry, spec: StackSpec, data: str, split: str, results: dict,
                       run_id: str | None) -> None:
    """Store one ``evaluations`` row per metric."""
    details = results.get("_details", {})
    with reg.session() as s:
        for metric, value in results.items():
            if metric.startswith("_"):
                continue
            s.add(Evaluation(dataset=data, split=split, metric=metric, value=float(value),
                             details=details.get(metric, {}), run_id=run_id, **spec.ids()))


def run_eval(reg: Registry, target: str, data: str, split: str = "test", variant: str | None = None,
             adapter: str | None = None, prompt: str | None = None, max_tokens: int | None = None,
             max_examples: int | None = None, device: str | None = "cpu", progress=None) -> dict:
    """Evaluate TARGET (+ variant/adapter/prompt) on DATA and record the results."""
    spec = resolve_stack(reg, target, variant, adapter, prompt)
    load_dataset(data, split)  # fail fast on bad data before loading a model
    params = dict(target=target, data=data, split=split, variant=variant, adapter=adapter, prompt=prompt,
                  max_tokens=max_tokens, max_examples=max_examples)
    with record_run(reg, "eval", params) as run:
        model, tokenizer = load_stack(reg, spec, device)
        results = evaluate_model(model, tokenizer, data, split, max_tokens=max_tokens,
                                 max_examples=max_examples, progress=progress)
        record_evaluations(reg, spec, data, split, results, run.id)
        row = {"target": spec.describe(), "data": data, "split": split,
               **{k: v for k, v in results.items() if not k.startswith("_")}}
        run.output = row
        return row


def run_generate(reg: Registry, target: str, text: str, max_new_tokens: int = 64, chat: bool = False,
                 variant: str | None = None, adapter: str | None = None, prompt: str | None = None,
                 device: str | None = "cpu") -> str:
    """Greedy continuation of ``text`` (as a chat turn with ``chat``)."""
    from .metrics import greedy_generate

    spec = resolve_stack(reg, target, variant, adapter, prompt)
    model, tokenizer = load_stack(reg, spec, device)
    if max_new_tokens <= 0:
        raise UsageError("--max-new-tokens must be positive")
    context = getattr(model.config, "max_position_embeddings", None)
    if chat:
        if not tokenizer.chat_template:
            raise UsageError(f"{spec.base.name} has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    n_prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + getattr(model, "num_virtual_tokens", 0)
    if context and n_prompt + max_new_tokens > context:
        raise UsageError(f"{n_prompt} prompt tokens + {max_new_tokens} new tokens exceed the context of {context}")
    return greedy_generate(model, tokenizer, text, max_new_tokens, stop_at_newline=False)
