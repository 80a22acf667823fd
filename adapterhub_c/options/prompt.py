"""Options of ``adapt prompt learn`` and ``adapt prompt transfer`` (Compress, Then Prompt soft prompts).

The soft-prompt defaults live here, once (``workflows.prompts`` reads them): they differ from
a LoRA's (a prompt learns at a much higher rate on shorter batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import ClassVar

from adapterhub_c.errors import UsageError
from adapterhub_c.options import Options, is_count, option
from adapterhub_c.options.corpus import DEFAULT_CORPUS

DEFAULT_DATA = DEFAULT_CORPUS
DEFAULT_TOKENS = 100
DEFAULT_STEPS = 200
DEFAULT_LR = 1e-2  # 30 steps, 16 tokens on NF4+Wanda50: ppl -10% at 1e-2 vs -2% at 1e-3 (adapt demo sizes)
DEFAULT_BATCH_SIZE = 2
DEFAULT_SEQ_LEN = 256
DEFAULT_INIT = "vocab-sample"
SPLITS = ("train", "validation", "test")


def _check_device(device: object) -> bool:
    return device is None or str(device).startswith(("cpu", "cuda", "auto"))


@dataclass(frozen=True)
class PromptOptions(Options):
    """``adapt prompt learn``: a soft prompt learned on a variant (``workflows.prompts.learn_prompt_artifact``).

    ``eval_tokens`` only changes what is measured (before / after perplexity): a rerun that
    differs only there returns the earlier prompt.
    """

    family: ClassVar[str] = "prompt"

    data: str = option(DEFAULT_DATA, help="Training text: builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file "
                                          "(train split).")
    tokens: int = option(DEFAULT_TOKENS, help="Prompt length k.")
    init: str = option(DEFAULT_INIT, help="vocab-sample (random real-token embeddings) or text:\"…\".")
    steps: int = option(DEFAULT_STEPS, help="Training steps.")
    lr: float = option(DEFAULT_LR, help="Learning rate.")
    batch_size: int = option(DEFAULT_BATCH_SIZE, help="Sequences per step.")
    seq_len: int = option(DEFAULT_SEQ_LEN, help="Tokens per training sequence.")
    eval_tokens: int | None = option(None, key=False,
                                     help="Measure before/after perplexity on at most this many test tokens.")
    checkpoint_every: int = option(0, help="Checkpoint every N steps (always at the end and on Ctrl-C).")
    resume: bool = option(False, help="Continue from the checkpoint of an interrupted run.")
    seed: int = option(0, help="Seed of the initialisation and of the data order.")
    device: str = option("cpu", help="cpu, cuda or auto.")

    def validate(self) -> None:
        """Prompt length, init, evaluation budget and the training knobs' ranges (the context: the workflow)."""
        if not is_count(self.tokens):
            raise UsageError(f"--tokens must be a positive integer, got {self.tokens!r}")
        if not (self.init == DEFAULT_INIT or str(self.init).startswith("text:")):
            raise UsageError(f"unknown --init {self.init!r} (choose 'vocab-sample' or 'text:<string>')")
        if self.eval_tokens is not None and not (is_count(self.eval_tokens, 2)):
            raise UsageError("--eval-tokens must be at least 2")
        self._require(is_count(self.steps, 0), "steps", "an integer >= 0")
        self._require(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "> 0")
        for name in ("batch_size", "seq_len"):
            self._require(is_count(getattr(self, name)), name, "an integer >= 1")
        self._require(is_count(self.checkpoint_every, 0), "checkpoint_every", "an integer >= 0")
        self._require(is_count(self.seed, 0), "seed", "an integer >= 0")
        self._require(_check_device(self.device), "device", "cpu, cuda or auto")


@dataclass(frozen=True)
class TransferOptions(Options):
    """``adapt prompt transfer``: every prompt on every variant (``workflows.prompts.prompt_transfer``)."""

    family: ClassVar[str] = "prompt transfer"

    split: str = option("test", choices=SPLITS, help="Split of the data to score.")
    max_tokens: int | None = option(None, help="Score at most this many tokens per cell.")
    plot: str | None = option(None, help="Write a heat map PNG here.")
    device: str = option("cpu", help="cpu, cuda or auto.")

    def normalize(self) -> None:
        """``plot`` as a string (a path object is welcome)."""
        if self.plot is not None:
            self._set("plot", str(self.plot))

    def validate(self) -> None:
        """At least 2 tokens per cell; the plot a .png file."""
        if self.max_tokens is not None and not is_count(self.max_tokens, 2):
            raise UsageError("--max-tokens must be at least 2")
        if self.plot is not None and PurePath(self.plot).suffix.lower() != ".png":
            raise UsageError("--plot must name a .png file")
        self._require(_check_device(self.device), "device", "cpu, cuda or auto")


__all__ = ["PromptOptions", "TransferOptions", "DEFAULT_DATA", "DEFAULT_TOKENS", "DEFAULT_STEPS", "DEFAULT_LR",
           "DEFAULT_BATCH_SIZE", "DEFAULT_SEQ_LEN", "DEFAULT_INIT", "SPLITS"]
