"""Options of ``adapt batch convert`` beyond the conversion itself (that is ``ConvertOptions``).

Three groups, each one place: which items (``BatchItems``), what is done to each after its
conversion (``BatchSteps``: pack, evaluate, push, device), and how the work is run
(``BatchExecution``: workers, executor, retries, leases).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from adapterhub_c.options import Options, is_count, option
from adapterhub_c.options.pack import parse_alpha, parse_density

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class BatchItems(Options):
    """Where the items of a batch come from (added to those it already has)."""

    family: ClassVar[str] = "batch"

    sources: tuple[str, ...] = option((), cli=False, help="Items given directly: org/repo[@revision] or "
                                                          "artifact:NAME.")
    from_file: str | None = option(None, help="Items, one a line: org/repo[@revision] or artifact:NAME "
                                              "(# comments).")
    search_base: str | None = option(None, help="Items: adapters of this base found on the Hub.")
    limit: int = option(50, help="At most this many search results.")

    def normalize(self) -> None:
        self._set("sources", tuple(s.strip() for s in self.sources if s and s.strip()))

    def validate(self) -> None:
        self._require(is_count(self.limit), "limit", "a positive integer")


@dataclass(frozen=True)
class BatchSteps(Options):
    """What happens to every item after its conversion."""

    family: ClassVar[str] = "batch"

    pack_density: Any = option(None, type=str, help="Then ComPEFT-pack, keeping this share of values.")
    pack_alpha: Any = option(None, type=str, help="Pack scale: a number or 'auto' [pack's default].")
    evaluate: bool = option(False, cli=False, help="Measure each result (the CLI's default; --no-eval skips).")
    eval_data: str | None = option(None, cli=False, help="Data of the evaluate step [the conversion's].")
    eval_max_tokens: int | None = option(None, cli=False, help="Perplexity tokens of the evaluate step.")
    push_to: str | None = option(None, help="Then push each result to the Hub under this organisation.")
    private: bool = option(False, help="Pushed repos are private.")
    device: str = option("cpu", help="cpu, cuda or auto (in every worker).")

    def normalize(self) -> None:
        if self.pack_density is not None:
            self._set("pack_density", parse_density(self.pack_density))
        if self.pack_alpha is not None:
            self._set("pack_alpha", parse_alpha(self.pack_alpha))
        if self.push_to is not None:
            self._set("push_to", self.push_to.strip())

    def validate(self) -> None:
        self._require(self.push_to is None or (self.push_to and "/" not in self.push_to), "push_to",
                      "an organisation or user name, not a repo")


@dataclass(frozen=True)
class BatchExecution(Options):
    """How a batch's work is run: where, by how many workers, how often an item is retried."""

    family: ClassVar[str] = "batch"

    workers: int = option(1, help="Parallel workers.")
    threads: int | None = option(None, help="Torch threads per local worker [cores / workers]; 1 on a machine "
                                            "busy with other work.")
    executor: str = option("local", choices=EXECUTORS)
    ray_address: str | None = option(None, help="Join this Ray cluster ('auto', host:port, ray://…).")
    retries: int = option(2, help="Attempts per item beyond the first.")
    lease_seconds: float = option(120.0, help="A silent worker's item returns to the queue after this long.")
    step_hook: str | None = option(None, cli=False, help="module:function called at every step (tests).")

    def validate(self) -> None:
        self._require(is_count(self.workers), "workers", "a positive integer")
        self._require(self.threads is None or is_count(self.threads), "threads", ">= 1")
        self._require(is_count(self.retries, 0), "retries", ">= 0")
        self._require(isinstance(self.lease_seconds, (int, float)) and math.isfinite(self.lease_seconds)
                      and self.lease_seconds > 0, "lease_seconds", "> 0")


BATCH_GROUPS = (BatchItems, BatchSteps, BatchExecution)

__all__ = ["BatchItems", "BatchSteps", "BatchExecution", "BATCH_GROUPS", "EXECUTORS"]
