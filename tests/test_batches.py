"""Training batches: LM chunks, task pairs with masked prompts, seeded random-access order."""
from __future__ import annotations

import itertools

import pytest
import torch

from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.evals.data import Dataset
from adapterhub_c.models.tiny import tiny_tokenizer
from adapterhub_c.training.batches import (
    IGNORE_INDEX,
    IterBatches,
    ListBatches,
    as_batch_source,
    iter_batches,
    lm_chunks,
    make_batches,
    task_example,
    tokenize_dataset,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_lm_texts_become_eos_joined_chunks_with_labels_equal_to_inputs(tok):
    texts = ["abc", "defgh", "ij"]
    rows = lm_chunks(tok, texts, seq_len=4)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows.shape == (len(stream) // 4, 4)
    assert rows.flatten().tolist() == stream[: rows.numel()]
    batch = make_batches(tok, Dataset("d", "train", texts=texts), seq_len=4, batch_size=2).batch(0)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].eq(1).all()
    assert batch["input_ids"].shape == (2, 4)


def test_short_stream_is_one_short_chunk(tok):
    rows = lm_chunks(tok, ["hi"], seq_len=64)
    assert rows.shape == (1, 3)  # "h", "i", eos


def test_task_pairs_mask_prompt_and_padding_and_end_with_eos(tok):
    pairs = [("Say: a\nAnswer:", " a"), ("Longer prompt here\nAnswer:", " bcd")]
    ex = tokenize_dataset(tok, Dataset("t", "train", pairs=pairs), seq_len=64)
    batch = ex.collate([0, 1])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row, (p, c) in enumerate(pairs):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p_ids) + len(c_ids)
        assert ids[row, :n].tolist() == p_ids + c_ids
        assert labels[row, : len(p_ids)].eq(IGNORE_INDEX).all()
        assert labels[row, len(p_ids):n].tolist() == c_ids
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
        assert labels[row, n:].eq(IGNORE_INDEX).all()
        assert ids[row, n:].eq(tok.pad_token_id).all()  # right padding


def test_too_long_examples_lose_prompt_tokens_from_the_left(tok):
    ids, labels = task_example(tok, "x" * 50, " yz", seq_len=10)
    assert len(ids) == 10
    completion = tok(" yz", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[-len(completion):] == completion
    assert labels[-len(completion):] == completion


def test_order_is_seeded_and_random_access_matches_iteration(tok):
    ds = Dataset("d", "train", texts=[f"text number {i} " * 3 for i in range(40)])
    a = make_batches(tok, ds, seq_len=8, batch_size=3, seed=5)
    b = make_batches(tok, ds, seq_len=8, batch_size=3, seed=5)
    c = make_batches(tok, ds, seq_len=8, batch_size=3, seed=6)
    first = [a.batch(i)["input_ids"] for i in range(2 * a.per_epoch + 3)]
    assert all(torch.equal(x, b.batch(i)["input_ids"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c.batch(i)["input_ids"]) for i, x in enumerate(first))
    # epochs are different permutations, each row once per epoch
    e0 = torch.cat(first[: a.per_epoch])
    e1 = torch.cat(first[a.per_epoch: 2 * a.per_epoch])
    assert not torch.equal(e0, e1)
    n = len(a.examples)
    assert sorted(a.epoch_order(0)) == list(range(n)) and a.epoch_order(0) != a.epoch_order(1)
    # fast-forward: iterating from N equals the tail of iterating from 0
    tail = list(itertools.islice(iter_batches(a, start=7), 5))
    assert all(torch.equal(x["input_ids"], first[7 + i]) for i, x in enumerate(tail))


def test_empty_datasets_are_refused(tok):
    with pytest.raises(UsageError, match="empty"):
        tokenize_dataset(tok, Dataset("nothing", "train"), seq_len=8)
    with pytest.raises(UsageError, match="empty"):
        tokenize_dataset(tok, Dataset("blank", "train", texts=["   "]), seq_len=8)
    with pytest.raises(UsageError):
        make_batches(tok, Dataset("d", "train", texts=["abc"]), seq_len=8, batch_size=0)


def test_other_batch_sources(tok):
    batches = [{"input_ids": torch.tensor([[i]])} for i in range(3)]
    src = as_batch_source(batches)
    assert isinstance(src, ListBatches)
    assert [int(src.batch(i)["input_ids"]) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    it = as_batch_source(iter(batches))
    assert isinstance(it, IterBatches)
    assert int(it.batch(1)["input_ids"]) == 1  # skips batch 0
    with pytest.raises(AdaptError):
        it.batch(0)
    with pytest.raises(AdaptError, match="ran out"):
        it.batch(5)
