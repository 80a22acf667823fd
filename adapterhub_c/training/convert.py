"""CA-LoRA / CPET: adapt a LoRA trained on a base to a compressed variant of that base.

student = variant + LoRA (inherited from the source) + recovery modules (``recovery.py``)
teacher = uncompressed base + source LoRA, frozen, eval mode, run under ``no_grad``
loss    = task loss (the student's LM loss on the batch) + alpha · MSE(student, teacher)

Choices:
- distillation signal: the last hidden state (``output_hidden_states``, last entry, i.e.
  after the final norm), as the reference code does for Llama, alpha 1.0; ``"logits"``
  uses the final logits, also with MSE (the reference's loss family; not KL). The MSE is
  averaged over real (attention-mask) tokens.
- every switch can be turned off: ``inherit=False`` → PEFT's default LoRA init (B = 0);
  ``recover=False`` → no recovery modules; ``distill=False`` → task loss only and the
  teacher is never called. No data (``dataset=None`` or ``steps=0``) → no training: the
  inherited LoRA as is (the paper's zero-data case).
- trainable parameters are exactly the student's LoRA A/B (+ recovery D/U), set
  explicitly and asserted by name (some PEFT versions freeze newly added adapters).
  Inherited ``modules_to_save`` copies, if the source has any, stay frozen.
- training defaults: see ``loop.TrainConfig`` (lr 2e-4, weight decay 0.01, clip 1.0,
  constant schedule).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.models import arch as archmod
from adapterhub_c.training import peft_io
from adapterhub_c.training.batches import make_batches
from adapterhub_c.training.loop import Progress, TrainConfig, TrainResult, train
from adapterhub_c.training.recovery import (
    FILE_NAME,
    RecoveryConfig,
    attach_recovery,
    load_recovery,
    read_recovery_file,
    recovery_file_bytes,
    recovery_state,
)

DISTILL_ON = ("hidden", "logits")


@dataclass
class Student:
    """The student model (a PEFT model over the variant) and what was attached to it."""

    model: nn.Module
    lora_modules: list[str]
    recovery: RecoveryConfig | None
    trainable: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    def lora_adapter(self) -> LoraAdapter:
        """The LoRA part, PEFT-loadable (keys ``base_model.model.<module>.lora_A.weight``)."""
        return peft_io.extract_lora(self.model)

    def recovery_state(self) -> dict[str, torch.Tensor] | None:
        """The recovery tensors by module name, or None without recovery."""
        return recovery_state(self.model) if self.recovery else None


@dataclass
class ConvertResult:
    """A converted adapter: the LoRA part, the recovery part, and how training went."""

    lora: LoraAdapter
    recovery_state: dict[str, torch.Tensor] | None
    recovery_config: RecoveryConfig | None
    train: TrainResult | None

    def save(self, folder: str | Path) -> Path:
        """Write a PEFT folder (+ ``recovery.safetensors`` when there is recovery), atomically."""
        extra = {}
        if self.recovery_state:
            extra[FILE_NAME] = recovery_file_bytes(self.recovery_state, self.recovery_config)
        return self.lora.to_folder(folder, extra_files=extra)


# ---------------------------------------------------------------------------------------
# the student


def _source_tensors(source: LoraAdapter, mapping: dict[str, str], kept_indices: dict[str, torch.Tensor] | None,
                    arch: archmod.Architecture | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per target module {"A", "B", "bias"?} of the source, renamed and ffn-sliced.

    ffn-channels (``models.arch`` MLP pairing of the variant): the LoRA B rows of an MLP
    input linear follow its kept channels (both halves of a fused gate/up linear), the
    LoRA A columns of the MLP output linear too.
    """
    out = {}
    for src, layer in source.layers().items():
        if src not in mapping:
            continue
        name = mapping[src]
        A, B, bias, magnitude = layer.A, layer.B, layer.bias, layer.magnitude
        parent, leaf = name.rsplit(".", 1)
        kept = (kept_indices or {}).get(parent)
        mlp = arch.mlp_of(parent) if kept is not None and arch is not None else None
        if kept is not None and mlp is None:
            raise UsageError(f"{name}: the variant has no MLP at {parent} to slice to its kept channels")
        if mlp is not None:
            kept = torch.as_tensor(kept, dtype=torch.long)
            if leaf in mlp.inputs:
                rows = mlp.channel_rows_for_size(leaf, kept, B.shape[0])
                B = B.index_select(0, rows)
                bias = None if bias is None else bias.index_select(0, rows)
                magnitude = None if magnitude is None else magnitude.index_select(0, rows)
            elif leaf == mlp.output:
                A = A.index_select(1, kept)
        out[name] = {"A": A, "B": B, **({"bias": bias} if bias is not None else {}),
                     **({"magnitude": magnitude} if magnitude is not None else {})}
    return out


def _attach_source_lora(model: nn.Module, source: LoraAdapter, targets=None, kept_indices=None,
                        copy: bool = True):
    """PEFT LoRA with the source's config on ``model``; returns (peft_model, module names)."""
    modules = source.modules() + source.embedding_modules()
    if targets:
        modules = [m for m in modules if any(m == t or m.endswith("." + t) for t in targets)]
        if not modules:
            raise UsageError(f"the adapter has no modules matching {', '.join(targets)}")
    mapping = peft_io.retarget(modules, model)
    arch = archmod.describe(model, warn=False) if kept_indices else None
    peft_model = peft_io.attach_lora(model, source.config, sorted(mapping.values()))
    if copy:
        peft_io.copy_lora(peft_model, _source_tensors(source, mapping, kept_indices, arch))
        _copy_extra_tensors(peft_model, source)
    return peft_model, sorted(mapping.values())


def _copy_extra_tensors(peft_model: nn.Module, source: LoraAdapter) -> None:
    """Load the source's non-LoRA tensors (``modules_to_save`` copies) when it has any."""
    extra = {k: v for k, v in source.tensors.items()
             if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector"))}
    if not extra:
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, extra, adapter_name=peft_io.ADAPTER)
    if result.unexpected_keys:
        raise UsageError(f"the model has no place for adapter tensors {', '.join(result.unexpected_keys[:5])}")


def build_student(variant_model: nn.Module, source: LoraAdapter, inherit: bool = True, recover: bool = True,
                  recover_rank: int = 16, recover_act: str = "gelu",
                  kept_indices: dict[str, torch.Tensor] | None = None, targets=None, *,
                  recover_alpha: float | None = None, recover_dropout: float = 0.05,
                  recover_targets=None, seed: int = 0) -> Student:
    """Attach (in place) the source's LoRA, inherited or fresh, and recovery modules to a variant.

    - ``kept_indices``: for ``ffn-channels`` variants, {"model.layers.0.mlp": kept channel
      indices}; LoRA B rows of the MLP input linears (gate/up, fused gate_up, c_fc, …) and
      LoRA A columns of the MLP output linear are sliced to them.
    - ``targets``: only the source's modules ending in these names (default: all).
    - ``recover_targets``: which linears get recovery (default: every decoder-block linear).
    - ``seed``: seeds the fresh parts (LoRA A without inherit; recovery D through
      ``RecoveryConfig.init_seed``, so a pack can store D's change from it); the caller's
      RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model, modules = _attach_source_lora(variant_model, source, targets, kept_indices, copy=inherit)
        rec_config = None
        if recover:
            rec_config = RecoveryConfig(rank=recover_rank, alpha=recover_alpha, act=recover_act,
                                        dropout=recover_dropout, init_seed=seed)
            attach_recovery(peft_model, rec_config, recover_targets)
    params = peft_io.lora_parameters(peft_model)
    if recover:
        params.update(peft_io.recovery_parameters(peft_model))
    trainable = peft_io.set_trainable(peft_model, params)
    return Student(model=peft_model, lora_modules=modules, recovery=rec_config, trainable=trainable)


def build_teacher(base_model: nn.Module, source: LoraAdapter) -> nn.Module:
    """The teacher: the uncompressed base with the source LoRA, frozen and in eval mode."""
    teacher = load_adapted(base_model, source)
    teacher.requires_grad_(False)
    return teacher.eval()


def load_adapted(variant_model: nn.Module, lora: LoraAdapter, recovery_state: Any = None,
                 recovery_config: RecoveryConfig | dict | None = None) -> nn.Module:
    """A PEFT model of ``variant_model`` with ``lora`` (and recovery) attached, eval mode.

    ``recovery_state``: None, a {name: tensor} dict (then ``recovery_config`` gives its
    act/scale/dropout; default ``RecoveryConfig()``), or a path to ``recovery.safetensors``
    or to a folder holding one.
    """
    peft_model, _ = _attach_source_lora(variant_model, lora)
    if recovery_state is not None:
        if isinstance(recovery_state, (str, Path)):
            path = Path(recovery_state)
            recovery_state, recovery_config = read_recovery_file(path / FILE_NAME if path.is_dir() else path)
        if isinstance(recovery_config, dict):
            recovery_config = RecoveryConfig.from_dict(recovery_config)
        load_recovery(peft_model, recovery_state, recovery_config or RecoveryConfig())
    peft_model.requires_grad_(False)
    return peft_model.eval()


# ---------------------------------------------------------------------------------------
# distillation


def _signal(out, on: str) -> torch.Tensor:
    return out.hidden_states[-1] if on == "hidden" else out.logits


def distill_loss_fn(student: nn.Module, teacher: nn.Module | None, distill_alpha: float, distill_on: str):
    """``loss_fn(batch) -> (loss, logs)``: task loss (+ alpha · masked MSE to the teacher)."""
    hidden = teacher is not None and distill_on == "hidden"

    def loss_fn(batch: dict) -> tuple[torch.Tensor, dict]:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        out = student(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=hidden)
        task = out.loss
        if teacher is None:
            return task, {"task_loss": float(task.detach())}
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        s_sig, t_sig = _signal(out, distill_on).float(), _signal(t_out, distill_on).float()
        keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
        kd = F.mse_loss(s_sig[keep], t_sig[keep].detach())
        loss = task + distill_alpha * kd
        return loss, {"task_loss": float(task.detach()), "distill_loss": float(kd.detach())}

    return loss_fn


def _check_teacher(teacher: nn.Module, student: Student) -> None:
    if teacher is student.model:
        raise UsageError("the teacher is the student itself")
    student_params = {id(p) for p in student.model.parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in student_params]
    if shared:
        raise UsageError(f"the teacher shares parameters with the student ({', '.join(shared[:3])}); "
                         "build the teacher from a separate copy of the base")


def distill_convert(student: Student, teacher: nn.Module | None, tokenizer, dataset: Any = None,
                    distill: bool = True, distill_alpha: float = 1.0, distill_on: str = "hidden",
                    config: TrainConfig | None = None, *, progress: Progress | None = None,
                    resume: bool = False, fingerprint: dict | None = None) -> ConvertResult:
    """Train the student's LoRA (+ recovery) on ``dataset``; see the module docstring.

    ``teacher``: from ``build_teacher`` (only needed when ``distill``). Returns the LoRA
    part, the recovery state and the training result (None when there was no training).
    """
    config = config or TrainConfig()
    if distill_on not in DISTILL_ON:
        raise UsageError(f"distill_on must be one of {', '.join(DISTILL_ON)} (got {distill_on!r})")
    if distill and distill_alpha < 0:
        raise UsageError(f"distill_alpha must be >= 0 (got {distill_alpha})")
    result = None
    if dataset is not None and config.steps > 0:
        if distill:
            if teacher is None:
                raise UsageError("distillation needs a teacher (the base model with the source adapter)")
            _check_teacher(teacher, student)
            teacher.requires_grad_(False)
            peft_io.place(teacher, config.device).eval()
        peft_io.place(student.model, config.device)
        batches = make_batches(tokenizer, dataset, config.seq_len, config.batch_size, config.seed)
        loss_fn = distill_loss_fn(student.model, teacher if distill else None, distill_alpha, distill_on)
        stamp = {"dataset": getattr(dataset, "name", None), "examples": len(dataset), "distill": distill,
                 "distill_alpha": distill_alpha if distill else None, "distill_on": distill_on if distill else None,
                 "recovery": student.recovery.to_dict() if student.recovery else None,
                 "lora_modules": student.lora_modules, **(fingerprint or {})}
        result = train(student.model, student.trainable, loss_fn, batches, config,
                       progress=progress, resume=resume, fingerprint=stamp)
    student.model.eval()
    return ConvertResult(lora=student.lora_adapter(), recovery_state=student.recovery_state(),
                         recovery_config=student.recovery, train=result)


def convert(variant_model: nn.Module, source: LoraAdapter, base_model: nn.Module | None, tokenizer,
            dataset: Any = None, *, inherit: bool = True, recover: bool = True, distill: bool = True,
            recover_rank: int = 16, recover_act: str = "gelu", distill_alpha: float = 1.0,
            distill_on: str = "hidden", kept_indices: dict | None = None,
            config: TrainConfig | None = None, progress: Progress | None = None,
            resume: bool = False) -> ConvertResult:
    """One call for the whole conversion: student, teacher (when distilling with data), training."""
    config = config or TrainConfig()
    student = build_student(variant_model, source, inherit=inherit, recover=recover, recover_rank=recover_rank,
                            recover_act=recover_act, kept_indices=kept_indices, seed=config.seed)
    teacher = None
    if distill and dataset is not None and config.steps > 0:
        if base_model is None:
            raise UsageError("distillation needs the uncompressed base model")
        teacher = build_teacher(base_model, source)
    return distill_convert(student, teacher, tokenizer, dataset, distill=distill, distill_alpha=distill_alpha,
                           distill_on=distill_on, config=config, progress=progress, resume=resume)


__all__ = ["Student", "ConvertResult", "build_student", "build_teacher", "load_adapted",
           "distill_convert", "convert", "distill_loss_fn"]
