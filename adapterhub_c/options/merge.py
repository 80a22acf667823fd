"""Options of ``adapt merge`` and ``adapt compose``.

The names merging validates against live here, once: the merge rules, spaces, sign
majorities, TIES conventions, DARE rescales, SVD routines, sign elections, and LoraHub's
search defaults. So do the rules on single options that need no tensors (a density for
the pruning rules, a positive rank, a DARE-only rescale, the search budget and bounds):
``merging.spec``, ``merging.lowrank``, ``merging.compose`` and ``workflows.merges`` import
them from here, and the options check them on construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from adapterhub_c.errors import UsageError
from adapterhub_c.options import Options, is_count, option

METHODS = ("task-arithmetic", "ties", "dare-linear", "dare-ties")
DARE_METHODS = ("dare-linear", "dare-ties")
SPACES = ("delta", "factors")
MAJORITIES = ("total", "frequency")
CONVENTIONS = ("peft", "mergekit")
RESCALES = ("l1", "inverse-p")  # DARE; see merging.rules.dare
SVD_ROUTINES = ("randomized", "exact")  # merging.lowrank
ELECTIONS = ("auto", "popcount", "dense")  # TIES over packs: workflows.merges.popcount_elections
DEVICE_HELP = "cpu, cuda or auto."

LORAHUB_EXAMPLES = 5   # LoraHub's default number of examples (one batch)
LORAHUB_L1 = 0.05 * LORAHUB_EXAMPLES  # its 0.05 penalty, on our per-example (not /examples) loss scale
DEFAULT_OPTIMIZER = "NGOpt"
DEFAULT_BUDGET = 40
DEFAULT_BOUNDS = (-1.5, 1.5)
DEFAULT_SHOTS = 5      # examples of a built-in task when --shots is not given
DEFAULT_COMPOSE_BATCH = 8


# ---- rules on single options (merging.spec and merging.compose use them too) --------------------
def method_name(method: Any) -> str:
    """The canonical merge rule name: lower case, ``-`` for ``_``, ``linear`` → ``task-arithmetic``."""
    method = str(method).lower().replace("_", "-")
    return "task-arithmetic" if method == "linear" else method


def check_choice(what: str, value: Any, allowed: Sequence[str]) -> None:
    """``UsageError`` "unknown <what> …; choose one of …" unless ``value`` is allowed."""
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def check_density(method: str, density: Any) -> float | None:
    """The density as a float: required in (0, 1] by the pruning rules, refused by task arithmetic."""
    if method == "task-arithmetic":
        if density is not None:
            raise UsageError("density applies to ties, dare-linear and dare-ties, not task-arithmetic")
        return None
    if density is None:
        raise UsageError(f"{method} needs a density in (0, 1] (fraction of entries kept)")
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise UsageError(f"density must be in (0, 1], got {density}")
    return density


def check_rank(rank: Any) -> int | None:
    """None or a positive integer."""
    if rank is None:
        return None
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise UsageError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


def check_seed(seed: Any) -> int:
    """An integer seed (None → 0)."""
    if seed is None:
        return 0
    if isinstance(seed, bool) or int(seed) != seed:
        raise UsageError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def dare_rescale(method: str, convention: str, rescale: str | None) -> str | None:
    """The DARE rescale rule: given, or the convention's (``l1`` mergekit, ``inverse-p`` peft); None otherwise."""
    if method not in DARE_METHODS:
        if rescale is not None:
            raise UsageError(f"rescale applies to dare-linear and dare-ties, not {method}")
        return None
    if rescale is None:
        return "l1" if convention == "mergekit" else "inverse-p"
    check_choice("rescale", rescale, RESCALES)
    return rescale


def parse_weights(weights: Any) -> tuple[float, ...] | None:
    """Merge weights from a sequence or ``"1,0.5"``; None stays None (1 each); finite numbers only."""
    if weights is None:
        return None
    items = weights.split(",") if isinstance(weights, str) else list(weights)
    try:
        values = tuple(float(w) for w in items)
    except (TypeError, ValueError):
        raise UsageError(f"weights must be comma-separated numbers, got {weights!r}") from None
    if not all(math.isfinite(w) for w in values):
        raise UsageError(f"weights must be finite numbers, got {list(values)}")
    return values


def parse_bounds(bounds: Any) -> tuple[float, float]:
    """Composition weight bounds from ``"lower,upper"`` or a pair."""
    items = bounds.split(",") if isinstance(bounds, str) else bounds
    try:
        lo, hi = (float(x) for x in items)
    except (TypeError, ValueError):
        raise UsageError(f"bounds must be 'lower,upper', got {bounds!r}") from None
    return lo, hi


def check_search(budget: Any, bounds: tuple[float, float], l1: float) -> None:
    """A composition search that can run: a positive integer budget, lower < upper, l1 >= 0."""
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise UsageError(f"budget must be a positive integer, got {budget!r}")
    lo, hi = bounds
    if not lo < hi:
        raise UsageError(f"bounds must be (lower, upper) with lower < upper, got {bounds}")
    if l1 < 0:
        raise UsageError(f"l1 must be >= 0, got {l1}")


def check_shots(shots: Any) -> None:
    """None (the default count) or a positive integer."""
    if shots is not None and (isinstance(shots, bool) or int(shots) != shots or shots < 1):
        raise UsageError(f"--shots must be a positive integer, got {shots!r}")


def _device_ok(device: Any) -> bool:
    return device is None or str(device).startswith(("cpu", "cuda", "auto"))


# ---- the options -------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeOptions(Options):
    """``adapt merge``: one merge rule over two or more adapters (``workflows.merges.merge_artifacts``).

    ``weights``: one per input (default 1 each); the count is checked against the inputs by
    the merge. ``rescale`` left None takes the convention's rule for DARE.
    """

    family: ClassVar[str] = "merge"

    method: str = option(choices=METHODS, help="Merge rule.")
    weights: tuple[float, ...] | None = option(None, type="csv", help="One weight per adapter, comma-separated "
                                                                      "(default 1 each).")
    density: float | None = option(None, help="Fraction kept by ties/dare, in (0, 1].")
    majority: str = option("total", choices=MAJORITIES, help="TIES sign election: sign of the sum, or of the count.")
    convention: str = option("peft", choices=CONVENTIONS,
                             help="TIES: elect on unweighted vectors and divide by the count (peft), or on weighted "
                                  "ones and divide by the sum of weights (mergekit).")
    rescale: str | None = option(None, choices=RESCALES,
                                 help="DARE: keep each input's L1 norm (l1, mergekit's rule; default with --convention "
                                      "mergekit) or multiply kept entries by 1/density (inverse-p, the DARE paper and "
                                      "PEFT; default with peft).")
    space: str = option("delta", choices=SPACES,
                        help="Merge the true ΔW = s·B·A (delta), or A and B separately (factors; equal ranks).")
    rank: int | None = option(None, help="Output rank (delta space; default exact for task arithmetic, else the "
                                         "largest input rank).")
    seed: int = option(0, help="DARE drop seed.")
    svd: str = option("randomized", choices=SVD_ROUTINES,
                      help="Delta space, rank below the merge's: seeded randomized subspace iteration (within ~1e-5 "
                           "of optimal) or a full decomposition (exact, slower).")
    device: str = option("auto", help=DEVICE_HELP)
    election: str = option("auto", choices=ELECTIONS,
                           help="TIES over packs: popcount sign election where exact (auto), insist on it, or never.")

    def normalize(self) -> None:
        """``method`` canonical (``linear``, ``TIES``, ``dare_ties`` …); ``weights`` parsed to floats."""
        self._set("method", method_name(self.method))
        self._set("weights", parse_weights(self.weights))

    def validate(self) -> None:
        """What one option decides alone: density, rank, seed, rescale, device (the count of weights: the merge)."""
        self._set("density", check_density(self.method, self.density))
        self._set("rank", check_rank(self.rank))
        self._set("seed", check_seed(self.seed))
        dare_rescale(self.method, self.convention, self.rescale)
        self._require(_device_ok(self.device), "device", "cpu, cuda or auto")

    def spec_fields(self) -> dict[str, Any]:
        """The keyword arguments of ``merging.spec.make_spec`` (all but the count of inputs)."""
        return {"method": self.method, "weights": self.weights, "space": self.space, "rank": self.rank,
                "density": self.density, "majority": self.majority, "convention": self.convention,
                "seed": self.seed, "svd": self.svd, "rescale": self.rescale}


@dataclass(frozen=True)
class ComposeOptions(Options):
    """``adapt compose``: LoraHub weights searched on a few examples (``workflows.merges.compose_artifacts``)."""

    family: ClassVar[str] = "compose"

    examples: str = option(help="A .jsonl file of prompt/completion lines, or builtin:task/<name>.")
    shots: int | None = option(None, help=f"Use the first N examples (default: all of a file, {DEFAULT_SHOTS} of a "
                                          "built-in task).")
    budget: int = option(DEFAULT_BUDGET, help="Loss evaluations of the search.")
    bounds: tuple[float, float] = option(DEFAULT_BOUNDS, type="csv", show_default=False,
                                         help="Weight bounds 'lower,upper'.  [default: "
                                              f"{DEFAULT_BOUNDS[0]},{DEFAULT_BOUNDS[1]}]")
    l1: float = option(LORAHUB_L1, help="Penalty on mean |w|.")
    optimizer: str = option(DEFAULT_OPTIMIZER, help="A nevergrad optimizer name.")
    seed: int = option(0, help="Seed of the search.")
    device: str = option("auto", help=DEVICE_HELP)
    batch_size: int = option(DEFAULT_COMPOSE_BATCH, cli=False, help="Examples per forward pass of the search.")

    def normalize(self) -> None:
        """``bounds`` parsed to a pair of floats."""
        self._set("bounds", parse_bounds(self.bounds))

    def validate(self) -> None:
        """Shots, budget, bounds, l1, batch size, device (the optimizer's name: the search, which knows nevergrad)."""
        check_shots(self.shots)
        check_search(self.budget, self.bounds, self.l1)
        self._require(is_count(self.batch_size), "batch_size", "a positive integer")
        self._require(is_count(self.seed, 0), "seed", "an integer >= 0")
        self._require(_device_ok(self.device), "device", "cpu, cuda or auto")


__all__ = ["MergeOptions", "ComposeOptions", "METHODS", "DARE_METHODS", "SPACES", "MAJORITIES", "CONVENTIONS",
           "RESCALES", "SVD_ROUTINES", "ELECTIONS", "LORAHUB_EXAMPLES", "LORAHUB_L1", "DEFAULT_OPTIMIZER",
           "DEFAULT_BUDGET", "DEFAULT_BOUNDS", "DEFAULT_SHOTS", "DEFAULT_COMPOSE_BATCH", "method_name",
           "check_choice", "check_density", "check_rank", "check_seed", "dare_rescale", "parse_weights",
           "parse_bounds", "check_search", "check_shots"]
