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
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterhub_c.adapters.attach import attach_source_lora, load_adapted
from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.options.convert import DISTILL_ON, ConvertOptions
from adapterhub_c.training import peft_io
from adapterhub_c.training.batches import make_batches
from adapterhub_c.training.loop import Progress, TrainConfig, TrainResult, train
from adapterhub_c.training.recovery import (
    FILE_NAME,
    RecoveryConfig,
    attach_recovery,
    recovery_file_bytes,
    recovery_state,
)

ROW_VARIANT, ROW_NAIVE, ROW_TEACHER, ROW_CONVERTED = ("variant alone", "variant + source (naive)",
                                                      "base + source (teacher)", "variant + converted")


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


def build_student(variant_model: nn.Module, source: LoraAdapter, inherit: bool = True, recover: bool = True,  # noqa: PLR0913 - the recovery modules' hyper-parameters as keywords
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
        peft_model, modules = attach_source_lora(variant_model, source, targets, kept_indices, copy=inherit)
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


def distill_convert(student: Student, teacher: nn.Module | None, tokenizer, dataset: Any = None,  # noqa: PLR0913 - the distillation's hyper-parameters as keywords
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


# ---------------------------------------------------------------------------------------
# the one CA-LoRA entry point


@dataclass
class ConvertInputs:
    """What one conversion works on, loaded by the caller.

    ``variant``: the compressed model (the student is built on it, in place). ``base``: the
    uncompressed base (the teacher, the "teacher" row and compensation need it; None when
    none of them is asked for). ``kept_indices``: an ffn-channels variant's kept channels.
    ``moments``: for ``recover="lowrank"``, a zero-argument callable returning the variant's
    calibration moments (``training.compensate.Moments``; the caller may cache them).
    ``ca_lora`` drops ``base`` once the teacher is built (or not needed), so that the caller
    holding only this object lets its memory go.
    """

    variant: nn.Module
    tokenizer: Any
    source: LoraAdapter
    base: nn.Module | None = None
    dataset: Any = None
    kept_indices: dict[str, torch.Tensor] | None = None
    moments: Callable[[], Any] | None = None


@dataclass
class Conversion:
    """A finished conversion: the trained parts, the compensation (lowrank) and the measurements.

    ``measurements``: row name (``ROW_*``) → what ``measure`` returned for that model.
    """

    result: ConvertResult
    compensation: Any = None
    measurements: dict[str, Any] = field(default_factory=dict)


def ca_lora(inputs: ConvertInputs, options: ConvertOptions, config: TrainConfig | None = None, *,
            measure: Callable[[str, nn.Module], Any] | None = None, progress: Progress | None = None,
            fingerprint: dict | None = None) -> Conversion:
    """Convert ``inputs.source`` to ``inputs.variant``: compensation, student, teacher, training.

    What ``options`` asks for (``ConvertOptions``): inherit / fresh LoRA, recovery modules
    and distillation (only when there is training: ``inputs.dataset`` and ``config.steps``
    > 0; without, the inherited or compensated LoRA as is), compensated low rank.
    ``config``: the training loop's settings (seed, steps, checkpoint folder; default from
    the options). ``measure(row, model)`` is called on every model worth a row while it
    exists: with ``options.reference_rows`` the variant alone, variant + source (naive) and
    the teacher, then always the converted student; its results are returned by row name.
    ``fingerprint``: extra settings compared on ``options.resume``.
    """
    config = config or TrainConfig(**options.train_config())
    trains = inputs.dataset is not None and config.steps > 0
    distills = options.distill and trains
    comp = _compensation(inputs, options, progress) if options.lowrank else None
    measurements: dict[str, Any] = {}

    def take(row: str, model: nn.Module) -> None:
        if measure is not None:
            measurements[row] = measure(row, model)

    variant = _measure_references(inputs, options, take) if options.reference_rows and measure else inputs.variant
    teacher = None
    if distills or (options.reference_rows and measure):
        teacher = build_teacher(_need_base(inputs), inputs.source)
        if options.reference_rows:
            take(ROW_TEACHER, teacher)
    inputs.base = None  # the teacher holds it when it is still needed: otherwise its memory can go now
    if not distills:
        teacher = None
    student = _student(variant, inputs, options, comp, config.seed, recover=options.recover == "modules" and trains)
    result = distill_convert(student, teacher, inputs.tokenizer, inputs.dataset,
                             distill=distills, distill_alpha=options.distill_alpha,
                             distill_on=options.distill_on, config=config, progress=progress,
                             resume=options.resume, fingerprint=fingerprint)
    del teacher
    take(ROW_CONVERTED, student.model)
    return Conversion(result=result, compensation=comp, measurements=measurements)


def _need_base(inputs: ConvertInputs) -> nn.Module:
    if inputs.base is None:
        raise UsageError("distillation needs the uncompressed base model")
    return inputs.base


def _compensation(inputs: ConvertInputs, options: ConvertOptions, progress: Progress | None) -> Any:
    """The compensated LoRA of the source (of the variant alone without inherit) on the variant."""
    from adapterhub_c.training.compensate import check_readable, compensate, compensation_targets

    if inputs.moments is None:
        raise UsageError("compensated conversion needs the variant's calibration moments")
    check_readable(inputs.variant, compensation_targets(inputs.variant, options.recover_targets))
    return compensate(_need_base(inputs), inputs.variant, inputs.source if options.inherit else None,
                      inputs.moments(), options.recover_rank, options.recover_targets,
                      kept_indices=inputs.kept_indices, progress=progress)


def _measure_references(inputs: ConvertInputs, options: ConvertOptions, take: Callable) -> nn.Module:
    """Measure the variant alone and with the source attached (naive); returns the bare variant."""
    take(ROW_VARIANT, inputs.variant)
    naive, _ = attach_source_lora(inputs.variant, inputs.source, kept_indices=inputs.kept_indices)
    naive.requires_grad_(False)
    take(ROW_NAIVE, naive.eval())
    return naive.unload()


def _student(variant: nn.Module, inputs: ConvertInputs, options: ConvertOptions, comp: Any, seed: int,
             recover: bool) -> Student:
    if comp is not None:  # the student starts from the compensated LoRA, already shaped for the variant
        return build_student(variant, comp.adapter, inherit=True, recover=False, seed=seed)
    return build_student(variant, inputs.source, inherit=options.inherit, recover=recover,
                         recover_rank=options.recover_rank, recover_act=options.recover_act,
                         kept_indices=inputs.kept_indices, seed=seed)


__all__ = ["Student", "ConvertResult", "build_student", "build_teacher", "load_adapted",
           "distill_convert", "distill_loss_fn", "ca_lora", "ConvertInputs", "Conversion", "ROW_VARIANT", "ROW_NAIVE",
           "ROW_TEACHER", "ROW_CONVERTED"]
