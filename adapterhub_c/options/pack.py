"""Options of ``adapt pack`` (and of the pack step of ``adapt batch convert``).

The names packing validates against live here, once: the methods, scopes, encodings and
alpha-search metrics; ``packing`` imports them from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from adapterhub_c.errors import UsageError
from adapterhub_c.options import Options, option

METHODS = ("compeft", "stc", "delta-fit")   # packing.compeft / packing.deltafit
SCOPES = ("global", "tensor")               # top-k and std per tensor or over all tensors
ENCODINGS = ("golomb", "bitmask")           # packing.encoding
ALPHA_METRICS = ("auto", "perplexity", "completion_ppl", "exact_match")  # --alpha auto's criterion
DEFAULT_METHOD = "delta-fit"
DEFAULT_SEARCH_TOKENS = 2048   # perplexity tokens per evaluation of the alpha search
DEFAULT_SEARCH_EXAMPLES = 24   # exact-match examples per evaluation of the alpha search


def parse_density(value: Any) -> float:
    """A density from ``0.1``, ``"0.1"`` or ``"10%"``; UsageError unless in (0, 1]."""
    text = str(value).strip()
    try:
        k = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"density must be a number in (0, 1] or a percentage, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 < k <= 1.0:
        raise UsageError(f"density must be in (0, 1], got {k!r}")
    return k


def parse_alpha(value: Any) -> float | str:
    """``"auto"`` or a positive number."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"alpha must be a positive number or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(a) and a > 0):
        raise UsageError(f"alpha must be a positive number, got {value!r}")
    return a


@dataclass(frozen=True)
class PackOptions(Options):
    """``adapt pack``: ComPEFT / delta-fit packing of an adapter (``workflows.packs.pack_artifact``)."""

    family: ClassVar[str] = "pack"

    density: Any = option(help="Kept fraction k in (0, 1], e.g. 0.1 or 10%.", short="-k", type=str)
    alpha: Any = option(1.0, type=str, help="compeft: magnitude multiplier (values become alpha·std·sign); "
                        "delta-fit: gain on the fitted update (1 = the fit); or 'auto' with --eval-data.")
    eval_data: str | None = option(None, help="Validation data for --alpha auto (and to measure pack vs unpacked "
                                              "quality).")
    alpha_metric: str = option("auto", choices=ALPHA_METRICS,
                               help="Search criterion: auto = exact match on tasks, perplexity on text.")
    max_tokens: int | None = option(DEFAULT_SEARCH_TOKENS, help="Perplexity tokens per evaluation.")
    max_examples: int | None = option(DEFAULT_SEARCH_EXAMPLES, help="Exact-match examples per evaluation (tasks).")
    scope: str = option("tensor", choices=SCOPES,
                        help="Top-k and std per tensor, or one over all tensors (the paper's code; it can zero "
                             "whole modules of LoRAs whose B is much smaller than A).")
    encoding: str = option("golomb", choices=ENCODINGS, help="golomb: storage and transfer; bitmask: two bit "
                                                             "planes, for kernels and bitwise merge.")
    method: str = option(DEFAULT_METHOD, choices=METHODS,
                         help="delta-fit: top-k signs of each module's re-balanced factors, scaled to fit B·A "
                              "(ours); compeft: the paper's alpha·std per factor; stc: magnitude = mean |kept "
                              "values| (alpha ignored).")
    device: str = option("cpu", help="cpu, cuda or auto (for evaluation).")

    def normalize(self) -> None:
        """``density`` and ``alpha`` parsed (``"10%"``, ``"auto"``)."""
        self._set("density", parse_density(self.density))
        self._set("alpha", parse_alpha(self.alpha))

    def validate(self) -> None:
        """delta-fit needs per-tensor scope; alpha auto needs evaluation data; search budgets >= 2."""
        if self.method == "delta-fit" and self.scope != "tensor":
            raise UsageError("method delta-fit fits each module on its own: it needs scope tensor")
        if self.alpha == "auto" and not self.eval_data:
            raise UsageError("--alpha auto needs --eval-data to choose alpha on")
        for label, v in (("max tokens", self.max_tokens), ("max examples", self.max_examples)):
            if v is not None and v < 2:
                raise UsageError(f"{label} must be at least 2, got {v}")


__all__ = ["PackOptions", "METHODS", "SCOPES", "ENCODINGS", "ALPHA_METRICS", "DEFAULT_METHOD",
           "DEFAULT_SEARCH_TOKENS", "DEFAULT_SEARCH_EXAMPLES", "parse_density", "parse_alpha"]
