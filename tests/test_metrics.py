"""Perplexity against a direct computation; exact match."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adapterhub_c.evals.metrics import exact_match, perplexity, token_stream
from adapterhub_c.models.tiny import build_tiny_llama


def test_perplexity_equals_direct_computation_when_one_window_covers_all():
    model, tok = build_tiny_llama()
    texts = ["hello world, this is a test.", "another line"]
    ids = token_stream(tok, texts)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    direct = math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())
    got = perplexity(model, tok, texts, max_length=512, stride=256)
    assert abs(got["perplexity"] - direct) < 1e-3 * direct
    assert got["tokens"] == ids.numel() - 1


def test_strided_windows_score_every_token_once():
    model, tok = build_tiny_llama()
    texts = ["abcdefghij" * 20]
    n = token_stream(tok, texts).numel()
    got = perplexity(model, tok, texts, max_length=64, stride=32)
    assert got["tokens"] == n - 1
    disjoint = perplexity(model, tok, texts, max_length=64, stride=64)
    assert disjoint["tokens"] < n - 1  # first token of each window has no context


class ScriptedModel(torch.nn.Module):
    """Predicts the next token of a fixed script, then EOS."""

    def __init__(self, script_ids, eos, vocab):
        super().__init__()
        self.script, self.eos, self.vocab = script_ids, eos, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        L = input_ids.shape[1]
        logits = torch.zeros(1, L, self.vocab)
        nxt = self.script[L] if L < len(self.script) else self.eos
        logits[0, -1, nxt] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_counts_correct_answers():
    _, tok = build_tiny_llama()
    script = tok("Q: yes", add_special_tokens=False)["input_ids"]
    model = ScriptedModel(script, tok.eos_token_id, len(tok))
    res = exact_match(model, tok, [("Q:", " yes"), ("Q:", " no"), ("Q:", "yes ")])
    assert res == {"exact_match": 2 / 3, "examples": 3}
