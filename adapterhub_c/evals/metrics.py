"""Perplexity of plain text (sliding windows), completion perplexity and exact match of tasks.

Text perplexity follows the usual strided evaluation: the texts are joined with the EOS token
into one token stream, windows of ``max_length`` tokens move by ``stride`` tokens, and
each window scores only the tokens not scored by the previous window, so every token is
scored once with up to ``max_length - stride`` tokens of left context. The model may be
any module whose forward takes ``input_ids`` and returns ``.logits`` aligned with them.

Prompt/completion tasks are never scored as one joined text (that mostly measures how
well the model predicts the prompts). Completion perplexity is exp of the mean NLL of
the completion tokens given the prompt, the prompt fed exactly as exact match feeds it
(:func:`prompt_ids`); examples are right-padded into batches, and the mean is the sum of
token NLLs over the number of completion tokens, so batching does not change it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from adapterhub_c.errors import UsageError
from adapterhub_c.progress import Progress

DEFAULT_MAX_LENGTH = 512
DEFAULT_STRIDE = 256
DEFAULT_BATCH_SIZE = 8
IGNORE = -100
# what an evaluation may report, in table order
QUALITY_METRICS = ("exact_match", "completion_ppl", "perplexity")


def token_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the texts joined by EOS, cut at ``max_tokens``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    if max_tokens:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = DEFAULT_MAX_LENGTH,
               stride: int = DEFAULT_STRIDE, max_tokens: int | None = None,
               progress: Progress | None = None) -> dict:
    """Strided perplexity of ``texts``: {'perplexity', 'nll', 'tokens', 'max_length', 'stride'}."""
    if stride <= 0 or stride > max_length:
        raise UsageError("stride must be in (0, max_length]")
    ids = token_stream(tokenizer, texts, max_tokens)
    if ids.numel() < 2:
        raise UsageError("not enough text to measure perplexity (fewer than 2 tokens)")
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, counted, prev_end = 0.0, 0, 0
    starts = list(range(0, ids.numel(), stride))
    for i, begin in enumerate(starts):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].unsqueeze(0).to(device)
        n_new = end - max(prev_end, begin + 1) if prev_end else end - begin - 1
        logits = model(input_ids=window).logits.float()
        # predict token t from position t-1; score only the last n_new targets
        shift_logits = logits[0, :-1][-n_new:]
        targets = window[0, 1:][-n_new:]
        nll_sum += F.cross_entropy(shift_logits, targets, reduction="sum").item()
        counted += n_new
        prev_end = end
        if progress:
            progress("perplexity", i + 1, len(starts))
        if end == ids.numel():
            break
    model.train(was_training)
    nll = nll_sum / counted
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": counted,
            "max_length": max_length, "stride": stride}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as every task metric feeds them to the model: the text as
    given (any chat template is already in it), without the tokenizer's special tokens."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, stop_at_newline: bool = True) -> str:
    """Greedy decoding without sampling; stops at EOS (and at a newline when asked)."""
    device = model_device(model)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], dtype=torch.long, device=device)
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        text = tokenizer.decode(out)
        if stop_at_newline and "\n" in text:
            return text.split("\n", 1)[0]
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return tokenizer.decode(out)


def exact_match(model, tokenizer, pairs: list[tuple[str, str]], max_examples: int | None = None,
                progress: Progress | None = None) -> dict:
    """Share of prompts whose greedy completion equals the reference (stripped)."""
    pairs = pairs[:max_examples] if max_examples else pairs
    if not pairs:
        raise UsageError("no examples to score")
    was_training = model.training
    model.eval()
    correct = 0
    for i, (prompt, completion) in enumerate(pairs):
        budget = len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 4
        answer = greedy_generate(model, tokenizer, prompt, budget)
        correct += answer.strip() == completion.strip()
        if progress:
            progress("exact match", i + 1, len(pairs))
    model.train(was_training)
    return {"exact_match": correct / len(pairs), "examples": len(pairs),
            "exact_match_ci95": list(wilson_interval(correct, len(pairs)))}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` in ``trials`` (95% with the default z)."""
    if trials <= 0:
        raise UsageError("an interval needs at least one trial")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class CompletionBatch:
    """Right-padded examples; ``labels`` is IGNORE on prompt tokens and padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class EncodedCompletions:
    """Tokenised (prompt, completion) examples, ready to score many times."""

    batches: list[CompletionBatch]
    tokens: int     # completion tokens scored
    examples: int   # examples kept


def _example_ids(tokenizer, prompt: str, completion: str, max_length: int | None) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; beyond ``max_length`` the prompt loses its first
    tokens, and the completion is cut only if it alone does not fit."""
    p = prompt_ids(tokenizer, prompt)
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) if completion else []
    if max_length and len(p) + len(c) > max_length:
        c = c[:max_length - 1]  # keep a prompt token, so the first completion token is predicted
        p = p[max(0, len(p) - (max_length - len(c))):]
    return p + c, [IGNORE] * len(p) + c


def encode_completions(tokenizer, examples: Sequence[tuple[str, str]], batch_size: int = DEFAULT_BATCH_SIZE,
                       max_length: int | None = DEFAULT_MAX_LENGTH,
                       device: torch.device | str = "cpu") -> EncodedCompletions:
    """Tokenise (prompt, completion) pairs as :func:`completion_perplexity` scores them.

    Examples left without a predicted completion token (empty completion, or no token
    before it) are skipped; UsageError if none is usable or an example is not two strings.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    rows = []
    for i, ex in enumerate(examples or []):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
            raise UsageError(f"example {i + 1} is not a (prompt, completion) pair of strings: {ex!r}")
        ids, labels = _example_ids(tokenizer, ex[0], ex[1], max_length)
        # the first token is never predicted, so a completion needs a token before it
        if any(lab != IGNORE for lab in labels[1:]):
            rows.append((ids, labels))
    if not rows:
        raise UsageError("no usable example: need at least one (prompt, completion) with completion tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, n_tokens = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
            labels[j, :len(y)] = torch.tensor(y)
        n_tokens += int((labels[:, 1:] != IGNORE).sum())
        batches.append(CompletionBatch(ids.to(device), mask.to(device), labels.to(device)))
    return EncodedCompletions(batches, n_tokens, len(rows))


@torch.no_grad()
def score_completions(model, encoded: EncodedCompletions, progress: Progress | None = None) -> dict:
    """Completion NLL of already encoded examples (see :func:`completion_perplexity`)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i, b in enumerate(encoded.batches):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), b.labels[:, 1:].flatten(),
                                 ignore_index=IGNORE, reduction="sum").item()
        if progress:
            progress("completion perplexity", i + 1, len(encoded.batches))
    model.train(was_training)
    nll = total / encoded.tokens
    return {"completion_ppl": math.exp(nll) if nll < 700 else math.inf, "completion_nll": nll,
            "tokens": encoded.tokens, "examples": encoded.examples}


def completion_perplexity(model, tokenizer, examples: Sequence[tuple[str, str]], *,
                          batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = DEFAULT_MAX_LENGTH,
                          max_examples: int | None = None, progress: Progress | None = None) -> dict:
    """exp(mean NLL of the completion tokens given the prompt) over (prompt, completion) pairs.

    The prompt is fed as exact match feeds it (:func:`prompt_ids`), the completion follows
    without special tokens, and only completion tokens are scored. At most ``max_examples``
    pairs (the first ones, as exact match takes them). Returns {'completion_ppl',
    'completion_nll' (nats per completion token), 'tokens', 'examples'}.
    """
    examples = list(examples)[:max_examples] if max_examples else list(examples)
    encoded = encode_completions(tokenizer, examples, batch_size, max_length, model_device(model))
    return score_completions(model, encoded, progress)
