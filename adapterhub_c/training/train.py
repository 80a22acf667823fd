"""Plain LoRA training on any HF causal LM: a base, or a compressed variant of it.

QLoRA: when the model holds bitsandbytes 8-bit / 4-bit layers, it first goes through
``peft.prepare_model_for_kbit_training`` (freezes the base, casts non-quantized
fp16/bf16 weights to fp32) with gradient checkpointing off by default (it trades
speed for memory; turn it on with ``gradient_checkpointing=True`` on big models on
GPU). This works on CPU as well with bitsandbytes >= 0.48 (the variant loader already
turns off bnb's CPU bf16 repack, which would silently stop LoRA gradients).

The LoRA is added in place and removed again (``unload``) when training ends, so the
caller's model comes back as it was; the trained adapter is returned as a
``LoraAdapter`` whose ``base_model_name_or_path`` the caller fills in.
Defaults: r=16, alpha=32, dropout 0.05 on the attention linears (q/k/v/o on Llama, the
CA-LoRA setting; ``qkv_proj``/``o_proj`` on Phi-3, ``c_attn``/``attn.c_proj`` on GPT-2, …:
whatever ``models.arch`` names attention in and out); ``fan_in_fan_out`` is set when the
targets are Conv1D layers. The optimiser and schedule defaults are those of ``loop.TrainConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.models import arch as archmod
from adapterhub_c.training import peft_io
from adapterhub_c.training.batches import make_batches
from adapterhub_c.training.loop import Progress, TrainConfig, TrainResult, train

DEFAULT_ROLES = (archmod.ATTN_IN, archmod.ATTN_OUT)  # targets=None: the attention linears of every block


def default_targets(model: nn.Module) -> list[str]:
    """PEFT target suffixes of the model's attention linears (``models.arch``)."""
    return archmod.describe(model).lora_targets(DEFAULT_ROLES)


@dataclass
class TrainedLora:
    """A trained adapter and how its training went."""

    adapter: LoraAdapter
    result: TrainResult


def lm_loss_fn(model: nn.Module):
    """``loss_fn(batch) -> (loss, logs)``: the model's LM loss (labels -100 are ignored)."""
    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=batch["labels"])
        return out.loss, {}
    return loss_fn


def _target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    names = peft_io.linear_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UsageError(f"the model has no linear layers named {', '.join(missing)} "
                         f"({archmod.describe(model, warn=False).summary()})")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def train_lora(model: nn.Module, tokenizer, dataset: Any, rank: int = 16, alpha: float = 32,  # noqa: PLR0913 - the method's hyper-parameters as keywords, as PEFT's LoraConfig
               targets: Sequence[str] | None = None, config: TrainConfig | None = None, *,
               dropout: float = 0.05, use_rslora: bool = False, gradient_checkpointing: bool = False,
               progress: Progress | None = None, resume: bool = False,
               fingerprint: dict | None = None) -> TrainedLora:
    """Train a fresh LoRA on ``model`` (in place, removed afterwards) with the LM loss on ``dataset``.

    ``dataset``: an ``evals.data.Dataset`` (texts or prompt/completion pairs) or a list of
    texts. ``targets``: module name suffixes (default: the attention linears, see
    ``default_targets``). ``fingerprint``: extra settings compared on resume (e.g. the base's name).
    """
    config = config or TrainConfig()
    config.validate()
    if rank < 1:
        raise UsageError(f"rank must be >= 1, got {rank}")
    if targets is None:
        targets = default_targets(model)
    if not targets:
        raise UsageError("no target modules given")
    modules = _target_modules(model, targets)
    conv1d = {archmod.fan_in_fan_out(model.get_submodule(m)) for m in modules}
    batches = make_batches(tokenizer, dataset, config.seq_len, config.batch_size, config.seed)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    if peft_io.is_quantized_model(model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    peft_io.place(model, config.device)
    lora_cfg = {"peft_type": "LORA", "r": int(rank), "lora_alpha": alpha, "lora_dropout": dropout,
                "use_rslora": use_rslora, "target_modules": sorted(set(targets)), "bias": "none",
                "fan_in_fan_out": conv1d == {True}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # LoRA A's kaiming init
        peft_model = peft_io.attach_lora(model, lora_cfg, modules)
    try:
        named = peft_io.set_trainable(peft_model, peft_io.lora_parameters(peft_model))
        stamp = {"dataset": getattr(dataset, "name", None), "examples": len(dataset), "rank": rank,
                 "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora,
                 "targets": sorted(set(targets)), **(fingerprint or {})}
        result = train(peft_model, named, lm_loss_fn(peft_model), batches, config,
                       progress=progress, resume=resume, fingerprint=stamp)
        adapter = peft_io.extract_lora(peft_model)
    finally:
        peft_model.unload()
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
    return TrainedLora(adapter=adapter, result=result)
