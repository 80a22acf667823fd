"""Writing GGUF models llama.cpp loads: a Hugging Face state in, a ``.gguf`` file out; and quantizing one.

:func:`write_gguf_model` uses the ``gguf`` package's ``GGUFWriter``: the architecture's
hyper-parameters, every tensor under its llama.cpp name (q/k rows reordered for Llama, see
:mod:`adapterhub_c.models.gguf_names`), norms and biases in float32 and matrices in
``ftype`` (f32, f16, bf16), and the tokenizer as llama.cpp's ``gpt2`` byte-level BPE:
tokens and their types from ``tokenizer.json``, then merges, special-token ids, add-BOS flags
and the chat template through ``gguf.vocab.SpecialVocab``. llama.cpp picks its pre-tokenizer
regexes by name (``tokenizer.ggml.pre``); we name it from ``tokenizer.json``'s pre-tokenizer
(:data:`PRE_TOKENIZERS`) and refuse one we cannot name, as llama.cpp's converter does.

:func:`quantize_gguf` re-types a GGUF model: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and F16 / BF16 /
F32) with ``gguf.quants`` (numpy; Q8_0 bit-exact with ggml), the k-quants with llama.cpp's own
``llama_model_quantize`` (the ``gguf`` extra: ``llama-cpp-python``). A matrix whose rows are
not a whole number of the type's blocks keeps another type (numpy path: F16; llama.cpp picks
its own fallback): the report lists the type each tensor got. Both write to a temp file
beside ``dest`` and rename, so nothing half-written is left.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.formats.gguf_read import inspect_gguf
from adapterhub_c.models.gguf_names import config_value, gguf_arch, hf_to_gguf, permute_for_gguf
from adapterhub_c.models.gguf_tensors import gguf_field, open_gguf

FLOAT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "bf16": gguf.GGMLQuantizationType.BF16}
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
               "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
               "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
               "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
NUMPY_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32")
K_QUANTS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = (
    int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED),
    int(gguf.TokenType.UNUSED))

# tokenizers' split regexes of the families we know, as tokenizer.json writes them
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
# (pre-tokenizer steps, as _pre_signature writes them) → llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",
    (f"Split({_QWEN2_SPLIT})", "ByteLevel"): "qwen2",
    (f"Split({_LLAMA3_SPLIT})", "ByteLevel"): "llama-bpe",
}


@contextlib.contextmanager
def _temp_beside(dest: Path) -> Iterator[Path]:
    """A temp path beside ``dest``, renamed onto it when the block succeeds, removed otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _as_dict(config: Any) -> dict:
    return config if isinstance(config, dict) else config.to_dict()


# ---- hyper-parameters ---------------------------------------------------------------------
def _rope(config: dict) -> tuple[float, str, dict]:
    """(rope theta, rope type, parameters) from transformers 5 ``rope_parameters`` or 4.x keys."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), str(kind), params


def _add_hparams(w: gguf.GGUFWriter, config: dict, arch: str) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    w.add_context_length(int(config_value(config, "max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config_value(config, "num_key_value_heads", heads)))
    w.add_layer_norm_rms_eps(float(config_value(config, "rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(config["vocab_size"]))
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    theta, kind, params = _rope(config)
    w.add_rope_freq_base(theta)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    elif kind != "default":
        raise UsageError(f"GGUF export of rope scaling {kind!r} is not supported ({arch}); only default and linear")


# ---- tokenizer ----------------------------------------------------------------------------
def _pre_signature(pre: dict | None) -> tuple[str, ...]:
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel":
            out.append("ByteLevel(regex)" if step.get("use_regex", True) else "ByteLevel")
        elif kind == "Digits":
            out.append("Digits(individual)" if step.get("individual_digits") else "Digits")
        elif kind == "Split":
            out.append(f"Split({(step.get('pattern') or {}).get('Regex', step.get('pattern'))})")
        else:
            out.append(str(kind))
    return tuple(out)


def _read_tokenizer_json(tokenizer_dir: Path) -> dict:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{tokenizer_dir}: no tokenizer.json (GGUF export needs a fast tokenizer)")
    try:
        tok = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid JSON ({str(e)[:80]})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise UsageError(f"{path}: GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2); this one is "
                         f"{model.get('type')!r} with a {(tok.get('decoder') or {}).get('type')!r} decoder")
    if not model.get("merges"):
        raise UsageError(f"{path}: the BPE tokenizer has no merges, and llama.cpp's gpt2 tokenizer needs them")
    return tok


def _token_table(tok: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """(token texts, llama.cpp token types) for ids 0..n_vocab-1 (unused ids padded as llama.cpp's converter does)."""
    texts: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {i: TOKEN_NORMAL for i in texts}
    for added in tok.get("added_tokens") or []:
        i = int(added["id"])
        texts[i] = added["content"]
        types[i] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if texts and max(texts) >= n_vocab:
        raise UsageError(f"the tokenizer has token id {max(texts)}, beyond the model's vocab_size {n_vocab}")
    return ([texts.get(i, f"[PAD{i}]") for i in range(n_vocab)],
            [types.get(i, TOKEN_UNUSED) for i in range(n_vocab)])


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer_dir: Path, n_vocab: int) -> str:
    tok = _read_tokenizer_json(tokenizer_dir)
    signature = _pre_signature(tok.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise UsageError(f"{tokenizer_dir}: llama.cpp names no pre-tokenizer for {' + '.join(signature)[:120]}")
    texts, types = _token_table(tok, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(texts)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.add_special_token.setdefault("bos", _adds_bos(tok))  # what transformers' encode does
    special.add_to_gguf(w, quiet=True)
    return pre


def _adds_bos(tok: dict) -> bool:
    """True when tokenizer.json's post-processor puts a special token before a single sequence."""
    post = tok.get("post_processor") or {}
    for step in post.get("processors", [post]):
        if (step or {}).get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


# ---- the model ----------------------------------------------------------------------------
def _tensor_type(tensor: torch.Tensor, ftype: str) -> gguf.GGMLQuantizationType:
    return FLOAT_TYPES[ftype] if tensor.dim() >= 2 else gguf.GGMLQuantizationType.F32


def _encode(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.quantize(values.astype(np.float32, copy=False), qtype)


def write_gguf_model(state: dict[str, torch.Tensor], config: Any, tokenizer_dir: str | Path, dest: str | Path,
                     ftype: str = "f16") -> Path:
    """Write HF state ``state`` of a ``config`` model (dict or PretrainedConfig) and its tokenizer as a GGUF.

    ``ftype``: ``f32``, ``f16`` or ``bf16`` for the matrices (norms and biases stay float32).
    A tied model (``tie_word_embeddings``) is written without ``output.weight``, as llama.cpp's
    converter writes it. UsageError for another family, rope scaling or tokenizer we cannot
    express; the file appears whole at ``dest`` or not at all.
    """
    if ftype not in FLOAT_TYPES:
        raise UsageError(f"GGUF model ftype {ftype!r}: use one of {', '.join(FLOAT_TYPES)} (then quantize_gguf)")
    cfg = _as_dict(config)
    arch = gguf_arch(cfg.get("model_type"))
    n_layers = int(cfg["num_hidden_layers"])
    tensors = {k: v for k, v in state.items()
               if not (k == "lm_head.weight" and cfg.get("tie_word_embeddings"))}
    if not cfg.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        raise UsageError("the state has no lm_head.weight and the config does not tie the embeddings")
    names = {k: hf_to_gguf(arch, k, n_layers) for k in tensors}
    dest = Path(dest)
    with _temp_beside(dest) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        if cfg.get("_name_or_path"):
            w.add_name(str(cfg["_name_or_path"]).rsplit("/", 1)[-1])
        _add_hparams(w, cfg, arch)
        w.add_file_type(int(_FILE_TYPES[ftype.upper()]))
        _add_tokenizer(w, Path(tokenizer_dir), int(cfg["vocab_size"]))
        for hf_name, tensor in tensors.items():
            values = permute_for_gguf(hf_name, tensor.detach().to(torch.float32).cpu(), cfg).numpy()
            qtype = _tensor_type(tensor, ftype)
            w.add_tensor(names[hf_name], _encode(values, qtype), raw_dtype=qtype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dest


# ---- quantizing ---------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    """What :func:`quantize_gguf` wrote: the type asked for and the type each tensor got."""

    path: Path
    type_name: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    file_size: int = 0
    quantizer: str = "gguf"  # "gguf" (numpy) or "llama.cpp"

    def fallbacks(self) -> dict[str, str]:
        """{tensor: type} of the matrices that did not get the requested type (norms and biases excluded)."""
        base = self.type_name.split("_K")[0] + "_K" if "_K" in self.type_name else self.type_name
        return {n: t for n, t in self.tensor_types.items()
                if not n.endswith(("norm.weight", ".bias")) and t != "F32" and not t.startswith(base)}


def canonical_type(type_name: str) -> str:
    """``type_name`` upper-cased and checked against the types we write (UsageError naming the choices)."""
    name = type_name.upper()
    if name not in NUMPY_QUANTS + K_QUANTS:
        raise UsageError(f"GGUF type {type_name!r}: use one of {', '.join(NUMPY_QUANTS + K_QUANTS)}")
    return name


def quantize_gguf(src: str | Path, dest: str | Path, type_name: str, threads: int | None = None) -> QuantizeReport:
    """Re-type GGUF model ``src`` into ``dest`` as ``type_name`` (Q4_0 … Q8_0 with numpy, k-quants with llama.cpp)."""
    name = canonical_type(type_name)
    src, dest = Path(src), Path(dest)
    inspect_gguf(src)  # refuses a truncated or corrupt source before writing anything
    if name in K_QUANTS:
        _llama_quantize(src, dest, name, threads)
        quantizer = "llama.cpp"
    else:
        _numpy_quantize(src, dest, name)
        quantizer = "gguf"
    info = inspect_gguf(dest)
    return QuantizeReport(path=dest, type_name=name, tensor_types={n: t for n, (_, t) in info.tensors.items()},
                          file_size=info.file_size, quantizer=quantizer)


def _copy_fields(reader: gguf.GGUFReader, w: gguf.GGUFWriter, file_type: int) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, gguf_field(reader, key), vtype, sub_type=sub)
    w.add_file_type(file_type)


def _numpy_type(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _numpy_quantize(src: Path, dest: Path, name: str) -> None:
    reader = open_gguf(src)
    qtype = gguf.GGMLQuantizationType[name]
    arch = gguf_field(reader, "general.architecture")
    with _temp_beside(dest) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        _copy_fields(reader, w, int(_FILE_TYPES[name]))
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            ttype = _numpy_type(shape, qtype)
            w.add_tensor(t.name, _encode(values, ttype), raw_dtype=ttype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _llama_quantize(src: Path, dest: Path, name: str, threads: int | None) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise UsageError(f"GGUF {name} is made by llama.cpp's quantizer: install the extra "
                         f"(pip install 'adapterhub-c[gguf]', i.e. llama-cpp-python)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = threads or max(1, (os.cpu_count() or 2) // 2)
    with _temp_beside(dest) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise AdaptError(f"llama.cpp could not quantize {src.name} to {name} (llama_model_quantize returned {rc})")
