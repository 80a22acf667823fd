"""Perplexity and completion perplexity against direct computations; exact match; and a
task where only the completion tells a right adapter from a wrong one."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.evaluate import evaluate_model
from adapterhub_c.evals.metrics import (
    completion_perplexity,
    encode_completions,
    exact_match,
    perplexity,
    prompt_ids,
    token_stream,
    wilson_interval,
)
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
    lo, hi = res.pop("exact_match_ci95")
    assert res == {"exact_match": 2 / 3, "examples": 3}
    assert (lo, hi) == pytest.approx((0.2077, 0.9385), abs=1e-4)


def test_wilson_interval_matches_the_textbook_values():
    # statsmodels proportion_confint(k, n, method="wilson") gives these
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 50) == pytest.approx((0.0, 0.0713), abs=1e-4)
    assert wilson_interval(50, 50) == pytest.approx((0.9287, 1.0), abs=1e-4)
    with pytest.raises(UsageError):
        wilson_interval(0, 0)


def _hand_nll(model, tok, examples) -> tuple[float, int]:
    """Sum of -log p(completion token | everything before it), one example at a time."""
    total, count = 0.0, 0
    for prompt, completion in examples:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
        for j, token in enumerate(c):
            total -= logp[len(p) + j - 1, token].item()
            count += 1
    return total, count


UNEQUAL = [("ab =>", " xyxy"), ("a much longer prompt than the others =>", " x"), ("c =>", " xyxyxyxy"),
           ("Q: 1 + 1\nAnswer:", " 2")]


def test_completion_nll_equals_a_hand_computation_over_completion_tokens_only():
    model, tok = build_tiny_llama()
    got = completion_perplexity(model, tok, UNEQUAL)
    total, count = _hand_nll(model, tok, UNEQUAL)
    assert got["tokens"] == count == sum(len(c) for _, c in UNEQUAL)  # byte tokens: prompts not counted
    assert got["examples"] == len(UNEQUAL)
    assert got["completion_nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["completion_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batches_of_unequal_lengths_give_the_one_by_one_value():
    model, tok = build_tiny_llama()
    values = [completion_perplexity(model, tok, UNEQUAL, batch_size=bs)["completion_nll"] for bs in (1, 2, 3, 8)]
    assert values == pytest.approx([values[0]] * 4, rel=1e-5)
    enc = encode_completions(tok, UNEQUAL, batch_size=8)
    b = enc.batches[0]
    # right padding: the mask covers each example's tokens, labels only its completion
    for row, (prompt, completion) in enumerate(UNEQUAL):
        n_p, n_c = len(prompt_ids(tok, prompt)), len(completion)
        assert int(b.attention_mask[row].sum()) == n_p + n_c
        assert int((b.labels[row] != -100).sum()) == n_c
        assert (b.labels[row, :n_p] == -100).all()


def test_max_examples_takes_the_first_pairs_and_long_prompts_lose_their_start():
    model, tok = build_tiny_llama()
    first = completion_perplexity(model, tok, UNEQUAL, max_examples=2)
    assert first == completion_perplexity(model, tok, UNEQUAL[:2])
    prompt = "z" * 40 + " =>"
    cut = completion_perplexity(model, tok, [(prompt, " xyxy")], max_length=10)
    # 10 positions: the whole 5-byte completion and the last 5 bytes of the prompt
    total, count = _hand_nll(model, tok, [(prompt[-5:], " xyxy")])
    assert cut["tokens"] == count == 5
    assert cut["completion_nll"] == pytest.approx(total / count, rel=1e-5)


def test_examples_without_a_completion_token_are_skipped_and_none_left_is_refused():
    model, tok = build_tiny_llama()
    assert completion_perplexity(model, tok, [("a =>", ""), ("b =>", " y")])["examples"] == 1
    with pytest.raises(UsageError, match="no usable example"):
        completion_perplexity(model, tok, [("a =>", "")])
    with pytest.raises(UsageError, match="not a \\(prompt, completion\\) pair"):
        completion_perplexity(model, tok, [("a =>",)])


def test_evaluate_model_reports_completion_ppl_on_tasks_and_text_perplexity_on_text(tmp_path):
    model, tok = build_tiny_llama()
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in UNEQUAL))
    res = evaluate_model(model, tok, str(task))
    assert set(res) == {"completion_ppl", "exact_match", "_details"}
    assert res["completion_ppl"] == completion_perplexity(model, tok, UNEQUAL)["completion_ppl"]
    with pytest.raises(UsageError, match="completion_ppl, not text perplexity"):
        evaluate_model(model, tok, str(task), metrics=("perplexity",))
    text = tmp_path / "text.txt"
    text.write_text("plain text for perplexity")
    assert set(evaluate_model(model, tok, str(text))) == {"perplexity", "_details"}


# ---- acceptance: a right and a wrong adapter that differ only in the completion ----------


def _label_task(n: int, seed: int, answer: str) -> list[tuple[str, str]]:
    """Long prompts of random letters; the completion is a fixed answer."""
    rng = random.Random(seed)
    return [("Label: " + "".join(rng.choice("abcdefgh") for _ in range(12)) + "\nAnswer:", answer)
            for _ in range(n)]


def _fit(tok, pairs, whole_text: bool):
    """A LoRA (lm_head included, so the tiny model's logits can grow) trained for 60 steps
    on the completion tokens, or with ``whole_text`` on prompt + completion as one text."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, _ = build_tiny_llama()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]))
    b = encode_completions(tok, pairs, batch_size=len(pairs)).batches[0]
    labels = torch.where(b.attention_mask.bool(), b.input_ids, -100) if whole_text else b.labels
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(60):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_completion_perplexity_ranks_a_right_adapter_above_a_wrong_one_where_joined_text_does_not():
    _, tok = build_tiny_llama()
    prompts = [p for p, _ in _label_task(32, seed=1, answer="")]
    # identical prompts; the right adapter learns the answer " yes" from its completion
    # tokens, the wrong one learns the prompts and the answer " no" from the joined text
    right = _fit(tok, [(p, " yes" + tok.eos_token) for p in prompts], whole_text=False)
    wrong = _fit(tok, [(p, " no" + tok.eos_token) for p in prompts], whole_text=True)
    test = _label_task(16, seed=2, answer=" yes")
    models = {"right": right, "wrong": wrong}

    cp = {k: completion_perplexity(m, tok, test)["completion_ppl"] for k, m in models.items()}
    em = {k: exact_match(m, tok, test)["exact_match"] for k, m in models.items()}
    joined = {k: perplexity(m, tok, [p + c for p, c in test])["perplexity"] for k, m in models.items()}
    assert cp["right"] < 2 < 10 < cp["wrong"], cp
    assert em == {"right": 1.0, "wrong": 0.0}, em
    # the old metric, prompt + completion scored as one text, is decided by the prompts:
    # it prefers the wrong adapter, by far
    assert joined["wrong"] * 10 < joined["right"], joined
