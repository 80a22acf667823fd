"""Pre-quantized Hugging Face checkpoints: what they are, whether they copy a base, their Ŵ on CPU.

Recognised from ``config.json``'s ``quantization_config`` (or an old AutoGPTQ
``quantize_config.json``), by its ``quant_method``:
- ``compressed-tensors`` (what llm-compressor writes and vLLM serves): int-quantized /
  pack-quantized / naive-quantized weights (W4A16, W8A16, W8A8 …) and float-quantized
  ones. Ŵ through transformers, which decompresses them on CPU with the
  ``compressed-tensors`` library (``CompressedTensorsConfig(dequantize=True)``); the dense
  weights are then loaded into a plain model (no quantizer attached).
- ``gptq`` (AutoGPTQ v1 ``checkpoint_format`` "gptq", GPTQModel's "gptq_v2"): no GPTQ library
  installs beside our pins, so Ŵ comes from our own unpacking of ``qweight / qzeros /
  scales / g_idx`` (formats/gptq.py), loaded into a plain model.
- ``bitsandbytes`` (``…-bnb-4bit`` / 8-bit repos): transformers loads them on CPU as they
  are (bitsandbytes ≥ 0.48): Ŵ is bitsandbytes' dequantized weight, the layers stay bnb
  layers, as in the variants bitsandbytes quantizes at load.
- ``awq``: recognised, refused (its packing is not read here yet).
- ``gguf`` (llama.cpp's files): a folder holding one ``.gguf`` file and the base's
  ``config.json`` (a GGUF names no transformers config: the base's is the one it was checked
  against, formats/gguf_read.py). Ŵ is the file's tensors dequantized by the ``gguf`` package
  (every type it dequantizes), under the model's names, loaded into a plain model.
Any other method, or a config without one, is refused in one line naming what was found.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.formats import gptq as gptq_format
from adapterhub_c.formats.gguf_read import GgufInfo, inspect_gguf
from adapterhub_c.models.gguf_tensors import read_gguf_state
from adapterhub_c.models.weights import gguf_weights
from adapterhub_c.variants.build import read_state
from adapterhub_c.variants.quantize import device_map_for, disable_cpu_repack

METHODS = ("compressed-tensors", "gptq", "bitsandbytes", "gguf")  # what `load_checkpoint` reads
REFUSED = {"awq": "AWQ checkpoints are recognised but not read yet (their packing is not implemented here)"}
CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
# config fields that fix the shapes of a decoder's weights
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings")


@dataclass(frozen=True)
class Checkpoint:
    """What a pre-quantized checkpoint folder holds (``inspect_checkpoint``)."""

    method: str  # compressed-tensors | gptq | bitsandbytes
    scheme: dict[str, Any]  # the quantization's identity: format, bits, group size, symmetry, activations
    config: dict[str, Any] = field(repr=False)  # config.json

    @property
    def bits(self) -> int | None:
        """Bits per weight code."""
        return self.scheme.get("bits")

    def describe(self) -> str:
        """A short label, e.g. 'compressed-tensors pack-quantized w4a16 g32 sym'."""
        s = self.scheme
        words = [self.method]
        if self.method == "gguf":
            return " ".join(["gguf", *(f"{t}x{n}" for t, n in self.scheme["types"].items())])
        if self.method == "compressed-tensors":
            words += [s["format"], f"w{s['bits']}a{s.get('act_bits') or 16}"]
        elif self.method == "bitsandbytes":
            words.append(s["type"])
        else:
            words.append(f"{s['bits']}-bit")
        if s.get("group_size"):
            words.append(f"g{s['group_size']}")
        words += ["act-order"] * bool(s.get("act_order")) + ["sym"] * bool(s.get("sym"))
        return " ".join(words)


def read_config(folder: str | Path, label: str) -> dict[str, Any]:
    """config.json of a checkpoint folder (UsageError naming the checkpoint when absent or unreadable)."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{label} has no config.json: not a transformers checkpoint") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{label}: config.json is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{label}: config.json is not a JSON object")
    return data


def _quantization_config(folder: Path, config: dict, label: str) -> dict:
    qc = config.get("quantization_config")
    if qc is None and (folder / "quantize_config.json").is_file():  # AutoGPTQ before transformers held it
        qc = {"quant_method": "gptq", **json.loads((folder / "quantize_config.json").read_text())}
    if not isinstance(qc, dict):
        raise UsageError(f"{label} is not a pre-quantized checkpoint (config.json has no quantization_config); "
                         "full-precision weights are a base: adapt base add")
    return qc


def inspect_checkpoint(folder: str | Path, label: str | None = None) -> Checkpoint:
    """What the checkpoint in ``folder`` is; UsageError (one line, naming what was found) when it is
    not a pre-quantized checkpoint this version reads."""
    folder = Path(folder)
    label = label or str(folder)
    config = read_config(folder, label)
    gguf = gguf_weights(folder)
    if gguf is not None:
        return Checkpoint("gguf", gguf_scheme(inspect_gguf(gguf)), config)
    qc = _quantization_config(folder, config, label)
    method = str(qc.get("quant_method") or ("bitsandbytes" if qc.get("load_in_4bit") or qc.get("load_in_8bit")
                                            else "")).lower()
    if method in REFUSED:
        raise UsageError(f"{label}: {REFUSED[method]}")
    if method not in METHODS:
        known = ", ".join(METHODS)
        raise UsageError(f"{label}: unknown quantization method {method or None!r} in its quantization_config "
                         f"(this version reads {known})")
    scheme = {"compressed-tensors": _ct_scheme, "gptq": _gptq_scheme, "bitsandbytes": _bnb_scheme}[method](qc, label)
    return Checkpoint(method, scheme, config)


def gguf_scheme(info: GgufInfo) -> dict:
    """A GGUF file's identity fields: architecture, block count, {tensor type: count} (most used first),
    and the bits its quantized tensors spend per weight."""
    types = dict(sorted(info.types().items(), key=lambda kv: (-kv[1], kv[0])))
    return {"architecture": info.architecture, "block_count": info.block_count, "types": types,
            "bits": gguf_bits_per_weight(info)}


def gguf_bits_per_weight(info: GgufInfo) -> float | None:
    """Bits per weight of the file's quantized (not floating-point) tensors, block scales included."""
    import gguf as gguf_lib

    bits = numel = 0
    for shape, type_name in info.tensors.values():
        if type_name in ("F32", "F16", "BF16", "F64"):
            continue
        block, nbytes = gguf_lib.GGML_QUANT_SIZES[gguf_lib.GGMLQuantizationType[type_name]]
        n = 1
        for d in shape:
            n *= d
        bits += 8 * nbytes * n // block
        numel += n
    return round(bits / numel, 4) if numel else None


def _ct_scheme(qc: dict, label: str) -> dict:
    groups = qc.get("config_groups") or {}
    fmt = qc.get("format")
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    fmts = {g.get("format") or fmt for g in groups.values() if isinstance(g, dict)}
    if not weights or len(fmts) != 1 or None in fmts:
        raise UsageError(f"{label}: a compressed-tensors config without one weight format in its config_groups "
                         f"(found formats {sorted(map(str, fmts))})")
    fmt = fmts.pop()
    if fmt not in CT_FORMATS:
        raise UsageError(f"{label}: compressed-tensors format {fmt!r} is not read here (reads {', '.join(CT_FORMATS)})")
    w = weights[0]
    acts = [g.get("input_activations") for g in groups.values() if isinstance(g, dict) and g.get("input_activations")]
    return {"format": fmt, "bits": w.get("num_bits"), "type": w.get("type"), "strategy": w.get("strategy"),
            "group_size": w.get("group_size"), "sym": bool(w.get("symmetric")),
            "act_bits": acts[0].get("num_bits") if acts else None, "groups": len(weights),
            "ignore": sorted(qc.get("ignore") or [])}


def _gptq_scheme(qc: dict, label: str) -> dict:
    bits = qc.get("bits")
    if bits not in gptq_format.GPTQ_BITS:
        raise UsageError(f"{label}: a GPTQ checkpoint of {bits!r} bits (reads 2, 3, 4, 8)")
    version = str(qc.get("checkpoint_format") or "gptq").lower()
    if version not in ("gptq", "gptq_v2"):
        raise UsageError(f"{label}: GPTQ checkpoint_format {version!r} is not read here (reads gptq, gptq_v2)")
    group = qc.get("group_size")
    return {"bits": bits, "group_size": group if isinstance(group, int) and group > 0 else None,
            "act_order": bool(qc.get("desc_act")), "sym": bool(qc.get("sym", True)), "checkpoint_format": version}


def _bnb_scheme(qc: dict, label: str) -> dict:
    if qc.get("load_in_4bit"):
        return {"type": str(qc.get("bnb_4bit_quant_type") or "fp4"), "bits": 4,
                "double_quant": bool(qc.get("bnb_4bit_use_double_quant")),
                "skip": sorted(qc.get("llm_int8_skip_modules") or [])}
    if qc.get("load_in_8bit"):
        return {"type": "int8", "bits": 8, "skip": sorted(qc.get("llm_int8_skip_modules") or [])}
    raise UsageError(f"{label}: a bitsandbytes config that loads neither in 4 nor in 8 bits")


def _shape_fields(config: dict) -> dict:
    return {k: config[k] for k in SHAPE_KEYS if k in config}


def check_architecture(config: dict, base_config: dict, label: str, base_name: str) -> None:
    """UsageError (one line, naming what was found) unless ``config`` describes the base's architecture."""
    mine, theirs = _shape_fields(config), _shape_fields(base_config)
    if config.get("model_type") != base_config.get("model_type"):
        raise UsageError(f"{label} is a {config.get('model_type')!r} model, base {base_name!r} a "
                         f"{base_config.get('model_type')!r} one: not a quantized copy of it")
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diff:
        shown = ", ".join(f"{k} {mine.get(k)} (base {theirs.get(k)})" for k in diff[:3])
        raise UsageError(f"{label} has other shapes than base {base_name!r}: {shown}; not a quantized copy of it")


def _dense_config(folder: Path):
    """The checkpoint's transformers config without its quantization_config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def _plain_model(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str):
    """A plain transformers model of the checkpoint's architecture holding ``state`` (consumed)."""
    from transformers import AutoModelForCausalLM

    cfg = _dense_config(folder)
    try:
        model_cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    except KeyError:
        raise UsageError(f"{type(cfg).__name__} is not a causal language model configuration") from None
    model = model_cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype)
    return model.to(device).eval()


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    checkpoint: Checkpoint | None = None):
    """The checkpoint as a transformers model computing with its Ŵ (see the module docstring), eval mode.

    Unquantized tensors and dense Ŵ are in ``dtype``; bitsandbytes checkpoints keep their bnb
    layers (their own compute dtype), with bnb's CPU repacking off so the model can be trained.
    """
    folder = Path(folder)
    ckpt = checkpoint or inspect_checkpoint(folder)
    if ckpt.method == "gptq":
        s = ckpt.scheme
        state = gptq_format.dense_state(read_state(folder), s["bits"], s["group_size"],
                                        v1=s["checkpoint_format"] == "gptq")
        return _plain_model(folder, state, dtype, device)
    if ckpt.method == "compressed-tensors":
        return _plain_model(folder, _ct_dense_state(folder, dtype), dtype, device)
    if ckpt.method == "gguf":
        return _plain_model(folder, read_gguf_state(gguf_weights(folder), ckpt.config, dtype), dtype, device)
    return _load_bnb(folder, dtype, device)


def _ct_dense_state(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The decompressed state dict of a compressed-tensors checkpoint, through transformers + the library."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    try:
        with warnings.catch_warnings():  # "the model already has a quantization_config": we only add dequantize
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True))
    except ImportError as e:
        raise UsageError(f"reading compressed-tensors checkpoints needs the compressed-tensors library ({e})") from None
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    del model
    return state


def _load_bnb(folder: Path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=device_map_for(device))
    disable_cpu_repack(model)  # trainable after an eval forward, as the variants bnb quantizes at load
    return model.eval()
