"""Perplexity (sliding windows) and exact-match accuracy.

Perplexity follows the usual strided evaluation: the texts are joined with the EOS token
into one token stream, windows of ``max_length`` tokens move by ``stride`` tokens, and
each window scores only the tokens not scored by the previous window, so every token is
scored once with up to ``max_length - stride`` tokens of left context. The model may be
any module whose forward takes ``input_ids`` and returns ``.logits`` aligned with them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from adapterhub_c.errors import UsageError

Progress = Callable[[str, int, "int | None"], None]
DEFAULT_MAX_LENGTH = 512
DEFAULT_STRIDE = 256


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


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, stop_at_newline: bool = True) -> str:
    """Greedy decoding without sampling; stops at EOS (and at a newline when asked)."""
    device = model_device(model)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
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
    return {"exact_match": correct / len(pairs), "examples": len(pairs)}
