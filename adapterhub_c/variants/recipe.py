"""A variant's recipe: which quantization and which pruning turn a base into a variant.

The recipe is the identity of a variant: two variants of one base built from the same
recipe are the same variant. `canonical_json()` is therefore stable (sorted keys,
defaults filled, sparsity rounded to 6 decimals) and `digest()` hashes it.

Defaults and choices:
- `prune_granularity` (magnitude and wanda only) defaults to "row": every output row
  of a weight keeps exactly round((1 - sparsity) * in_features) weights. "row" is what
  the Wanda paper found best for LLMs (per-output comparison groups) and keeps every
  output unit alive; "layer" ranks all weights of a matrix together (classic magnitude
  pruning), keeping exactly round((1 - sparsity) * numel) weights per matrix.
- sparsity: required for magnitude / wanda / ffn-channels, implied (0.5) for 2:4,
  0 for no pruning.
- `calib` names a data set that the caller tokenizes into `calib_samples` sequences of
  `calib_seq_len` tokens; wanda requires it; 2:4 and ffn-channels use it for
  activation-aware scores when given; it is refused where nothing would use it.
- `include_embeddings` / `include_lm_head` (default False) extend unstructured pruning
  (magnitude, wanda, 2:4) to the token embeddings / LM head; `include_lm_head` also
  quantizes the LM head when the recipe quantizes with bitsandbytes.
- GPTQ (`quant="gptq"`, issue 25): `bits` (2, 3, 4 or 8; default 4), `group_size` (None:
  one grid per output row, the reference's default; else it must divide every layer's
  inputs), `act_order`, `sym` (default asymmetric, as the reference). Calibrated: it needs
  `calib`. It combines with pruning only as SparseGPT's joint prune + quantize. These four
  fields appear in the canonical JSON only when `quant` is gptq, so the recipes (and
  digests) of every earlier variant are unchanged.
- SparseGPT (`prune="sparsegpt"` with a sparsity in (0, 1), or `"sparsegpt:2:4"`):
  calibrated; combines with gptq (jointly) or with bitsandbytes quantization at load.
- GGUF (`quant="gguf:TYPE"`, issue 26): the variant is stored as a llama.cpp GGUF file of that
  type (Q4_0 … Q8_0 quantized by the gguf package, k-quants by llama.cpp's quantizer), made
  from the (pruned, when the recipe prunes) weights; its Ŵ is the file's dequantized tensors.
  Combines with any pruning (prune, then quantize), not with MoEfication.
- MoEfication (`moefy=True`, issue 25; variants/moefy.py): `experts` E >= 2 per MLP and
  `active` K in [1, E] computed per token (both required), `moe_router` "mlp" (default) or
  "similarity". Calibrated (it needs `calib`); combines with any quantization or pruning
  (done after them: "Q+M"). These four fields appear in the canonical JSON only when
  `moefy` is set, so earlier digests are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from adapterhub_c.errors import UsageError
from adapterhub_c.options.variant import (
    GGUF_PREFIX,
    GPTQ_BITS,
    GRANULARITIES,
    MOE_ROUTERS,
    PRUNE_METHODS,
    QUANT_METHODS,
    canonical_quant,
)

BNB_METHODS = ("int8", "nf4", "fp4")  # quantized by bitsandbytes at load time
SPARSEGPT = ("sparsegpt", "sparsegpt:2:4")  # prune with the OBS update: kept values change
GPTQ_FIELDS = ("bits", "group_size", "act_order", "sym")
MOE_FIELDS = ("experts", "active", "moe_router")
UNSTRUCTURED = ("magnitude", "wanda", "2:4")
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """How a variant is made from its base; validated and normalised on construction."""

    quant: str = "none"
    double_quant: bool = False
    prune: str = "none"
    sparsity: float | None = None
    prune_granularity: str | None = None
    calib: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 128
    include_embeddings: bool = False
    include_lm_head: bool = False
    bits: int | None = None
    group_size: int | None = None
    act_order: bool = False
    sym: bool = False
    moefy: bool = False
    experts: int | None = None
    active: int | None = None
    moe_router: str | None = None

    def __post_init__(self) -> None:
        quant = canonical_quant(self.quant)
        prune = str(self.prune).lower()
        if quant not in QUANT_METHODS:
            raise UsageError(f"unknown quantization {self.quant!r} (choose from {', '.join(QUANT_METHODS)})")
        if prune not in PRUNE_METHODS:
            raise UsageError(f"unknown pruning method {self.prune!r} (choose from {', '.join(PRUNE_METHODS)})")
        _set(self, "quant", quant)
        _set(self, "prune", prune)
        _set(self, "sparsity", _normalise_sparsity(prune, self.sparsity))
        _set(self, "prune_granularity", _normalise_granularity(prune, self.prune_granularity))
        for flag in ("double_quant", "include_embeddings", "include_lm_head", "act_order", "sym", "moefy"):
            if not isinstance(getattr(self, flag), bool):
                raise UsageError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.double_quant and quant not in ("nf4", "fp4"):
            raise UsageError(f"double_quant applies only to nf4 and fp4, not to quant {quant!r}")
        self._check_gptq()
        self._check_moe()
        if self.gguf_type is not None and (self.moefy or self.include_lm_head or self.include_embeddings):
            raise UsageError(f"{quant} stores the variant as a llama.cpp GGUF file, which holds no MoE routing "
                             "and quantizes its embeddings and LM head itself (no moefy, include_lm_head or "
                             "include_embeddings)")
        self._check_calibration()
        if self.include_embeddings and prune not in UNSTRUCTURED:
            raise UsageError("include_embeddings applies only to magnitude, wanda and 2:4 pruning")
        if self.include_lm_head and (self.uses_obs or (prune not in UNSTRUCTURED and quant == "none")):
            raise UsageError("include_lm_head applies only to magnitude, wanda, 2:4 pruning or to bitsandbytes "
                             "quantization")

    def _check_gptq(self) -> None:
        """Fill and check the GPTQ fields (bits, group_size, act_order, sym)."""
        if self.quant != "gptq":
            given = [f for f in GPTQ_FIELDS if getattr(self, f) not in (None, False)]
            if given:
                raise UsageError(f"{given[0]} applies only to gptq quantization, not to quant {self.quant!r}")
            return
        bits = 4 if self.bits is None else self.bits
        if isinstance(bits, bool) or bits not in GPTQ_BITS:
            raise UsageError(f"gptq bits must be one of {', '.join(map(str, GPTQ_BITS))}, got {self.bits!r}")
        _set(self, "bits", int(bits))
        group = self.group_size
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise UsageError(f"group_size must be a positive integer (or none: one group per row), got {group!r}")
        if self.prune not in ("none",) + SPARSEGPT:
            raise UsageError(f"gptq combines only with sparsegpt pruning (done jointly), not with {self.prune!r}")
        if self.act_order and self.prune != "none":
            raise UsageError("act_order cannot be combined with sparsegpt pruning")

    def _check_moe(self) -> None:
        """Fill and check the MoEfication fields (experts, active, moe_router)."""
        if not self.moefy:
            given = [f for f in MOE_FIELDS if getattr(self, f) is not None]
            if given:
                raise UsageError(f"{given[0]} applies only to MoEfication (moefy)")
            return
        for name in ("experts", "active"):
            value = getattr(self, name)
            if value is None:
                raise UsageError(f"moefy needs {name} (experts per MLP and experts computed per token, e.g. 8 and 2)")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.experts < 2 or self.experts > 32767:
            raise UsageError(f"experts must be between 2 and 32767, got {self.experts}")
        if self.active > self.experts:
            raise UsageError(f"active must be at most experts ({self.experts}), got {self.active}")
        router = "mlp" if self.moe_router is None else str(self.moe_router).lower()
        if router not in MOE_ROUTERS:
            raise UsageError(f"unknown moe_router {self.moe_router!r} (choose from {', '.join(MOE_ROUTERS)})")
        _set(self, "moe_router", router)

    def _check_calibration(self) -> None:
        calib = self.calib
        if calib is not None and (not isinstance(calib, str) or not calib.strip()):
            raise UsageError(f"calib must be a data set name, got {calib!r}")
        if calib is not None:
            _set(self, "calib", calib.strip())
        for name in ("calib_samples", "calib_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.calib is None and (self.prune in ("wanda",) + SPARSEGPT or self.quant == "gptq"):
            method = self.prune if self.prune != "none" and self.quant != "gptq" else "gptq"
            raise UsageError(f"{method} needs calibration data (give calib, e.g. builtin:pydoc)")
        if self.calib is None and self.moefy:
            raise UsageError("MoEfication (moefy) needs calibration data to train its routers (give calib, e.g. "
                             "builtin:pydoc)")
        if self.calib is not None and self.prune in ("none", "magnitude") and self.quant != "gptq" and not self.moefy:
            raise UsageError(f"calib is unused with prune {self.prune!r}; it serves wanda, sparsegpt, gptq, 2:4, "
                             "ffn-channels and moefy")

    @property
    def uses_calibration(self) -> bool:
        """True when building this variant needs calibration input_ids."""
        return self.calib is not None

    @property
    def is_quantized(self) -> bool:
        """True when the variant's linear layers are loaded as bitsandbytes layers."""
        return self.bnb_quant != "none"

    @property
    def bnb_quant(self) -> str:
        """The bitsandbytes format applied at load ('none' for gptq, whose Ŵ is stored)."""
        return self.quant if self.quant in BNB_METHODS else "none"

    @property
    def gguf_type(self) -> str | None:
        """The GGUF type the variant is stored in (``quant`` "gguf:TYPE"), or None."""
        return self.quant[len(GGUF_PREFIX):] if self.quant.startswith(GGUF_PREFIX) else None

    @property
    def uses_obs(self) -> bool:
        """True for GPTQ and / or SparseGPT: Hessian-based, sequential over the blocks, values change."""
        return self.quant == "gptq" or self.prune in SPARSEGPT

    @property
    def stores_weights(self) -> bool:
        """True when the variant stores something of its own over the base (masks, channels, codes, values)."""
        return self.prune != "none" or self.quant == "gptq" or self.moefy or self.gguf_type is not None

    def to_dict(self) -> dict[str, Any]:
        """All fields, defaults filled, plus the recipe format version (GPTQ's fields only for gptq)."""
        data = asdict(self)
        if self.quant != "gptq":
            for name in GPTQ_FIELDS:
                del data[name]
        if not self.moefy:
            for name in ("moefy",) + MOE_FIELDS:
                del data[name]
        data["version"] = RECIPE_VERSION
        return data

    def canonical_json(self) -> str:
        """The same recipe always gives the same string: sorted keys, no spaces."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """sha256 hex digest of `canonical_json()`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def describe(self) -> str:
        """A short human label, e.g. 'nf4+dq, wanda 50% (row)'."""
        parts = []
        if self.quant == "gptq":
            parts.append(self._gptq_label())
        elif self.quant != "none":
            parts.append(self.quant + ("+dq" if self.double_quant else ""))
        if self.prune != "none":
            label = f"{self.prune} {self.sparsity:.0%}"
            if self.prune.endswith("2:4"):
                label = self.prune.replace(":", " ", 1) if self.prune != "2:4" else "2:4"
            elif self.prune == "sparsegpt":
                label = f"sparsegpt {self.sparsity:.1%}".replace(".0%", "%")
            if self.prune_granularity:
                label += f" ({self.prune_granularity})"
            parts.append(label)
        if self.moefy:
            parts.append(f"moe {self.active}/{self.experts} experts" + (" (similarity)" * (self.moe_router != "mlp")))
        return ", ".join(parts) or "uncompressed"

    def _gptq_label(self) -> str:
        """'gptq 4-bit', 'gptq 3-bit g128 act-order sym'."""
        words = [f"gptq {self.bits}-bit"]
        if self.group_size:
            words.append(f"g{self.group_size}")
        words += ["act-order"] * self.act_order + ["sym"] * self.sym
        return " ".join(words)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Build from a dict such as `to_dict()` gives; unknown keys are refused."""
        if not isinstance(data, dict):
            raise UsageError(f"a recipe must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise UsageError(f"unsupported recipe version {version!r} (this build reads {RECIPE_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown recipe field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes | dict) -> "Recipe":
        """Parse a recipe from JSON text (or an already-parsed dict)."""
        if isinstance(text, dict):
            return cls.from_dict(text)
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"recipe is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _set(obj: Recipe, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalise in __post_init__


def _normalise_sparsity(prune: str, sparsity: Any) -> float:
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise UsageError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        sparsity = float(sparsity)
        if math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {sparsity!r}")
        sparsity = round(sparsity, 6) + 0.0  # +0.0 turns -0.0 into 0.0
    if prune == "none":
        if sparsity:
            raise UsageError(f"sparsity {sparsity} given without a pruning method")
        return 0.0
    if prune in ("2:4", "sparsegpt:2:4"):
        if sparsity is not None and sparsity != 0.5:
            raise UsageError(f"2:4 pruning has sparsity 0.5 by definition, got {sparsity}")
        return 0.5
    if sparsity is None:
        raise UsageError(f"prune {prune!r} needs a sparsity in [0, 1)")
    if prune == "sparsegpt" and sparsity == 0:
        raise UsageError("sparsegpt needs a sparsity in (0, 1), got 0")
    return sparsity


def _normalise_granularity(prune: str, granularity: Any) -> str | None:
    if prune not in ("magnitude", "wanda"):
        if granularity is not None:
            raise UsageError(f"prune_granularity applies only to magnitude and wanda, not to {prune!r}")
        return None
    granularity = "row" if granularity is None else str(granularity).lower()
    if granularity not in GRANULARITIES:
        raise UsageError(f"unknown prune_granularity {granularity!r} (choose from row, layer)")
    return granularity
