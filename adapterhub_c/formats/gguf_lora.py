"""PEFT LoRA folders written as GGUF LoRA adapters, as llama.cpp's ``convert_lora_to_gguf.py`` writes them.

The file: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32)
and, per adapted linear, ``<llama.cpp name>.weight.lora_a`` (A, ``[r, in]``) and ``.lora_b`` (B,
``[out, r]``), e.g. ``blk.0.attn_q.weight.lora_a``. llama.cpp computes
``y += user_scale · alpha / r · B·A·x`` with one alpha for the file and each tensor's own r.

What has no field there is folded into B: a module whose PEFT scale (rsLoRA's alpha/√r,
``rank_pattern`` / ``alpha_pattern``; see :func:`adapterhub_c.adapters.lora.lora_scale`) is not
``rank_scale(alpha, r)`` gets ``B · scale / rank_scale(alpha, r)``, so llama.cpp's product is
PEFT's; the report lists those modules. For Llama, B's rows are reordered as the q/k weights
are (:func:`adapterhub_c.models.gguf_names.permute_for_gguf`).

What cannot be expressed is refused in one line saying why and what to do instead: DoRA
(magnitude vectors), recovery modules, soft prompts, embedding / ``lm_head`` LoRAs, full
``modules_to_save`` copies, LoRA biases, and a target module llama.cpp has no name for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from adapterhub_c.adapters.lora import PEFT_DEFAULT_ALPHA, LoraAdapter, LoraLayer, rank_scale, read_folder_config
from adapterhub_c.adapters.recovery import FILE_NAME as RECOVERY_FILE
from adapterhub_c.errors import UsageError
from adapterhub_c.formats.gguf_write import _as_dict, _temp_beside
from adapterhub_c.models.gguf_names import config_value, gguf_arch, hf_to_gguf, permute_for_gguf

PROMPT_FILE = "prompt.safetensors"  # a soft prompt's file (training.prompt writes it)
LORA_TYPES = {"f32": (np.float32, gguf.GGMLQuantizationType.F32), "f16": (np.float16, gguf.GGMLQuantizationType.F16)}


@dataclass
class GgufLoraReport:
    """What :func:`write_gguf_lora` wrote."""

    path: Path
    architecture: str
    alpha: float
    modules: list[str] = field(default_factory=list)  # HF module names, in file order
    ranks: dict[str, int] = field(default_factory=dict)
    folded: dict[str, float] = field(default_factory=dict)  # module → factor B was multiplied by
    notes: list[str] = field(default_factory=list)
    file_size: int = 0


def _refuse_unexpressible(adapter_dir: Path, adapter: LoraAdapter) -> None:
    where = str(adapter_dir)
    if (adapter_dir / RECOVERY_FILE).is_file():
        raise UsageError(f"{where}: recovery modules ({RECOVERY_FILE}) are non-linear and llama.cpp cannot run them; "
                         f"use adapt convert --recover lowrank, whose output is a plain LoRA")
    if adapter.is_dora:
        raise UsageError(f"{where}: a DoRA adapter (use_dora): llama.cpp applies only lora_a / lora_b, not DoRA's "
                         f"magnitude vectors; export a plain LoRA (train or convert without DoRA)")
    if adapter.embedding_modules():
        raise UsageError(f"{where}: an embedding LoRA ({adapter.embedding_modules()[0]}): llama.cpp's GGUF LoRAs "
                         f"adapt linear layers only; train it without embedding targets")
    full = adapter.full_tensors()
    if full:
        raise UsageError(f"{where}: a full tensor copy ({next(iter(full))}, modules_to_save) has no place in a GGUF "
                         f"LoRA; train it without modules_to_save")
    for module, layer in adapter.layers().items():
        if module.split(".")[-1] == "lm_head" or module == "lm_head":
            raise UsageError(f"{where}: an lm_head LoRA: llama.cpp's converter refuses output-layer LoRAs; "
                             f"train it without lm_head")
        if layer.bias is not None:
            raise UsageError(f"{where}: {module} has a LoRA bias (lora_bias), which a GGUF LoRA cannot hold")


def _expected_shape(module: str, config: Any) -> tuple[int, int] | None:
    """(out, in) of a Llama-style linear from the config, or None for a name we do not size."""
    hidden = int(config_value(config, "hidden_size"))
    heads = int(config_value(config, "num_attention_heads"))
    kv = int(config_value(config, "num_key_value_heads", heads))
    head_dim = int(config_value(config, "head_dim", hidden // heads))
    inter = int(config_value(config, "intermediate_size"))
    leaf = module.rsplit(".", 1)[-1]
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
            "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}.get(leaf)


def _gguf_module(module: str, layer: LoraLayer, arch: str, config: Any, where: str) -> str:
    try:
        name = hf_to_gguf(arch, f"{module}.weight", int(config_value(config, "num_hidden_layers")))
    except UsageError:
        raise UsageError(f"{where}: LoRA target module {module} has no llama.cpp ({arch}) name") from None
    want = _expected_shape(module, config)
    got = (layer.B.shape[0], layer.A.shape[1])
    if want is not None and got != want:
        raise UsageError(f"{where}: {module}'s LoRA is {list(got)} (out, in), the base's layer is {list(want)}")
    return name


def write_gguf_lora(adapter_dir: str | Path, base_config: Any, dest: str | Path, alpha: float | None = None,
                    outtype: str = "f32") -> GgufLoraReport:
    """Write the PEFT LoRA folder ``adapter_dir`` (of a ``base_config`` model) as a GGUF LoRA at ``dest``.

    ``alpha``: the file's ``adapter.lora.alpha`` (default: the config's ``lora_alpha``); modules
    whose PEFT scale differs from ``alpha / r`` have it folded into B (listed in the report).
    ``outtype``: ``f32`` or ``f16`` for A and B. UsageError, in one line, for what a GGUF LoRA
    cannot hold; the file appears whole or not at all.
    """
    adapter_dir = Path(adapter_dir)
    where = str(adapter_dir)
    if (adapter_dir / PROMPT_FILE).is_file():
        raise UsageError(f"{where}: a soft prompt, which llama.cpp cannot load (a GGUF LoRA holds linear-layer "
                         f"updates only); export the LoRA without its prompt")
    if outtype not in LORA_TYPES:
        raise UsageError(f"GGUF LoRA outtype {outtype!r}: use one of {', '.join(LORA_TYPES)}")
    read_folder_config(adapter_dir)  # refuses a missing or non-LoRA config with its own message
    adapter = LoraAdapter.from_folder(adapter_dir)
    _refuse_unexpressible(adapter_dir, adapter)
    config = _as_dict(base_config)
    arch = gguf_arch(config.get("model_type"))
    layers = adapter.layers()
    if not layers:
        raise UsageError(f"{where}: the adapter has no LoRA layers")
    alpha = float(alpha if alpha is not None else adapter.config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    if not alpha > 0:
        raise UsageError(f"GGUF LoRA alpha must be positive, not {alpha}")
    report = GgufLoraReport(path=Path(dest), architecture=arch, alpha=alpha)
    np_type, qtype = LORA_TYPES[outtype]
    dest = Path(dest)
    with _temp_beside(dest) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, layer in layers.items():
            name = _gguf_module(module, layer, arch, config, where)
            B = layer.B.detach().to(torch.float32)
            native = rank_scale(alpha, layer.rank)
            if layer.scale != native:
                report.folded[module] = layer.scale / native
                B = B * report.folded[module]
            B = permute_for_gguf(f"{module}.weight", B, config)
            w.add_tensor(f"{name}.lora_a", layer.A.detach().to(torch.float32).numpy().astype(np_type), raw_dtype=qtype)
            w.add_tensor(f"{name}.lora_b", B.numpy().astype(np_type), raw_dtype=qtype)
            report.modules.append(module)
            report.ranks[module] = layer.rank
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    report.file_size = dest.stat().st_size
    if report.folded:
        why = "rsLoRA's alpha/sqrt(r)" if adapter.config.get("use_rslora") else "rank_pattern / alpha_pattern"
        report.notes.append(f"{len(report.folded)} module(s) have a scale other than alpha/r ({why}): folded into "
                            f"their lora_b, since a GGUF LoRA has one alpha and no field for it")
    return report
