"""(prompt, completion) examples as padded batches, and their completion-token loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from adapterhub_c.errors import UsageError

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE on prompt tokens and padding


def encode_examples(tokenizer, examples: Sequence[tuple[str, str]], batch_size: int = 8,
                    max_length: int | None = 512, device: torch.device | str = "cpu") -> tuple[list[Batch], int]:
    """Tokenise prompt (with the tokenizer's special tokens) and completion (without),
    label only the completion, cut to ``max_length`` tokens, pad right into batches.

    Returns (batches, number of completion tokens). Examples left with no completion
    token are skipped; UsageError if none is usable or an example is not two strings.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    rows = []
    for i, ex in enumerate(examples or []):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
            raise UsageError(f"example {i + 1} is not a (prompt, completion) pair of strings: {ex!r}")
        prompt, completion = ex
        p = tokenizer(prompt)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        ids = (list(p) + list(c))[:max_length] if max_length else list(p) + list(c)
        labels = ([IGNORE] * len(p) + list(c))[:len(ids)]
        # the first token is never predicted, so a completion needs a token before it
        if sum(1 for lab in labels[1:] if lab != IGNORE) == 0:
            continue
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
        batches.append(Batch(ids.to(device), mask.to(device), labels.to(device)))
    return batches, n_tokens


def completion_loss(model, batches: Sequence[Batch], n_tokens: int) -> float:
    """Mean cross-entropy per completion token over all batches (sum of token losses /
    number of completion tokens: independent of how examples are batched)."""
    total = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), b.labels[:, 1:].flatten(),
                                     ignore_index=IGNORE, reduction="sum").item()
    return total / n_tokens
