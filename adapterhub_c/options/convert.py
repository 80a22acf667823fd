"""Options of ``adapt convert`` (and of every item of ``adapt batch convert``).

The names the conversion validates against live here, once: the recovery methods, the
layer sets compensated conversion covers, what distillation compares, the recovery
activations. The domain modules import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adapterhub_c.errors import UsageError
from adapterhub_c.options import is_count, option
from adapterhub_c.options.train import (
    DEFAULT_RANK,
    TrainingKnobs,
    batch_size_field,
    checkpoint_every_field,
    device_field,
    eval_split_field,
    grad_accum_field,
    lr_field,
    max_eval_examples_field,
    max_eval_tokens_field,
    resume_field,
    seed_field,
    seq_len_field,
    steps_field,
)

RECOVER_METHODS = ("modules", "lowrank", "none")  # CA-LoRA modules, compensated plain LoRA, nothing
COMPENSATE_TARGETS = ("attn", "all")              # keys of training.compensate.TARGET_SETS
DISTILL_ON = ("hidden", "logits")                 # the last hidden state or the logits, MSE either way
RECOVER_ACTS = ("gelu", "relu", "silu", "identity")  # keys of the recovery activations
DEFAULT_RECOVER_ACT = "gelu"
DEFAULT_DISTILL_ALPHA = 1.0
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_CALIB_SEQ_LEN = 128


@dataclass(frozen=True)
class ConvertOptions(TrainingKnobs):
    """``adapt convert``: CA-LoRA (inherit, recover, distill) or compensated conversion.

    ``recover``: "modules" (CA-LoRA recovery modules, trained with ``data``), "lowrank"
    (the compression error folded into the LoRA, no data needed; one plain PEFT LoRA) or
    "none". True / False / None are read as "modules" / "none" / "modules" (the spelling of
    older callers and of stored batches).
    """

    family: ClassVar[str] = "convert"

    data: str | None = option(None, help="Training data; without it: inherit only, no training.")
    eval_data: str | None = option(None, key=False,
                                   help="Evaluation data [default: DATA, else the adapter's own data].")
    eval_split: str = eval_split_field()
    inherit: bool = option(True, help="Start the LoRA fresh instead of from ADAPTER.")
    recover: str = option(
        "modules", choices=RECOVER_METHODS,
        aliases={"--no-recover": ("none", "No recovery modules (--recover none).")},
        help="modules: CA-LoRA recovery modules (trained with --data); lowrank: fold the compression error "
             "into the LoRA (activation-weighted low rank, no data needed; plain PEFT); none.")
    distill: bool = option(True, help="Task loss only, no teacher.")
    recover_rank: int = option(DEFAULT_RANK, help="Recovery modules' rank; lowrank: the rank added to the "
                                                  "source's on every layer.")
    recover_act: str = option(DEFAULT_RECOVER_ACT, help="gelu, relu, silu or identity.")
    recover_targets: str = option("all", flag="--targets", choices=COMPENSATE_TARGETS,
                                  help="lowrank: compensate the attention projections or all decoder linears.")
    calib: str | None = option(None, help="lowrank: calibration data [default: the variant's own, else "
                                          "builtin:pydoc].")
    calib_samples: int = option(DEFAULT_CALIB_SAMPLES, help="lowrank: calibration sequences (moments are "
                                                            "cached per variant).")
    calib_seq_len: int = option(DEFAULT_CALIB_SEQ_LEN, help="lowrank: tokens per calibration sequence.")
    distill_alpha: float = option(DEFAULT_DISTILL_ALPHA, help="Weight of the distillation loss.")
    distill_on: str = option("hidden", choices=DISTILL_ON, help="What to distil: the last hidden state or "
                                                                 "the logits.")
    steps: int = steps_field()
    lr: float = lr_field()
    batch_size: int = batch_size_field()
    seq_len: int = seq_len_field()
    grad_accum: int = grad_accum_field()
    seed: int = seed_field()
    checkpoint_every: int = checkpoint_every_field()
    resume: bool = resume_field()
    max_eval_tokens: int | None = max_eval_tokens_field()
    max_eval_examples: int | None = max_eval_examples_field()
    reference_rows: bool = option(True, key=False, help="Measure only the converted adapter (not variant alone / naive / "
                                             "teacher).")
    device: str = device_field()

    def normalize(self) -> None:
        """``recover`` True / None → "modules", False → "none"."""
        if self.recover is None or self.recover is True:
            self._set("recover", "modules")
        elif self.recover is False:
            self._set("recover", "none")

    def validate(self) -> None:
        """Ranges of every knob, and a conversion that leaves something to register."""
        super().validate()
        self._require(isinstance(self.distill_alpha, (int, float)) and self.distill_alpha >= 0,
                      "distill_alpha", ">= 0")
        self._require(is_count(self.recover_rank), "recover_rank", "a positive integer")
        if self.lowrank:
            for name in ("calib_samples", "calib_seq_len"):
                self._require(is_count(getattr(self, name)), name, "a positive integer")
        elif self.recover_act not in RECOVER_ACTS:
            raise UsageError(f"unknown recovery activation {self.recover_act!r} (choose from "
                             f"{', '.join(RECOVER_ACTS)})")
        if not self.inherit and not self.trains and not self.lowrank:
            raise UsageError("--no-inherit without training data (or with --steps 0) leaves an empty adapter; "
                             "give --data")

    @property
    def trains(self) -> bool:
        """Training data given and at least one step: the student is trained."""
        return bool(self.data) and self.steps > 0

    @property
    def lowrank(self) -> bool:
        """Compensated conversion (``--recover lowrank``)."""
        return self.recover == "lowrank"

    @property
    def recovery_modules(self) -> bool:
        """CA-LoRA recovery modules are attached and trained (``modules`` with training)."""
        return self.recover == "modules" and self.trains

    @property
    def distills(self) -> bool:
        """The student learns from the teacher (distillation on, with training)."""
        return self.distill and self.trains

    @property
    def needs_base(self) -> bool:
        """The uncompressed base is loaded: a teacher to distil from or to measure, or a compensation."""
        return self.distills or self.reference_rows or self.lowrank


__all__ = ["ConvertOptions", "RECOVER_METHODS", "COMPENSATE_TARGETS", "DISTILL_ON", "RECOVER_ACTS",
           "DEFAULT_RECOVER_ACT", "DEFAULT_DISTILL_ALPHA", "DEFAULT_CALIB_SAMPLES", "DEFAULT_CALIB_SEQ_LEN"]
