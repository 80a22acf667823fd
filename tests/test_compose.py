"""LoraHub-style composition on the tiny Llama: one trained LoRA among random distractors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.evals.metrics import completion_perplexity, encode_completions
from adapterhub_c.merging.compose import compose_adapters
from adapterhub_c.merging.compose_eval import ComposeStack, PeftEvaluator
from adapterhub_c.models.tiny import build_tiny_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
RANK = 4


def task_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """A fixed-pattern completion: any three letters, then ' => ' and always 'xyxy'."""
    rng = random.Random(seed)
    return [("".join(rng.choice("abcdefgh") for _ in range(3)) + " =>", " xyxy") for _ in range(n)]


def _config(alpha: float = 8.0) -> dict:
    return dict(peft_type="LORA", r=RANK, lora_alpha=alpha, base_model_name_or_path="builtin:tiny-llama",
                target_modules=TARGETS, task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def trained() -> LoraAdapter:
    """One LoRA trained for a few hundred steps on the task (about a second or two)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    model, tok = build_tiny_llama()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    batches = encode_completions(tok, task_examples(32, seed=1), batch_size=32).batches
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    b = batches[0]
    for _ in range(150):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return LoraAdapter(_config(), tensors)


def distractor(seed: int, like: LoraAdapter, alpha: float = 8.0) -> LoraAdapter:
    """A random LoRA with the same tensor norms as ``like`` (another task's adapter, as far
    as this task is concerned)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in like.tensors.items():
        r = torch.randn(v.shape, generator=g)
        tensors[k] = r * (v.norm() / r.norm())
    return LoraAdapter(_config(alpha), tensors)


def test_composition_finds_the_trained_adapter_and_beats_uniform(trained):
    model, tok = build_tiny_llama()
    adapters = [distractor(1, trained), trained, distractor(2, trained), distractor(3, trained, alpha=4)]
    train_ex, held_out = task_examples(6, seed=2), task_examples(8, seed=3)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    res = compose_adapters(adapters, model=model, tokenizer=tok, examples=train_ex, budget=40, seed=0,
                           progress=lambda d, i, n: seen.append((i, n)))
    # the base comes back unchanged
    assert not any("lora" in name for name, _ in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert res.optimizer_used[0] == "NGOpt" and len(res.optimizer_used) >= 2
    assert len(res.curve) == 40 and seen[-1] == (40, 40)
    bests = [c["best"] for c in res.curve]
    assert bests == sorted(bests, reverse=True)
    mags = np.abs(res.weights)
    assert int(np.argmax(mags)) == 1 and mags[1] > 2 * np.delete(mags, 1).max(), res.weights

    stack = ComposeStack(adapters, ["d1", "t", "d2", "d3"])
    encoded = encode_completions(tok, held_out, batch_size=4)
    with PeftEvaluator(stack, model, encoded) as ev:
        uniform = ev.loss([1 / 4] * 4)
        composed = ev.loss(res.weights)
        base = ev.loss([0.0] * 4)
    assert composed < uniform and composed < base, (composed, uniform, base)
    # the returned adapter is the composition that was scored
    with PeftEvaluator(ComposeStack([res.adapter], ["c"]), model, encoded) as ev:
        assert ev.loss([1.0]) == pytest.approx(composed, rel=1e-4)


def test_fused_rebuild_reproduces_each_input_delta(trained):
    model, tok = build_tiny_llama()
    adapters = [trained, distractor(5, trained, alpha=2)]
    stack = ComposeStack(adapters, ["t", "d"])
    with PeftEvaluator(stack, model, encode_completions(tok, task_examples(2, seed=0))) as ev:
        for i, adapter in enumerate(adapters):
            w = [0.0, 0.0]
            w[i] = 1.0
            ev.set_weights(w)
            for module, layer in adapter.layers().items():
                got = ev.model.base_model.model.get_submodule(module).get_delta_weight("default")
                torch.testing.assert_close(got, layer.delta(), rtol=1e-4, atol=1e-6)
        # LoraHub's rule with cross terms: (Σ w B)(Σ w A), folded scales
        ev.set_weights([0.5, -1.0])
        a, d = adapters[0].layers(), adapters[1].layers()
        m = next(iter(a))
        sa, sd = a[m].scale ** 0.5, d[m].scale ** 0.5
        want = (0.5 * sa * a[m].B - sd * d[m].B) @ (0.5 * sa * a[m].A - sd * d[m].A)
        got = ev.model.base_model.model.get_submodule(m).get_delta_weight("default")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compose_loss_is_the_completion_nll_of_the_task_metric(trained):
    model, tok = build_tiny_llama()
    ex = [("ab =>", " xyxy"), ("abcdefgh long prompt =>", " x"), ("c =>", " xyxyxyxy")]
    with PeftEvaluator(ComposeStack([trained], ["t"]), model, encode_completions(tok, ex, batch_size=2)) as ev:
        loss = ev.loss([0.0])
        with_trained = ev.loss([1.0])
        direct = completion_perplexity(ev.model, tok, ex, batch_size=3)["completion_nll"]
    assert loss == pytest.approx(completion_perplexity(model, tok, ex)["completion_nll"], rel=1e-5)
    assert with_trained == pytest.approx(direct, rel=1e-5) and with_trained < loss


def test_callable_loss_and_l1_penalty():
    adapters = [distractor(s, _small()) for s in (1, 2, 3)]
    target = np.array([0.8, -0.3, 0.0])
    res = compose_adapters(adapters, loss_fn=lambda w: float(np.sum((w - target) ** 2)), budget=60, l1=0.0,
                           optimizer="NGOpt", seed=1)
    assert np.allclose(res.weights, target, atol=0.1)
    assert res.objective == pytest.approx(res.loss)
    pen = compose_adapters(adapters, loss_fn=lambda w: float(np.sum((w - target) ** 2)), budget=60, l1=1.0)
    assert pen.objective == pytest.approx(pen.loss + np.mean(np.abs(pen.weights)))
    assert np.abs(pen.weights).sum() < np.abs(res.weights).sum()
    other = compose_adapters(adapters, loss_fn=lambda w: float(np.sum(w ** 2)), budget=5, optimizer="RandomSearch")
    assert other.optimizer_used == ["RandomSearch"]


def _small() -> LoraAdapter:
    g = torch.Generator().manual_seed(0)
    return LoraAdapter(_config(), {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(RANK, 64, generator=g),
                                   f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, RANK, generator=g)})


def test_bad_inputs():
    model, tok = build_tiny_llama()
    a = _small()
    with pytest.raises(UsageError, match="usable example"):
        compose_adapters([a, a], model=model, tokenizer=tok, examples=[])
    with pytest.raises(UsageError, match="usable example"):
        compose_adapters([a, a], model=model, tokenizer=tok, examples=[("prompt only", "")])
    with pytest.raises(UsageError, match="pair"):
        compose_adapters([a, a], model=model, tokenizer=tok, examples=["just a string"])
    b = LoraAdapter(dict(_config(), r=2), {k: v[:2] if "lora_A" in k else v[:, :2] for k, v in a.tensors.items()})
    with pytest.raises(UsageError, match="equal ranks"):
        compose_adapters([a, b], loss_fn=lambda w: 0.0)
    with pytest.raises(UsageError, match="either loss_fn or model"):
        compose_adapters([a, a])
    with pytest.raises(UsageError, match="optimizer"):
        compose_adapters([a, a], loss_fn=lambda w: 0.0, optimizer="NoSuchOpt")
    with pytest.raises(UsageError, match="budget"):
        compose_adapters([a, a], loss_fn=lambda w: 0.0, budget=0)
    with pytest.raises(UsageError, match="init"):
        compose_adapters([a, a], loss_fn=lambda w: 0.0, init=[2.0, 0.0])
    assert not any("lora" in name for name, _ in model.named_modules())
