"""Options of ``adapt variant create``.

The names a recipe validates against live here, once: the quantization and pruning
methods, the pruning granularities, the methods that read the default calibration set,
and the default calibration marker. ``variants.recipe`` and ``workflows.variants`` import
them from here.

The options say how to build one variant; the recipe they give (``variants.recipe.Recipe``,
built by ``workflows.variants.make_recipe``) is its identity and does the recipe's own
checks (a sparsity a method needs, calibration a method reads, …).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adapterhub_c.options import Options, is_count, option
from adapterhub_c.options.corpus import DEFAULT_CORPUS

# GGUF types a variant can be stored in (llama.cpp's formats): the gguf package quantizes the first five,
# llama.cpp's own quantizer the k-quants (formats/gguf_write.py)
GGUF_VARIANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
                      "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
GGUF_PREFIX = "gguf:"
QUANT_METHODS = ("none", "int8", "nf4", "fp4", "gptq") + tuple(GGUF_PREFIX + t for t in GGUF_VARIANT_TYPES)
PRUNE_METHODS = ("none", "magnitude", "wanda", "2:4", "ffn-channels", "sparsegpt", "sparsegpt:2:4")
GRANULARITIES = ("row", "layer")
CALIB_USERS = ("wanda", "2:4", "ffn-channels", "sparsegpt", "sparsegpt:2:4")  # (and gptq) the default calibration set serves
GPTQ_BITS = (2, 3, 4, 8)
MOE_ROUTERS = ("mlp", "similarity")
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_CALIB_SEQ_LEN = 128
DEFAULT_EVAL_TOKENS = 8192  # perplexity of base and variant: first tokens of builtin:pydoc test


def canonical_quant(quant: str) -> str:
    """A quantization name as recipes write it: lower case, a GGUF type upper case (``gguf:Q4_K_M``)."""
    low = str(quant).strip().lower()
    return GGUF_PREFIX + low[len(GGUF_PREFIX):].upper() if low.startswith(GGUF_PREFIX) else low


class DefaultCalib(str):
    """The default calibration set: used by the methods of ``CALIB_USERS``, silently unused otherwise.

    A calibration set named explicitly is refused where nothing would read it; this one,
    given by default, is dropped instead. (It is a ``str``, so it reads and prints as its
    name; written to JSON it becomes a plain, explicit name.)
    """


DEFAULT_CALIB = DefaultCalib(DEFAULT_CORPUS)


@dataclass(frozen=True)
class VariantOptions(Options):
    """``adapt variant create``: how to compress a base (``workflows.variants.create_variant``).

    ``calib``: the calibration data set; ``None`` (or ``"none"``) scores 2:4 and ffn-channels by
    magnitude; left at ``DEFAULT_CALIB`` it is used only where a method reads activations.
    ``include_embeddings`` / ``include_lm_head`` are library-only knobs.
    """

    family: ClassVar[str] = "variant"

    quant: str = option("none", choices=QUANT_METHODS,
                        help="Quantization of the decoder linears: bitsandbytes int8/nf4/fp4 (applied at load), "
                             "gptq, or gguf:TYPE (stored as a llama.cpp GGUF file of that type, e.g. gguf:Q4_0, "
                             "gguf:Q4_K_M).")
    double_quant: bool = option(False, help="Quantize the 4-bit scales too (nf4/fp4).")
    prune: str = option("none", choices=PRUNE_METHODS,
                        help="Pruning method (magnitude/wanda: unstructured; 2:4: semi-structured; ffn-channels: "
                             "MLP channels; sparsegpt[:2:4]: with the OBS update).")
    sparsity: float | None = option(None, help="Fraction of the pruned weights (or MLP channels) removed, in "
                                               "[0, 1); 2:4 is 0.5.")
    granularity: str | None = option(None, choices=GRANULARITIES,
                                     help="magnitude/wanda: rank weights per output row (default) or per whole "
                                          "layer.")
    # The alias keeps the command line's default unset (None), so the field's own default, the
    # DEFAULT_CALIB marker, applies: click would turn the marker into a plain, explicit name.
    calib: str | None = option(DEFAULT_CALIB, show_default=False,
                               aliases={"--no-calib": ("none", "No calibration data (--calib none).")},
                               help=f"Calibration data for wanda, 2:4 and ffn-channels (default {DEFAULT_CALIB}; "
                                    "'none' for magnitude-scored 2:4 / ffn-channels).")
    calib_samples: int = option(DEFAULT_CALIB_SAMPLES, help="Calibration sequences.")
    calib_seq_len: int = option(DEFAULT_CALIB_SEQ_LEN, help="Tokens per calibration sequence.")
    bits: int | None = option(None, help="gptq: bits per weight, 2, 3, 4 or 8 (default 4).")
    group_size: int | None = option(None, help="gptq: input columns per scale / zero point (default: one per output "
                                               "row); must divide every layer's inputs.")
    act_order: bool = option(False, help="gptq: quantize columns by decreasing Hessian diagonal.")
    sym: bool = option(False, help="gptq: symmetric grid (default asymmetric, as the reference).")
    moefy: bool = option(False, help="MoEfication: split every MLP's channels into --experts experts (balanced "
                                     "k-means) with a router per layer choosing --active of them per token "
                                     "(needs calibration data).")
    experts: int | None = option(None, help="moefy: experts per MLP (the first intermediate % experts experts "
                                            "get one channel more).")
    active: int | None = option(None, help="moefy: experts computed per token (at most --experts).")
    moe_router: str | None = option(None, choices=MOE_ROUTERS,
                                    help="moefy: mlp (trained to predict the experts' activation norms; default) or "
                                         "similarity (nearest expert centroid).")
    include_embeddings: bool = option(False, cli=False, help="Also prune the token embeddings (unstructured).")
    include_lm_head: bool = option(False, cli=False, help="Also prune (or quantize) the LM head.")
    eval_tokens: int = option(DEFAULT_EVAL_TOKENS, help="Measure perplexity on this many builtin:pydoc test "
                                                        "tokens (0 skips).")
    device: str = option("cpu", help="cpu, cuda or auto.")

    def normalize(self) -> None:
        """Method names lower-cased (as the recipe reads them); ``calib`` "none" → None."""
        for name in ("quant", "prune", "granularity"):
            value = getattr(self, name)
            if isinstance(value, str):
                self._set(name, canonical_quant(value) if name == "quant" else value.lower())
        if isinstance(self.calib, str) and self.calib.strip().lower() == "none":
            self._set("calib", None)

    def validate(self) -> None:
        """``eval_tokens`` 0 (skip) or at least 2 (what the recipe checks stays with the recipe)."""
        self._require(is_count(self.eval_tokens, 0), "eval_tokens",
                      "a non-negative integer (0 skips the evaluation)")
        self._require(self.eval_tokens != 1, "eval_tokens", "0 (skip) or at least 2")
        self._require(self.device is None or str(self.device).startswith(("cpu", "cuda", "auto")), "device",
                      "cpu, cuda or auto")

    def recipe_fields(self) -> dict:
        """The keyword arguments of ``workflows.variants.make_recipe`` these options set."""
        return {"quant": self.quant, "double_quant": self.double_quant, "prune": self.prune,
                "sparsity": self.sparsity, "granularity": self.granularity, "calib": self.calib,
                "calib_samples": self.calib_samples, "calib_seq_len": self.calib_seq_len,
                "include_embeddings": self.include_embeddings, "include_lm_head": self.include_lm_head,
                "bits": self.bits, "group_size": self.group_size, "act_order": self.act_order, "sym": self.sym,
                **self._moe_fields()}

    def _moe_fields(self) -> dict:
        """MoEfication's recipe fields, only when set (a recipe without them keeps its earlier keys)."""
        fields = {"moefy": self.moefy, "experts": self.experts, "active": self.active, "moe_router": self.moe_router}
        return {k: v for k, v in fields.items() if v not in (None, False)}


@dataclass(frozen=True)
class VariantAddOptions(Options):
    """``adapt variant add REPO --base B``: register a pre-quantized checkpoint of a base
    (``workflows.imports.add_variant``); what it is comes from the checkpoint itself."""

    family: ClassVar[str] = "variant add"

    revision: str | None = option(None, help="Branch, tag or commit of the Hub repo (or REPO@REV).")
    include: tuple[str, ...] | None = option(None, type="csv", help="Only the repo's files matching these "
                                                                    "comma-separated globs (default: all).")
    exclude: tuple[str, ...] | None = option(None, type="csv", help="Leave out the files matching these "
                                                                    "comma-separated globs.")
    eval_tokens: int = option(DEFAULT_EVAL_TOKENS, key=False, help="Measure perplexity on this many "
                                                                   "builtin:pydoc test tokens (0 skips).")
    device: str = option("cpu", key=False, help="cpu, cuda or auto (where the checkpoint is measured).")

    def validate(self) -> None:
        """``eval_tokens`` 0 (skip) or at least 2; a known device."""
        self._require(is_count(self.eval_tokens, 0) and self.eval_tokens != 1, "eval_tokens",
                      "0 (skip) or at least 2")
        self._require(str(self.device).startswith(("cpu", "cuda", "auto")), "device", "cpu, cuda or auto")


__all__ = ["VariantOptions", "QUANT_METHODS", "GGUF_VARIANT_TYPES", "GGUF_PREFIX", "canonical_quant", "PRUNE_METHODS", "GRANULARITIES", "CALIB_USERS", "GPTQ_BITS",
           "MOE_ROUTERS",
           "DefaultCalib", "VariantAddOptions",
           "DEFAULT_CALIB", "DEFAULT_CALIB_SAMPLES", "DEFAULT_CALIB_SEQ_LEN", "DEFAULT_EVAL_TOKENS"]
