"""LoRA adapters as plain tensors, read from and written to PEFT folders.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys look like ``base_model.model.<module>.lora_A.weight``. We keep every tensor of the
file verbatim (biases, ``modules_to_save`` weights) and expose per-module views with
the effective scale, so that packing, merging and conversion agree on one ΔW:

    ΔW(module) = scale(module) · B @ A,  scale = alpha / r   (alpha / sqrt(r) with rsLoRA)

where ``r`` and ``alpha`` honour ``rank_pattern`` / ``alpha_pattern`` as PEFT does.

DoRA (``use_dora``): each module also has a magnitude vector m
(``…lora_magnitude_vector``, one entry per output unit). Its update is defined in weight
space, as PEFT computes it, with W the base weight as ``[out, in]`` (a Conv1D's
``[in, out]`` weight transposed):

    ΔW = m / ‖W + s·B·A‖_c · (W + s·B·A) − W,   ‖·‖_c the L2 norm of each output row

(the paper's column norm: its W is ``[in, out]``). It needs W, so :meth:`LoraLayer.delta`
refuses DoRA layers and :meth:`LoraLayer.dora_delta` takes the base weight.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_EMBEDDING_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_A$")
MAGNITUDE = "lora_magnitude_vector"
_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", MAGNITUDE)
_ANY_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(_PARTS) + r")(?P<rest>(\.[^.]+)*)$")
ADAPTER_NAME = "default"
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha's default: a config without the key means 8, not r
MAX_PATTERN_CHARS = 1000
MAX_CONFIG_BYTES = 1 << 20


def read_config(path: Path) -> dict:
    """``adapter_config.json`` parsed: UsageError if it is too large, not JSON, or not an object."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not an adapter config")
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSON, huge ints
        raise UsageError(f"{path}: invalid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return config


def canonical_key(key: str) -> str:
    """A tensor key as PEFT saves it: ``base_model.model.`` in front, no adapter name.

    Hub files also come with ``….lora_A.default.weight`` (an adapter name inside), without
    the ``base_model.model.`` prefix, or with ``modules_to_save.default`` inside a
    ``modules_to_save`` copy; all of them name the same tensor.
    """
    m = _ANY_KEY_RE.match(key)
    if m is None:  # a full tensor (modules_to_save copy): drop PEFT's wrapper names
        key = key.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
    else:
        rest = [p for p in m["rest"].split(".") if p]
        suffix = [p for p in rest if p in ("weight", "bias")]
        if m["part"] in ("lora_A", "lora_B"):
            tail = "." + (suffix[-1] if suffix else "weight")
        else:
            tail = ""  # lora_embedding_A/B and the magnitude vector are saved bare
        key = f"{m['module']}.{m['part']}{tail}"
    return key if key.startswith(PREFIX) else PREFIX + key


def canonical_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors under :func:`canonical_key` names, how many keys changed); UsageError on a collision."""
    out: dict[str, torch.Tensor] = {}
    changed = 0
    for key, value in tensors.items():
        new = canonical_key(key)
        changed += new != key
        if new in out:
            raise UsageError(f"tensors {key!r} and another both stand for {new!r}")
        out[new] = value
    return out, changed


def pattern_value(patterns: dict, module: str, default):
    """Resolve a PEFT rank/alpha pattern for ``module`` (PEFT's get_pattern_key rule)."""
    for pattern, value in (patterns or {}).items():
        if module == pattern or re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def rank_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """alpha / r (alpha / √r with rsLoRA): the one place a low-rank scale is computed.

    LoRA's scale (:func:`lora_scale`) and a recovery module's
    (``adapters.recovery.RecoveryConfig.scale``) both come from here.
    """
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_scale(config: dict, module: str) -> float:
    """The factor PEFT multiplies B @ A by for ``module`` (rank/alpha patterns, rsLoRA)."""
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return rank_scale(alpha, r, bool(config.get("use_rslora")))


@dataclass
class LoraLayer:
    """One adapted linear layer: A is [r, in], B is [out, r] (DoRA: magnitude is [out])."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale · B @ A, shape [out, in] (for DoRA only the direction's update, not ΔW)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update scale · B @ A, shape [out, in]; DoRA layers need :meth:`dora_delta`."""
        if self.is_dora:
            raise UsageError("a DoRA layer's update depends on the base weight: use dora_delta(weight)")
        return self.lora_delta(dtype)

    def dora_delta(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW in weight space for base weight ``weight`` ([out, in]): DoRA's formula, or s·B·A."""
        if not self.is_dora:
            return self.lora_delta(dtype)
        return dora_delta(weight, self.A, self.B, self.scale, self.magnitude, dtype)


def dora_delta(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """m / ‖W + s·B·A‖_row · (W + s·B·A) − W for an [out, in] base weight W (PEFT's DoRA merge)."""
    w = weight.to(dtype)
    merged = w + scale * (B.to(dtype) @ A.to(dtype))
    norm = torch.linalg.norm(merged, dim=1)
    return (magnitude.to(dtype) / norm)[:, None] * merged - w


def read_folder_config(path: Path) -> dict:
    """The checked ``adapter_config.json`` of PEFT folder ``path`` (UsageError: missing, or not a LoRA)."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise UsageError(f"{path}: no {CONFIG_NAME}; not a PEFT adapter folder")
    config = read_config(cfg_path)
    check_lora_config(config, str(path))
    return config


@dataclass
class LoraAdapter:
    """A LoRA adapter: its PEFT config and every tensor of its safetensors file."""

    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---- reading and writing -------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path) -> "LoraAdapter":
        """Read a PEFT LoRA (or DoRA) folder; refuses other PEFT types."""
        path = Path(path)
        config = read_folder_config(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise UsageError(f"{path}: no {WEIGHTS_NAME}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise IntegrityError(f"{weights}: corrupt safetensors file ({e})") from None
        return cls(config=config, tensors=canonical_tensors(tensors)[0])

    def to_folder(self, path: str | Path, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write a PEFT folder atomically (plain ``PeftModel.from_pretrained`` loads it)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt"})
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
        return path

    # ---- per-layer view -------------------------------------------------------
    def modules(self) -> list[str]:
        """Names of the adapted modules (without the ``base_model.model.`` prefix)."""
        names = []
        for key in self.tensors:
            m = _FACTOR_RE.match(key)
            if m and m["factor"] == "lora_A":
                names.append(_strip(m["module"]))
        return sorted(names)

    def embedding_modules(self) -> list[str]:
        """Names of the embeddings with an embedding LoRA (``lora_embedding_A`` [r, vocab],
        ``lora_embedding_B`` [hidden, r]; ΔW of the [vocab, hidden] table = scale · (B @ A)ᵀ)."""
        return sorted(_strip(m["module"]) for k in self.tensors if (m := _EMBEDDING_RE.match(k)))

    def embedding_layers(self) -> dict[str, LoraLayer]:
        """Per embedding (A [r, vocab], B [hidden, r], scale): ``delta()`` is ΔWᵀ, [hidden, vocab]."""
        return {m: LoraLayer(A=self.tensors[f"{PREFIX}{m}.lora_embedding_A"],
                             B=self.tensors[f"{PREFIX}{m}.lora_embedding_B"], scale=lora_scale(self.config, m))
                for m in self.embedding_modules()}

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that are not LoRA parts: ``modules_to_save`` copies (lm_head, embed_tokens, …)."""
        return {k: v for k, v in self.tensors.items() if _ANY_KEY_RE.match(k) is None}

    def layers(self) -> dict[str, LoraLayer]:
        """Per-module (A, B, scale, bias) views of the adapter."""
        out = {}
        for module in self.modules():
            key = PREFIX + module
            out[module] = LoraLayer(
                A=self.tensors[f"{key}.lora_A.weight"],
                B=self.tensors[f"{key}.lora_B.weight"],
                scale=lora_scale(self.config, module),
                bias=self.tensors.get(f"{key}.lora_B.bias"),
                magnitude=self.tensors.get(f"{key}.{MAGNITUDE}"),
            )
        return out

    @classmethod
    def from_layers(cls, layers: dict[str, LoraLayer], base_config: dict) -> "LoraAdapter":
        """Build an adapter from per-module layers.

        The effective scale of each layer is kept exactly: the config gets ``r`` and
        ``lora_alpha`` per module through ``rank_pattern`` / ``alpha_pattern`` when the
        layers differ, and rsLoRA is switched off (alpha is chosen so alpha/r = scale).
        ``target_modules`` lists the full module names (exactly these modules, on any
        architecture).
        """
        config = {k: v for k, v in base_config.items()
                  if k not in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora")}
        config.update(peft_type="LORA", use_rslora=False, use_dora=False)
        ranks = {m: layer.rank for m, layer in layers.items()}
        alphas = {m: layer.scale * layer.rank for m, layer in layers.items()}
        r0 = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
        a0 = alphas[next(m for m in layers if ranks[m] == r0)] if layers else 8
        config["r"], config["lora_alpha"] = r0, a0
        # patterns are anchored at the full module name so they match exactly one module
        config["rank_pattern"] = {f"^{re.escape(m)}": r for m, r in ranks.items() if r != r0}
        config["alpha_pattern"] = {f"^{re.escape(m)}": a for m, a in alphas.items() if a != a0}
        # full module names: a leaf such as GPT-2's "c_proj" names attention and MLP linears alike,
        # and which modules of the model share a leaf is not known here
        config["target_modules"] = sorted(layers)
        tensors = {}
        for module, layer in layers.items():
            tensors[f"{PREFIX}{module}.lora_A.weight"] = layer.A.contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = layer.B.contiguous()
            if layer.bias is not None:
                tensors[f"{PREFIX}{module}.lora_B.bias"] = layer.bias.contiguous()
        return cls(config=config, tensors=tensors)

    @property
    def is_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _strip(module: str) -> str:
    return module[len(PREFIX):] if module.startswith(PREFIX) else module


def check_lora_config(config: dict, where: str) -> None:
    """Refuse configs we cannot carry faithfully: non-LoRA PEFT types and fields of the wrong type.

    Checked as PEFT's ``LoraConfig`` would use them: ``r`` a positive integer, ``lora_alpha`` a
    positive finite number, ``rank_pattern`` / ``alpha_pattern`` objects of valid regexes to
    positive values, ``target_modules`` a regex string or a list of names, the boolean
    switches booleans. UsageError naming the field.
    """
    if not isinstance(config, dict):
        raise UsageError(f"{where}: adapter_config.json is not a JSON object")
    peft_type = config.get("peft_type")
    peft_type = peft_type.upper() if isinstance(peft_type, str) else ""
    if peft_type != "LORA":
        shown = _short(config.get("peft_type")) if peft_type or "peft_type" in config else "missing"
        raise UsageError(f"{where}: PEFT type {shown} is not supported (only LoRA)")
    if "r" not in config:
        raise UsageError(f"{where}: adapter_config.json has no rank 'r'")
    bad = _config_fault(config)
    if bad is not None:
        raise UsageError(f"{where}: not a valid LoRA: adapter_config.json: {bad}")


# What follows the first ".lora_" of a key that is its own canonical key, and the part
# lora_modules_fault files it under (a bias of lora_A / lora_B is a part of its own)
_CANONICAL_ENDS = {"A.weight": "lora_A", "A.bias": "lora_A.bias", "B.weight": "lora_B", "B.bias": "lora_B.bias",
                   "embedding_A": "lora_embedding_A", "embedding_B": "lora_embedding_B",
                   MAGNITUDE.removeprefix("lora_"): MAGNITUDE}


def lora_key_part(key: str) -> tuple[str, str] | None:
    """(module without ``base_model.model.``, part) of a LoRA key that is its own
    :func:`canonical_key`, else None. Parts: ``lora_A``, ``lora_B``, ``lora_A.bias``,
    ``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B`` and the DoRA magnitude.

    The keys PEFT writes (the prefix, one ``.lora_`` and a canonical ending) are split with
    string operations; any other key takes the general route (:data:`_ANY_KEY_RE`, whose lazy
    module match costs about a microsecond a key). Both give the same answer."""
    head, found, end = key.partition(".lora_")
    if not found:  # the key regex needs ".lora_": a full tensor
        return None
    part = _CANONICAL_ENDS.get(end)  # no ending holds ".lora_": this one is the only one
    if part is not None and len(head) >= len(PREFIX) and key.startswith(PREFIX) and "\n" not in key:
        return head[len(PREFIX):], part  # the regex can only match here, and the key is canonical
    m = _ANY_KEY_RE.match(key)
    if m is None or key != canonical_key(key):
        return None
    return _strip(m["module"]), m["part"] + (".bias" if key.endswith(".bias") else "")


def lora_key_parts(keys: list[str]) -> list[tuple[str, str] | None]:
    """:func:`lora_key_part` of every key; the conditions every key must meet for the string
    split are checked once on the keys joined when they all start with the prefix."""
    joined = "\n".join(keys)
    if joined.count("\n") != len(keys) - 1 or joined.count("\n" + PREFIX) != len(keys) - 1 \
            or not joined.startswith(PREFIX):  # a key holds a newline or lacks the prefix
        return [lora_key_part(k) for k in keys]
    n, out = len(PREFIX), []
    for key in keys:
        head, _, end = key.partition(".lora_")
        part = _CANONICAL_ENDS.get(end)
        out.append((head[n:], part) if part is not None and len(head) >= n else lora_key_part(key))
    return out


def lora_modules_fault(config: dict, parts: list[tuple[str, str] | None], shapes: list[tuple[int, ...]]) -> str | None:
    """What in the tensor shapes a valid LoRA ``config`` does not describe, or None; keys as PEFT saves them,
    split by :func:`lora_key_parts` (``parts``), with their ``shapes`` in the same order.

    Every ``lora_A`` has its ``lora_B`` (an embedding's A its B) and the reverse; A is
    ``[r, in, *kernel]`` and B ``[out, r, 1, …]`` (embeddings: ``[r, vocab]``, ``[hidden, r]``)
    with one ``r``, the config's (``rank_pattern`` honoured); a ``lora_B.bias`` is ``[out]``;
    a DoRA magnitude (``use_dora`` only) has one entry per output; every adapted module is
    one that ``target_modules`` names, as PEFT matches them. The base model's own shapes are
    checked where the adapter meets it (``adapters.attach.copy_lora``, ``serve.loading``).
    """
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for part, shape in zip(parts, shapes, strict=True):
        if part is not None:
            modules.setdefault(part[0], {})[part[1]] = tuple(shape)
    in_targets = _target_test(config.get("target_modules"))
    patterns, r = config.get("rank_pattern"), config["r"]
    by_parts: dict[tuple, tuple[str | None, int, str | None]] = {}  # modules of the same shapes share these
    for module in sorted(modules):
        key = tuple(modules[module].items())
        if key not in by_parts:
            by_parts[key] = _shape_faults(config, modules[module])
        before, rank, after = by_parts[key]
        fault = before
        if fault is None:
            want = pattern_value(patterns, module, r) if patterns else r
            fault = f"rank {rank} of its factors, but the config says r = {_short(want)}" if rank != want else after
        if fault is None and not in_targets(module):
            fault = f"is not one of the config's target_modules {_short(config.get('target_modules'))}"
        if fault is not None:
            return f"{module}: {fault}"
    return None


def _shape_faults(config: dict, parts: dict[str, tuple[int, ...]]) -> tuple[str | None, int, str | None]:
    """What :func:`lora_modules_fault` finds in one module's parts before its rank is compared
    with the config's, the rank of its factors, and what it finds after (the extras); the
    module's name plays no part here."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if set(parts) - {a_key, b_key, "lora_B.bias", MAGNITUDE}:
        return f"mixes LoRA parts {sorted(parts)}", 0, None
    if a_key not in parts or b_key not in parts:
        return f"has {a_key if a_key in parts else b_key} without {b_key if a_key in parts else a_key}", 0, None
    A, B = parts[a_key], parts[b_key]
    fault = _factor_fault(A, B, embedding)
    if fault is not None:
        return fault, 0, None
    return None, A[0], _extras_fault(config, parts, B[0])


def _factor_fault(A: tuple[int, ...], B: tuple[int, ...], embedding: bool) -> str | None:
    """A ``[r, in, *kernel]`` and B ``[out, r, 1, …]`` of one rank r >= 1 (embeddings: matrices)."""
    if len(A) < 2 or len(B) != len(A) or (embedding and len(A) != 2) or len(A) > 5:
        return f"A {list(A)} and B {list(B)} are not a pair of LoRA matrices (or convolution kernels)"
    if A[0] < 1 or A[0] != B[1] or any(d != 1 for d in B[2:]):
        return f"A {list(A)} has rank {A[0]}, B {list(B)} rank {B[1]}: they do not multiply"
    return None


def _extras_fault(config: dict, parts: dict[str, tuple[int, ...]], out: int) -> str | None:
    """The bias is ``[out]``; the DoRA magnitude has ``out`` entries and only with ``use_dora``."""
    if "lora_B.bias" in parts and parts["lora_B.bias"] != (out,):
        return f"lora_B.bias {list(parts['lora_B.bias'])} does not match the {out} outputs of lora_B"
    if MAGNITUDE in parts:
        if not config.get("use_dora"):
            return "has a DoRA magnitude vector but the config does not say use_dora"
        if math.prod(parts[MAGNITUDE]) != out:
            return f"magnitude vector {list(parts[MAGNITUDE])} does not match the {out} outputs of lora_B"
    return None


def _target_test(target):
    """Whether a module is one that ``target_modules`` names (PEFT: a list by name or dotted
    suffix, a string by full regex match, ``all-linear`` or none anything)."""
    if target is None or target == "all-linear":
        return lambda module: True
    if isinstance(target, str):
        pattern = re.compile(target)
        return lambda module: pattern.fullmatch(module) is not None
    names, suffixes = frozenset(target), tuple("." + t for t in target)
    return lambda module: module in names or module.endswith(suffixes)


def _config_fault(config: dict) -> str | None:
    """What is wrong with a LoRA config's typed fields, or None."""
    if not _positive_int(config["r"]):
        return f"r must be a positive integer, not {_short(config['r'])}"
    if "lora_alpha" in config and not _positive_number(config["lora_alpha"]):
        return f"lora_alpha must be a positive number, not {_short(config['lora_alpha'])}"
    for check in (_patterns_fault, _target_fault, _switches_fault):
        fault = check(config)
        if fault is not None:
            return fault
    return None


def _patterns_fault(config: dict) -> str | None:
    """``rank_pattern`` / ``alpha_pattern``: objects of valid regexes to positive values."""
    for key, check, what in (("rank_pattern", _positive_int, "positive integers"),
                             ("alpha_pattern", _positive_number, "positive numbers")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            return f"{key} must be an object of module patterns, not {_short(patterns)}"
        for pattern, value in patterns.items():
            fault = _regex_fault(pattern)
            if fault:
                return f"{key} key {_short(pattern)}: {fault}"
            if not check(value):
                return f"{key} values must be {what}; {_short(pattern)} has {_short(value)}"
    return None


def _target_fault(config: dict) -> str | None:
    """``target_modules``: a regex string ("all-linear" included) or a list of names."""
    target = config.get("target_modules")
    if isinstance(target, str):
        fault = None if target == "all-linear" else _regex_fault(target)
        return f"target_modules {_short(target)}: {fault}" if fault else None
    if isinstance(target, list):
        if not all(isinstance(t, str) and t for t in target):
            return f"target_modules must list module names (non-empty strings), not {_short(target)}"
        return None
    if target is not None:
        return f"target_modules must be a regex string or a list of names, not {_short(target)}"
    return None


def _switches_fault(config: dict) -> str | None:
    """The boolean switches, and ``modules_to_save`` a list of names."""
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            return f"{key} must be true or false, not {_short(config[key])}"
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        return f"modules_to_save must list module names, not {_short(saved)}"
    return None


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _regex_fault(pattern) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return "not a non-empty string"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"not a valid regex ({e})"
    return None


def _short(value, limit: int = 60) -> str:
    """repr of a config value, cut to ``limit`` characters (hostile configs hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
