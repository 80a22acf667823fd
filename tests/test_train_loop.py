"""The training loop and plain LoRA training: loss goes down, exact resume, refusals, QLoRA."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import Dataset, load_dataset
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.training.loop import CHECKPOINT_NAME, TrainConfig, _defer_sigint, train
from adapterhub_c.training.train import train_lora


@pytest.fixture(scope="module")
def texts():
    return Dataset("builtin:pydoc", "train", texts=load_dataset("builtin:pydoc", "train").texts[:12])


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, lr=3e-3, batch_size=2, seq_len=32, seed=7, grad_accum=2)
    base.update(kw)
    return TrainConfig(**base)


def run_lora(texts, config, **kw):
    model, tok = build_tiny_llama()
    return train_lora(model, tok, texts, rank=4, alpha=8, config=config, **kw)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------


def test_plain_lora_training_lowers_the_loss_and_reports(texts):
    seen = []
    trained = run_lora(texts, cfg(steps=30, grad_accum=1), progress=lambda d, i, n: seen.append((d, i, n)))
    r = trained.result
    assert len(r.losses) == 30 and r.steps == 30
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.1
    assert r.tokens == 30 * 2 * 32
    assert r.tokens_per_s == pytest.approx(r.tokens / r.wall_s)  # the throughput of this run's tokens
    assert seen[-1] == ("training", 30, 30) and len(seen) == 30
    keys = set(trained.adapter.tensors)
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert trained.adapter.config["r"] == 4 and trained.adapter.config["base_model_name_or_path"] is None


def test_train_lora_leaves_the_model_as_it_was(texts):
    model, tok = build_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_lora(model, tok, texts, rank=4, alpha=8, config=cfg(steps=2))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert same_tensors(before, model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


def test_interrupted_run_resumed_ends_with_the_same_weights(texts, tmp_path, monkeypatch):
    full = run_lora(texts, cfg()).adapter.tensors

    # Ctrl-C in the middle of step 6 (inside the loss of its second micro-batch)
    from adapterhub_c.training import train as train_mod

    calls = {"n": 0}
    real = train_mod.lm_loss_fn

    def interrupting(m):
        inner = real(m)

        def loss_fn(batch):
            calls["n"] += 1
            if calls["n"] == 5 * 2 + 2:
                raise KeyboardInterrupt
            return inner(batch)
        return loss_fn

    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "lm_loss_fn", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run_lora(texts, cfg(checkpoint_dir=str(ckpt)))
    with safe_open(str(ckpt / CHECKPOINT_NAME), framework="pt") as f:
        meta = json.loads(f.metadata()["adapterhub_c.checkpoint"])
    assert meta["step"] == 5 and len(meta["losses"]) == 5 and meta["hparams"]["lr"] == 3e-3

    resumed = run_lora(texts, cfg(checkpoint_dir=str(ckpt)), resume=True)
    assert resumed.result.resumed_from == 5 and len(resumed.result.losses) == 12
    assert same_tensors(full, resumed.adapter.tensors)


def test_crash_after_a_periodic_checkpoint_resumes_exactly(texts, tmp_path):
    full = run_lora(texts, cfg(grad_accum=1))
    ckpt = str(tmp_path / "ckpt")
    stop = {"at": 9}

    def progress(desc, done, total):
        if done == stop["at"]:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        run_lora(texts, cfg(grad_accum=1, checkpoint_every=4, checkpoint_dir=ckpt), progress=progress)
    resumed = run_lora(texts, cfg(grad_accum=1, checkpoint_every=4, checkpoint_dir=ckpt), resume=True)
    assert resumed.result.resumed_from == 8
    assert same_tensors(full.adapter.tensors, resumed.adapter.tensors)
    assert resumed.result.losses == full.result.losses
    # resuming a finished run changes nothing
    again = run_lora(texts, cfg(grad_accum=1, checkpoint_every=4, checkpoint_dir=ckpt), resume=True)
    assert again.result.resumed_from == 12 and same_tensors(full.adapter.tensors, again.adapter.tensors)


def test_resume_with_changed_options_is_refused_with_the_differences(texts, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_lora(texts, cfg(steps=2, checkpoint_dir=ckpt))
    with pytest.raises(UsageError, match=r"lr: 0\.003 → 0\.001"):
        run_lora(texts, cfg(steps=2, lr=1e-3, checkpoint_dir=ckpt), resume=True)
    with pytest.raises(UsageError, match="rank"):
        model, tok = build_tiny_llama()
        train_lora(model, tok, texts, rank=8, alpha=8, config=cfg(steps=2, checkpoint_dir=ckpt), resume=True)
    with pytest.raises(UsageError, match="checkpoint"):
        run_lora(texts, cfg(steps=2), resume=True)


def test_loop_serves_soft_prompt_style_callers_and_keeps_the_global_rng():
    """loss_fn returning a bare tensor, a list of batches, config None (the soft-prompt use)."""
    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 1))
    batches = [{"input_ids": torch.randn(8, 4)} for _ in range(3)]
    target = torch.randn(8, 1)
    module.eval()
    state = torch.random.get_rng_state()
    result = train(module, list(module.named_parameters()),
                   lambda b: ((module(b["input_ids"]) - target) ** 2).mean(), batches, None)
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(result.losses) == TrainConfig().steps and result.losses[-1] < result.losses[0]
    assert not module.training  # the caller's mode is restored
    with pytest.raises(UsageError, match="nothing to train"):
        train(module, [], lambda b: torch.zeros(()), batches, None)


def test_schedule_and_validation():
    c = TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="linear")
    assert [round(c.lr_at(s), 4) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.125]
    assert TrainConfig(lr=0.1).lr_at(99) == 0.1
    assert TrainConfig().weight_decay == 0.01 and TrainConfig().schedule == "constant"
    with pytest.raises(UsageError, match="schedule"):
        TrainConfig(schedule="cosine").validate()
    with pytest.raises(UsageError, match="lr"):
        TrainConfig(lr=0).validate()


def test_sigint_during_an_optimizer_step_is_held_until_it_ends():
    order = []
    with pytest.raises(KeyboardInterrupt):
        with _defer_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            order.append("step finished")
    assert order == ["step finished"]


def test_qlora_on_a_4bit_model_trains_on_cpu(texts, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, tok = build_tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see variants/quantize.py
    assert isinstance(q.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    trained = train_lora(q, tok, texts, rank=4, alpha=8, config=cfg(steps=20, grad_accum=1))
    r = trained.result
    assert sum(r.losses[-4:]) / 4 < sum(r.losses[:4]) / 4
    b = [v for k, v in trained.adapter.tensors.items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)
