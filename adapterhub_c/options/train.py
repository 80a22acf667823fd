"""Options of ``adapt train`` and the training knobs ``adapt convert`` shares with it.

The training loop's defaults live here (``training.loop.TrainConfig`` reads them), and so do
the evaluation defaults every training command uses: one statement each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adapterhub_c.errors import UsageError
from adapterhub_c.options import Options, is_count, option

DEFAULT_STEPS = 100
DEFAULT_LR = 2e-4
DEFAULT_BATCH_SIZE = 4
DEFAULT_SEQ_LEN = 256
DEFAULT_GRAD_ACCUM = 1
DEFAULT_SEED = 0
DEFAULT_CHECKPOINT_EVERY = 0   # 0 = only at the end and on Ctrl-C
DEFAULT_RANK = 16
DEFAULT_ALPHA = 32
EVAL_SPLIT = "test"
DEFAULT_EVAL_TOKENS = 8192     # perplexity: first tokens of the eval split
DEFAULT_EVAL_EXAMPLES = 50     # exact match: first examples of a task's eval split
DEVICE_HELP = "cpu, cuda or auto."

# Field makers shared by the training families (each call makes a new field, so every class
# keeps its own order of options in --help).


def steps_field(default: int = DEFAULT_STEPS) -> Any:
    """``--steps``."""
    return option(default, help="Training steps.")


def lr_field() -> Any:
    """``--lr``."""
    return option(DEFAULT_LR, help="Learning rate.")


def batch_size_field() -> Any:
    """``--batch-size``."""
    return option(DEFAULT_BATCH_SIZE, help="Sequences per step.")


def seq_len_field() -> Any:
    """``--seq-len``."""
    return option(DEFAULT_SEQ_LEN, help="Tokens per training sequence.")


def grad_accum_field() -> Any:
    """``--grad-accum``."""
    return option(DEFAULT_GRAD_ACCUM, help="Gradient accumulation steps.")


def seed_field() -> Any:
    """``--seed``."""
    return option(DEFAULT_SEED, help="Seed of the data order and of the fresh parts.")


def checkpoint_every_field() -> Any:
    """``--checkpoint-every``."""
    return option(DEFAULT_CHECKPOINT_EVERY, help="Also checkpoint every N steps (always at the end and on Ctrl-C).")


def resume_field() -> Any:
    """``--resume``."""
    return option(False, help="Continue the interrupted run with the same options.")


def max_eval_tokens_field() -> Any:
    """``--max-eval-tokens``."""
    return option(DEFAULT_EVAL_TOKENS, key=False, help="Evaluation: at most this many tokens (text perplexity).")


def max_eval_examples_field() -> Any:
    """``--max-eval-examples``."""
    return option(DEFAULT_EVAL_EXAMPLES, key=False, help="Evaluation: at most this many examples (tasks).")


def device_field() -> Any:
    """``--device``."""
    return option("cpu", help=DEVICE_HELP)


def eval_split_field() -> Any:
    """The evaluation split (library only)."""
    return option(EVAL_SPLIT, cli=False, key=False, help="Split of the evaluation data.")


class TrainingKnobs(Options):
    """Checks of the knobs every training family has (steps, lr, batch size, …)."""

    min_steps: ClassVar[int] = 0

    def validate(self) -> None:
        """Each knob in its range; ``UsageError`` naming the flag."""
        self._require(is_count(self.steps, self.min_steps), "steps", f"an integer >= {self.min_steps}"
                      + ("; nothing would be trained" if self.min_steps else ""))
        self._require(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "> 0")
        for name in ("batch_size", "seq_len", "grad_accum"):
            self._require(is_count(getattr(self, name)), name, "an integer >= 1")
        self._require(is_count(self.seed, 0), "seed", "an integer >= 0")
        self._require(is_count(self.checkpoint_every, 0), "checkpoint_every", "an integer >= 0")
        for name in ("max_eval_tokens", "max_eval_examples"):
            value = getattr(self, name)
            self._require(value is None or is_count(value, 0), name, "an integer >= 0")
        self._require(str(self.device).startswith(("cpu", "cuda", "auto")), "device", "cpu, cuda or auto")

    def train_config(self, device: str | None = None) -> dict[str, Any]:
        """The ``training.loop.TrainConfig`` fields these options set (``device`` resolved by the caller)."""
        return {"steps": int(self.steps), "lr": float(self.lr), "batch_size": int(self.batch_size),
                "seq_len": int(self.seq_len), "grad_accum": int(self.grad_accum), "seed": int(self.seed),
                "device": device or self.device, "checkpoint_every": int(self.checkpoint_every)}


@dataclass(frozen=True)
class TrainOptions(TrainingKnobs):
    """``adapt train``: a LoRA trained on a base or a variant (``workflows.training.train_adapter``)."""

    family: ClassVar[str] = "train"
    min_steps: ClassVar[int] = 1

    data: str = option(help="builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file.")
    variant: str | None = option(None, help="Train on this compressed variant of the base (QLoRA when quantized).")
    rank: int = option(DEFAULT_RANK, help="LoRA rank.")
    alpha: float = option(DEFAULT_ALPHA, help="LoRA alpha.")
    targets: tuple[str, ...] | None = option(
        None, type="csv", help="Comma-separated module names [default: the attention linears, e.g. "
        "q_proj,k_proj,v_proj,o_proj; c_attn,attn.c_proj on GPT-2].")
    steps: int = steps_field()
    lr: float = lr_field()
    batch_size: int = batch_size_field()
    seq_len: int = seq_len_field()
    grad_accum: int = grad_accum_field()
    seed: int = seed_field()
    checkpoint_every: int = checkpoint_every_field()
    resume: bool = resume_field()
    eval_data: str | None = option(None, key=False, help="Evaluate on this data instead of DATA.")
    eval_split: str = eval_split_field()
    max_eval_tokens: int | None = max_eval_tokens_field()
    max_eval_examples: int | None = max_eval_examples_field()
    baseline: bool = option(True, cli=False, key=False, help="Also measure the model before training.")
    device: str = device_field()

    def normalize(self) -> None:
        """``targets``: stripped, de-duplicated and sorted; none given → None (the attention linears)."""
        if self.targets is None:
            return
        if isinstance(self.targets, str):
            self._set("targets", tuple(self.targets.split(",")))
        given = tuple(self.targets)
        names = tuple(sorted({t.strip() for t in given if t and t.strip()}))
        if given and not names:
            raise UsageError("--targets is empty")
        self._set("targets", names or None)

    def validate(self) -> None:
        """The shared knobs, then rank >= 1 and alpha > 0."""
        self._require(is_count(self.rank), "rank", "an integer >= 1")
        self._require(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "> 0")
        super().validate()


__all__ = ["TrainOptions", "TrainingKnobs", "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_BATCH_SIZE", "DEFAULT_SEQ_LEN",
           "DEFAULT_GRAD_ACCUM", "DEFAULT_SEED", "DEFAULT_CHECKPOINT_EVERY", "EVAL_SPLIT", "DEFAULT_EVAL_TOKENS",
           "DEFAULT_EVAL_EXAMPLES", "DEFAULT_RANK", "DEFAULT_ALPHA"]
