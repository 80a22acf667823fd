"""Training batches from a dataset, with deterministic, random-access order.

Two kinds of examples (see ``evals.data.Dataset``):

- language-model texts: joined by EOS into one token stream (as perplexity does) and cut
  into ``seq_len``-token chunks; ``labels = input_ids``. The tail shorter than
  ``seq_len`` is dropped, unless the whole stream is shorter (then it is one chunk).
- task pairs: ``prompt + completion + EOS``; labels are -100 on the prompt tokens and on
  padding; right-padded per batch with the pad id; ``attention_mask`` marks real tokens.
  Too-long examples lose prompt tokens from the left (the completion is what is learned).

Order: micro-batch ``i`` is drawn from epoch ``i // per_epoch``, whose order is a
permutation seeded by ``(seed, epoch)``. Any micro-batch can be computed directly from
its index, so a resumed run fast-forwards to step N for free and sees exactly the
batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.evals.metrics import token_stream

IGNORE_INDEX = -100
Batch = dict  # {"input_ids": LongTensor[B, T], "labels": …, "attention_mask": …}


@runtime_checkable
class BatchSource(Protocol):
    """Anything that returns micro-batch number ``index`` (0, 1, 2, … forever)."""

    def batch(self, index: int) -> Batch: ...


# ---------------------------------------------------------------------------------------
# examples


def lm_chunks(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """The texts joined by EOS and cut into ``seq_len``-token rows: LongTensor [N, seq_len]."""
    ids = token_stream(tokenizer, list(texts))
    if ids.numel() < 2:
        raise UsageError("the dataset has no text to train on (fewer than 2 tokens)")
    n = ids.numel() // seq_len
    if n == 0:
        return ids.view(1, -1)
    return ids[: n * seq_len].view(n, seq_len)


def task_example(tokenizer, prompt: str, completion: str, seq_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one prompt/completion pair, at most ``seq_len`` tokens."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    if len(c) >= seq_len:  # keep one prompt token so the first completion token is predicted
        c = c[: seq_len - 1]
    p = p[max(0, len(p) - (seq_len - len(c))):]
    return p + c, [IGNORE_INDEX] * len(p) + c


@dataclass
class Examples:
    """Tokenized examples: fixed-length LM rows or variable-length task examples."""

    rows: torch.Tensor | None = None                      # LM: [N, T]
    pairs: list[tuple[list[int], list[int]]] | None = None  # task: (ids, labels)
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.rows.shape[0]) if self.rows is not None else len(self.pairs or [])

    def collate(self, indices: Sequence[int]) -> Batch:
        """One batch of the examples at ``indices`` (right-padded for tasks)."""
        if self.rows is not None:
            ids = self.rows[list(indices)]
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        chosen = [self.pairs[i] for i in indices]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (x, y) in enumerate(chosen):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tokenize_dataset(tokenizer, dataset: Any, seq_len: int) -> Examples:
    """Examples of an ``evals.data.Dataset`` (or a list of texts); refuses empty data."""
    if seq_len < 2:
        raise UsageError(f"seq_len must be at least 2, got {seq_len}")
    pairs = getattr(dataset, "pairs", None)
    texts = dataset.texts if hasattr(dataset, "texts") else list(dataset or [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if pairs:
        return Examples(pairs=[task_example(tokenizer, p, c, seq_len) for p, c in pairs], pad_id=pad)
    if not texts or not any(t.strip() for t in texts):
        name = getattr(dataset, "name", "the dataset")
        raise UsageError(f"{name} is empty: nothing to train on")
    return Examples(rows=lm_chunks(tokenizer, texts, seq_len), pad_id=pad)


# ---------------------------------------------------------------------------------------
# batch sources


class ShuffledBatches:
    """Seeded, epoch-wise shuffled micro-batches of ``batch_size`` examples, random access.

    Each epoch has ``max(1, N // batch_size)`` batches (the remainder of the permutation
    is left out of that epoch, so every batch has the same size unless N < batch_size).
    """

    def __init__(self, examples: Examples, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size <= 0:
            raise UsageError(f"batch size must be positive, got {batch_size}")
        if len(examples) == 0:
            raise UsageError("no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.per_epoch = max(1, len(examples) // batch_size)
        self._order: tuple[int, list[int]] | None = None  # cached permutation of one epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """The example order of ``epoch`` (a seeded permutation, or 0..N-1 unshuffled)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, index: int) -> Batch:
        """Micro-batch number ``index`` (deterministic for a given seed)."""
        epoch, pos = divmod(int(index), self.per_epoch)
        order = self.epoch_order(epoch)
        return self.examples.collate(order[pos * self.batch_size:(pos + 1) * self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        return iter_batches(self)


class ListBatches:
    """Pre-built batches, repeated in order: batch ``i`` is ``batches[i % len]``."""

    def __init__(self, batches: Sequence[Batch]):
        if len(batches) == 0:
            raise UsageError("no training batches")
        self.batches = batches

    def batch(self, index: int) -> Batch:
        return self.batches[int(index) % len(self.batches)]


class IterBatches:
    """Batches from a one-shot iterable, read in order (fast-forward = skip ahead).

    Resume is exact only when the iterable yields the same sequence every time.
    """

    def __init__(self, iterable: Iterable[Batch]):
        self._it = iter(iterable)
        self._next = 0

    def batch(self, index: int) -> Batch:
        if index < self._next:
            raise AdaptError("a one-shot batch iterator cannot go back")
        try:
            while self._next < index:
                next(self._it)
                self._next += 1
            self._next += 1
            return next(self._it)
        except StopIteration:
            raise AdaptError(f"the batch iterator ran out at micro-batch {index}") from None


def as_batch_source(batches: Any) -> BatchSource:
    """Wrap what a caller gives (a source, a list of batches, an iterable) as a ``BatchSource``."""
    if isinstance(batches, BatchSource):
        return batches
    if isinstance(batches, Sequence):
        return ListBatches(batches)
    if isinstance(batches, Iterable):
        return IterBatches(batches)
    raise UsageError(f"cannot train on batches of type {type(batches).__name__}")


def iter_batches(source: BatchSource, start: int = 0) -> Iterator[Batch]:
    """Micro-batches ``start, start + 1, …`` forever (fast-forwarded to ``start``)."""
    index = start
    while True:
        yield source.batch(index)
        index += 1


def make_batches(tokenizer, dataset: Any, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> ShuffledBatches:
    """A seeded, random-access batch source over a dataset (LM texts or task pairs)."""
    return ShuffledBatches(tokenize_dataset(tokenizer, dataset, seq_len), batch_size, seed, shuffle)
