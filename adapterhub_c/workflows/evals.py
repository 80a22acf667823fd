"""Registry operations: evaluate a stack on a dataset, generate text."""
from __future__ import annotations

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.evaluate import evaluate_model
from adapterhub_c.evals.metrics import greedy_generate
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.evaluations import record_evaluations
from adapterhub_c.runtime.stack import load_stack, resolve_stack


def run_eval(reg: Registry, target: str, data: str, split: str = "test", variant: str | None = None,  # noqa: PLR0913 - the stack (variant, adapter, prompt) and the evaluation budget
             adapter: str | None = None, prompt: str | None = None, max_tokens: int | None = None,
             max_examples: int | None = None, device: str | None = "cpu", progress=None) -> dict:
    """Evaluate TARGET (+ variant/adapter/prompt) on DATA and record the results."""
    for opt, value in (("max_tokens", max_tokens), ("max_examples", max_examples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{opt} must be a positive integer (got {value!r})")
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
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be a positive integer (got {max_new_tokens!r})")
    spec = resolve_stack(reg, target, variant, adapter, prompt)
    model, tokenizer = load_stack(reg, spec, device)
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
