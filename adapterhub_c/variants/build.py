"""Build a variant from a base model and a recipe, and load a stored variant back.

Storage decision (issue 15): a variant stores only what differs from its base.
- Unstructured / semi-structured pruning (magnitude, wanda, 2:4) keeps the base's own
  values, so a pruned variant is a bit-packed keep-mask per pruned tensor
  (`masks.safetensors`, 1 bit per weight, see masks.py) over the base's weight blob,
  which the registry shares (content-addressed) instead of copying.
- ffn-channels keeps whole channels of the base: the kept channel indices per MLP
  (`kept_indices.safetensors`, int64) and the shrunk `intermediate_size` in the
  variant's `config.json`.
- Quantization is not stored at all: bitsandbytes quantizes when the variant is loaded
  (see quantize.py for why), so a quantization-only variant is its recipe.
- GPTQ and SparseGPT (issue 25) change the values they keep, so a mask cannot hold them:
  `compressed.safetensors` (packed.py) stores, per compressed weight, GPTQ's bit-packed
  integer codes + fp16 group scales + zero points (+ the act-order permutation), or
  SparseGPT's keep-mask + kept values in 16 bits, or both jointly. Loading computes Ŵ from
  them in the base's dtype; bitsandbytes may still quantize Ŵ at load (sparsegpt + nf4).
- MoEfication (issue 25, moefy.py) changes no weight: `moe.safetensors` holds each MLP's
  neuron partition and router; loading attaches the routing to the loaded model's MLPs.
- `check_delta` refuses to store a build the delta cannot reproduce.
The recipe and the build's stats go to `variant.json`. A delta folder (`save_delta`)
holds those own files and, under `base/`, the base's config and weight files; loading
reads the base's weights, applies the masks (`weight.mul_(mask)`, what pruning did) and
the channel selection, then quantizes through transformers + bitsandbytes as before.
The result is bit for bit the model a whole-model copy would load.

`VariantBuild.save` still writes a standalone whole-model folder (the pre-issue-15
storage form, which `load_variant_model` keeps reading, and the start of `adapt export`).
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from adapterhub_c.errors import AdaptError, IntegrityError, UsageError
from adapterhub_c.models.arch import MLP_IN, MLP_OUT, describe
from adapterhub_c.models.weights import GGUF_DTYPE, gguf_weights, read_state
from adapterhub_c.progress import Progress
from adapterhub_c.variants import sizes
from adapterhub_c.variants.masks import (
    CHANNEL_PLAN_KEY,
    apply_mask_file,
    apply_masks,
    channel_plan,
    masks_to_bytes,
    select_channels,
    select_tensor_channels,
)
from adapterhub_c.variants.moefy import MOE_FILE, MoeBuild, attach_moe, attach_moe_file, moe_to_bytes, moefy_model
from adapterhub_c.variants.packed import (
    COMPRESSED_FILE,
    StoredWeight,
    apply_compressed,
    compressed_to_bytes,
    load_compressed,
)
from adapterhub_c.variants.pruning import prune_ffn_channels, prune_unstructured, target_linears
from adapterhub_c.variants.quantize import load_quantized, load_quantized_state, resolve_dtype
from adapterhub_c.variants.recipe import UNSTRUCTURED, Recipe
from adapterhub_c.variants.sequential import compress_sequential

WEIGHTS_FILE = "model.safetensors"
KEPT_FILE = "kept_indices.safetensors"
MASKS_FILE = "masks.safetensors"
VARIANT_FILE = "variant.json"
BASE_DIR = "base"  # in a delta folder: the base's config and weight files
STORAGE_DELTA = "delta"  # variant.json "storage" of a variant stored as masks / indices over its base


@dataclass
class VariantStats:
    """Sizes and sparsity of a built variant (see sizes.py for the formulas)."""

    base_params: int  # parameters of the base (tied weights counted once)
    params_total: int  # parameters of the variant (fewer after ffn-channels)
    params_nonzero: int
    target_params_base: int  # weights of the pruned tensors, before pruning
    target_params_nonzero: int  # … and their nonzeros after
    sparsity: float  # 1 - target_params_nonzero / target_params_base
    model_sparsity: float  # 1 - params_nonzero / base_params
    bits_per_weight: float  # effective bits per weight of the decoder linears (+ a quantized LM head), scales included
    stored_bytes: int  # what the variant adds to the store: packed masks + kept indices (headers, recipe excluded)
    quantized_bytes: int  # what the loaded variant holds: bnb formats + unquantized tensors in the compute dtype
    ideal_bytes: int  # values + scales + positions, unquantized tensors at 16 bits
    base_fp16_bytes: int  # the base at 16 bits, for compression ratios
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    full_copy_bytes: int = 0  # tensor bytes of the whole pruned model in the compute dtype (the pre-issue-15 blob)
    export_bytes: int = 0  # tensor bytes of an `hf` export: bnb formats + the rest in the base's stored dtype
    moe: dict | None = None  # MoEfication: experts, active, MLP FLOPs fraction, router quality (moefy.moe_stats)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class VariantBuild:
    """What `apply_recipe` produced: the delta to store for a variant, and the pruned model's state."""

    recipe: Recipe
    state_dict: dict[str, torch.Tensor]  # whole pruned model; shares memory with the model
    kept_indices: dict[str, torch.Tensor]  # ffn-channels: MLP module name → kept channels (int64)
    config: Any  # the updated transformers config
    stats: VariantStats
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned weight name → keep-mask (bool)
    channel_plan: dict[str, list] | None = None  # ffn-channels: what each sliced tensor loses (masks.channel_plan)
    compressed: dict[str, StoredWeight] = field(default_factory=dict)  # gptq / sparsegpt: weight name → stored form
    moe: MoeBuild | None = None  # moefy: the partition + router of every MLP

    def weights_bytes(self) -> bytes:
        """The whole pruned model as one safetensors blob (recipe in the metadata)."""
        from safetensors.torch import save

        return save(self.state_dict, metadata={"format": "pt", "adapterhub_c.recipe": self.recipe.canonical_json()})

    def kept_indices_bytes(self) -> bytes | None:
        """The kept channel indices as a safetensors blob, or None without ffn-channels."""
        from safetensors.torch import save

        if not self.kept_indices:
            return None
        meta = {CHANNEL_PLAN_KEY: json.dumps(self.channel_plan, sort_keys=True)} if self.channel_plan else None
        return save(self.kept_indices, metadata=meta)

    def masks_bytes(self) -> bytes | None:
        """The keep-masks as a bit-packed safetensors blob (masks.py), or None without masks."""
        return masks_to_bytes(self.masks) if self.masks else None

    def compressed_bytes(self) -> bytes | None:
        """GPTQ codes / SparseGPT kept values as a safetensors blob (packed.py), or None without them."""
        return compressed_to_bytes(self.compressed) if self.compressed else None

    def moe_bytes(self) -> bytes | None:
        """MoEfication's partitions + routers as a safetensors blob (moefy.py), or None without moefy."""
        return moe_to_bytes(self.moe) if self.moe is not None else None

    def _meta(self, storage: str | None = None) -> dict[str, Any]:
        meta = {"recipe": self.recipe.to_dict(), "stats": self.stats.to_dict()}
        if storage:
            meta["storage"] = storage
        return meta

    def save(self, folder: str | Path) -> Path:
        """A standalone whole-model folder: config.json, model.safetensors, variant.json (+ kept indices)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        (folder / WEIGHTS_FILE).write_bytes(self.weights_bytes())
        for name, data in ((KEPT_FILE, self.kept_indices_bytes()), (MOE_FILE, self.moe_bytes())):
            if data is not None:
                (folder / name).write_bytes(data)
        (folder / VARIANT_FILE).write_text(json.dumps(self._meta(), indent=2, sort_keys=True))
        return folder

    def save_delta(self, folder: str | Path) -> Path:
        """The variant's own files: config.json, variant.json, masks / kept indices / compressed weights.

        Put the base's config and weight files under `folder/base/` to make it loadable.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        for name, data in ((MASKS_FILE, self.masks_bytes()), (KEPT_FILE, self.kept_indices_bytes()),
                           (COMPRESSED_FILE, self.compressed_bytes()), (MOE_FILE, self.moe_bytes())):
            if data is not None:
                (folder / name).write_bytes(data)
        (folder / VARIANT_FILE).write_text(json.dumps(self._meta(STORAGE_DELTA), indent=2, sort_keys=True))
        return folder


def apply_recipe(
    model: nn.Module,
    recipe: Recipe,
    calib_input_ids: Sequence[torch.Tensor] | torch.Tensor | None = None,
    progress: Progress | None = None,
    storage_dtype: torch.dtype | None = None,
) -> VariantBuild:
    """Prune `model` in place by the recipe and return what to store (bnb quantization comes at load;
    GPTQ and SparseGPT replace the weights in place by the Ŵ they store).

    `storage_dtype`: the dtype the base is stored in (default: the model's), for the
    estimated size of an `hf` export (unquantized tensors are exported in it).

    `calib_input_ids`: tokenized calibration samples (list of [T] or [1, T] tensors, or
    [N, T]); required when the recipe names `calib`, refused when it does not (the recipe
    is the variant's identity, so unrecorded data must not change the result).
    """
    if recipe.uses_calibration and calib_input_ids is None:
        raise UsageError(f"recipe uses calibration data {recipe.calib!r}: pass its input_ids")
    if not recipe.uses_calibration and calib_input_ids is not None:
        raise UsageError("calibration data given but the recipe names none (set calib in the recipe)")
    _check_lm_head_quant(model, recipe)
    base_params = _count_params(model)
    targets_before = _pruned_tensors(model, recipe)
    target_base = sum(p.numel() for p in targets_before.values())

    kept: dict[str, torch.Tensor] = {}
    layer_sparsity: dict[str, float] = {}
    if recipe.prune in UNSTRUCTURED:
        layer_sparsity = prune_unstructured(
            model, recipe.prune, recipe.sparsity, recipe.prune_granularity or "row",
            calib_input_ids=calib_input_ids, include_embeddings=recipe.include_embeddings,
            include_lm_head=recipe.include_lm_head, progress=progress,
        )
    compressed: dict[str, StoredWeight] = {}
    if recipe.uses_obs:
        compressed, layer_sparsity = compress_sequential(model, recipe, calib_input_ids, storage_dtype, progress)
    plan = None
    if recipe.prune == "ffn-channels":
        plan = channel_plan(describe(model, warn=False))  # before the MLPs are shrunk
        kept = prune_ffn_channels(model, recipe.sparsity, calib_input_ids, progress=progress)
    moe = moefy_model(model, recipe.experts, recipe.active, recipe.moe_router, calib_input_ids, progress) \
        if recipe.moefy else None  # after the other methods: "Q+M" routes the compressed MLPs

    masks: dict[str, torch.Tensor] = {}
    if recipe.prune in UNSTRUCTURED:
        # every kept value is the base's own, so what was removed is exactly where the weight is 0 now
        # (a weight that was 0 already is 0 either way: base × mask reproduces it bit for bit)
        masks = {name: (p.detach() != 0).cpu() for name, p in _pruned_tensors(model, recipe).items()}
    stats = compute_stats(model, recipe, base_params, target_base, layer_sparsity, storage_dtype)
    stats.stored_bytes = sum(-(-m.numel() // 8) for m in masks.values()) + sum(8 * t.numel() for t in kept.values()) \
        + sum(w.nbytes for w in compressed.values())
    if moe is not None:
        stats.stored_bytes += moe.nbytes
        stats.moe = moe.stats
    state = {name: t.detach().cpu().contiguous() for name, t in _unique_state(model).items()}
    return VariantBuild(recipe, state, kept, copy.deepcopy(model.config), stats, masks, plan, compressed, moe)


def load_variant_model(
    source: str | Path | Mapping[str, torch.Tensor] | bytes | VariantBuild,
    config: Any = None,
    recipe: Recipe | str | dict | None = None,
    device: str = "cpu",
    compute_dtype: str | torch.dtype | None = None,
    cpu_bf16_kernel: bool = False,
) -> nn.Module:
    """A transformers model of the variant, quantized with bitsandbytes where the recipe says, eval mode.

    `source`: a delta folder (`VariantBuild.save_delta` + the base's files under `base/`),
    a whole-model folder written by `VariantBuild.save`, a safetensors file, a state dict,
    the safetensors bytes, or a `VariantBuild`. `config` (a transformers config or its
    dict) and `recipe` default to the folder's config.json / variant.json.
    `compute_dtype`: dtype of the bnb matmuls and unquantized tensors (default: the
    config's dtype, float32 when unset). The result is ready for `peft.get_peft_model`
    or `PeftModel.from_pretrained` (LoRA wraps the bnb layers).
    `cpu_bf16_kernel`: keep bnb's CPU bf16 repacking of 4-bit layers (faster inference,
    but training after an eval forward gets no gradients; see quantize.py).
    """
    moe = None
    if isinstance(source, VariantBuild):
        config = source.config if config is None else config
        recipe = source.recipe if recipe is None else recipe
        moe = source.moe
        source = source.state_dict
    folder = Path(source) if isinstance(source, (str, Path)) else None
    if folder is not None and not folder.exists():
        raise UsageError(f"variant weights not found: {folder}")
    if folder is not None and folder.is_dir():
        if recipe is None and (folder / VARIANT_FILE).exists():
            recipe = json.loads((folder / VARIANT_FILE).read_text())["recipe"]
    if recipe is None:
        raise UsageError("loading a variant needs its recipe")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_json(recipe)

    if folder is not None and is_delta_folder(folder):
        cfg = _config_object(config) if config is not None else _folder_config(folder)
        state = delta_state(folder)
        dtype = resolve_dtype(compute_dtype, _config_dtype(folder))
        model = load_quantized_state(cfg, state, recipe.bnb_quant, recipe.double_quant, dtype, device,
                                     include_lm_head=recipe.include_lm_head, dtype=dtype,
                                     cpu_bf16_kernel=cpu_bf16_kernel)
        return _with_moe(model, recipe, folder, moe)
    with tempfile.TemporaryDirectory(prefix="adapterhub-variant-") as tmp:
        model_dir = _model_folder(source, folder, config, Path(tmp))
        cfg_dtype = _config_dtype(model_dir)
        dtype = resolve_dtype(compute_dtype, cfg_dtype)
        model = load_quantized(model_dir, recipe.bnb_quant, recipe.double_quant, dtype, device,
                               include_lm_head=recipe.include_lm_head, dtype=dtype,
                               cpu_bf16_kernel=cpu_bf16_kernel)
    return _with_moe(model, recipe, folder if folder is not None and folder.is_dir() else None, moe)


def _with_moe(model: nn.Module, recipe: Recipe, folder: Path | None, moe: MoeBuild | None) -> nn.Module:
    """The model with its MLPs routed when the recipe MoEfies (from the build, else the folder's moe file)."""
    if not recipe.moefy:
        return model
    if moe is not None:
        attach_moe(model, moe.routers, recipe.active)
    elif folder is not None and (folder / MOE_FILE).exists():
        attach_moe_file(model, folder / MOE_FILE, recipe.active)
    else:
        raise IntegrityError(f"the recipe MoEfies ({recipe.describe()}) but no {MOE_FILE} was found")
    return model


# ---- delta folders -----------------------------------------------------------------------


def is_delta_folder(folder: str | Path) -> bool:
    """True for a folder laid out by `save_delta` + the base's files under `base/`."""
    return (Path(folder) / BASE_DIR).is_dir() and not (Path(folder) / WEIGHTS_FILE).exists()


def read_kept_indices(path: str | Path) -> dict[str, torch.Tensor]:
    """The kept channel indices of a `kept_indices.safetensors` file (int64)."""
    from safetensors.torch import load_file

    try:
        return {k: v.long() for k, v in load_file(str(path)).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a bad file
        raise IntegrityError(f"kept-indices file {Path(path).name} is unreadable ({e})") from None


def read_channel_plan(path: str | Path) -> dict[str, list] | None:
    """The channel plan stored with the kept indices (None in files written before it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(CHANNEL_PLAN_KEY)
        return json.loads(raw) if raw else None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a bad file
        raise IntegrityError(f"kept-indices file {Path(path).name} is unreadable ({e})") from None


def delta_state(folder: str | Path, base_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The variant's state dict from a delta folder: base weights × keep-masks, compressed weights' Ŵ,
    kept channels selected.

    Tensors keep the base's stored dtype. `base_state` (consumed, modified in place)
    saves reading `folder/base` again.
    """
    folder = Path(folder)
    state = read_state(folder / BASE_DIR) if base_state is None else base_state
    if (folder / MASKS_FILE).exists():
        apply_mask_file(state, folder / MASKS_FILE)
    if (folder / COMPRESSED_FILE).exists():
        apply_compressed(state, load_compressed(folder / COMPRESSED_FILE))
    if (folder / KEPT_FILE).exists():
        select_channels(state, read_kept_indices(folder / KEPT_FILE), read_channel_plan(folder / KEPT_FILE))
    return state


def check_delta(build: VariantBuild, base_folder: str | Path) -> None:
    """Refuse (AdaptError) unless base × masks (+ kept channels) is bit for bit the pruned model.

    Reads the base tensor by tensor. This is the guarantee that storing the delta loses
    nothing; a pruning method that changed kept values would fail here (and would have to
    store its sparse values instead).
    """
    seen: set[str] = set()
    others: dict[str, Path] = {}  # file tensors under names the model does not use
    for f, name, read in _base_tensors(Path(base_folder)):
        if name not in build.state_dict:
            others[name] = f  # a tied duplicate the build stores once, or a legacy checkpoint name
            continue
        t = {name: read()}
        if name in build.masks:
            apply_masks(t, {name: build.masks[name]})
        if name in build.compressed:
            apply_compressed(t, {name: build.compressed[name]})
        if build.kept_indices:
            t[name] = select_tensor_channels(name, t[name], build.kept_indices, build.channel_plan)
        want = build.state_dict[name]
        got = t[name].to(want.dtype)
        if got.shape != want.shape or not torch.equal(got, want):
            raise AdaptError(f"the variant's {name} is not the base's values under its keep-mask: "
                             "this pruning method changes kept values and cannot be stored as a mask")
        seen.add(name)
    missing = [name for name in sorted(set(build.state_dict) - seen)
               if not _stored_under_another_name(name, build.state_dict[name], others)]
    if missing:
        raise AdaptError(f"the base's weight files lack {missing[0]!r} (and {len(missing) - 1} more): "
                         "the variant cannot be stored as a delta over them")


def _base_tensors(folder: Path):
    """(file, name, read) for every tensor of a base folder: read() gives it (safetensors: one at a time;
    a GGUF base: its dequantized tensors, read once)."""
    from safetensors import safe_open

    gguf = gguf_weights(folder)
    if gguf is not None:
        state = read_state(folder)
        for name in list(state):
            yield gguf, name, (lambda n=name: state.pop(n))
        return
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                yield f, name, (lambda st=st, n=name: st.get_tensor(n))


def _stored_under_another_name(name: str, want: torch.Tensor, others: Mapping[str, Path]) -> bool:
    """Whether exactly one base tensor stored under a name the model does not use (transformers
    saves some under legacy names: GPT-NeoX's ``lm_head`` as ``embed_out``) holds ``name``'s values;
    loading goes through ``from_pretrained``, which maps the names back."""
    from safetensors import safe_open

    matches = 0
    for other, f in others.items():
        with safe_open(str(f), "pt") as st:
            if list(st.get_slice(other).get_shape()) != list(want.shape):
                continue
            matches += torch.equal(st.get_tensor(other).to(want.dtype), want)
    return matches == 1


def compute_stats(model: nn.Module, recipe: Recipe, base_params: int, target_base: int,
                  layer_sparsity: dict[str, float] | None = None,
                  storage_dtype: torch.dtype | None = None) -> VariantStats:
    """Count parameters, nonzeros, bits and bytes of a pruned model under the recipe.

    `stored_bytes` is left 0 here (apply_recipe counts the masks); `export_bytes` counts
    quantized tensors as bitsandbytes holds them and the others in `storage_dtype`
    (default: the model's dtype), i.e. the tensors of an `hf` export without headers.
    """
    pruned = _pruned_tensors(model, recipe)
    quantized = _quantized_tensors(model, recipe)
    pruned_ids = {id(p) for p in pruned.values()}
    weight_names = set(_weight_names(model, target_linears(model))) | quantized
    conv_in = {f"{n}.weight": i.in_features for n, i in describe(model).linears().items() if i.fan_in_fan_out}
    total = nonzero = target_nnz = stored_bits = held_bits = ideal_bits = export_bits = 0
    q_bits = q_numel = 0
    gptq = {"gptq_bits": recipe.bits, "group_size": recipe.group_size} if recipe.quant == "gptq" else {}
    for name, p in _unique_params(model).items():
        numel, nnz = p.numel(), int(torch.count_nonzero(p.detach()))
        in_f = conv_in.get(name, p.shape[-1] if p.dim() >= 2 else numel)  # a Conv1D weight is [in, out]
        dtype_bits = p.element_size() * 8
        total += numel
        nonzero += nnz
        stored_bits += numel * dtype_bits
        quant = recipe.quant if name in quantized else "none"
        bnb = quant if quant != "gptq" else "none"  # GPTQ's Ŵ is loaded (and exported) dense
        pattern = _pattern(recipe, name) if id(p) in pruned_ids else "dense"
        if id(p) in pruned_ids:
            target_nnz += nnz
        held_bits += sizes.quantized_tensor_bits(numel, in_f, bnb, recipe.double_quant, dtype_bits)
        store_bits = torch.finfo(storage_dtype).bits if storage_dtype is not None else dtype_bits
        export_bits += sizes.quantized_tensor_bits(numel, in_f, bnb, recipe.double_quant, store_bits)
        ideal_bits += sizes.ideal_tensor_bits(numel, nnz, in_f, quant, recipe.double_quant, pattern, **gptq)
        if name in weight_names:
            q_bits += sizes.quantized_tensor_bits(numel, in_f, quant, recipe.double_quant, dtype_bits, **gptq)
            q_numel += numel
    return VariantStats(
        base_params=base_params,
        params_total=total,
        params_nonzero=nonzero,
        target_params_base=target_base,
        target_params_nonzero=target_nnz,
        sparsity=1.0 - target_nnz / target_base if target_base else 0.0,
        model_sparsity=1.0 - nonzero / base_params if base_params else 0.0,
        bits_per_weight=q_bits / q_numel if q_numel else 0.0,
        stored_bytes=0,
        full_copy_bytes=stored_bits // 8,
        export_bytes=-(-export_bits // 8),
        quantized_bytes=-(-held_bits // 8),
        ideal_bytes=-(-ideal_bits // 8),
        base_fp16_bytes=base_params * 2,
        layer_sparsity=dict(layer_sparsity or {}),
    )


# ---- helpers -------------------------------------------------------------------------


def _unique_params(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters, a tied weight once (under its first name)."""
    return dict(model.named_parameters())  # named_parameters already skips duplicates


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (first name), as save_pretrained does."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _unique_params(model).values())


def _weight_names(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": mod.weight for name, mod in modules.items()}


def _pruned_tensors(model: nn.Module, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The weights the recipe prunes, by parameter name (empty without pruning)."""
    if recipe.prune == "none":
        return {}
    out = _weight_names(model, target_linears(model))
    if recipe.prune == "ffn-channels":
        mlp = describe(model).linears((MLP_IN, MLP_OUT))
        return {n: p for n, p in out.items() if n.rsplit(".", 1)[0] in mlp}
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if recipe.include_embeddings and emb is not None:
        out[f"{names[id(emb)]}.weight"] = emb.weight
    if recipe.include_lm_head and head is not None and head.weight is not getattr(emb, "weight", None):
        out[f"{names[id(head)]}.weight"] = head.weight
    return out


def _quantized_tensors(model: nn.Module, recipe: Recipe) -> set[str]:
    if recipe.quant == "none":
        return set()
    out = set(_weight_names(model, target_linears(model)))
    head = model.get_output_embeddings()
    if recipe.include_lm_head and head is not None:
        names = {id(m): n for n, m in model.named_modules()}
        out.add(f"{names[id(head)]}.weight")
    return out


def _pattern(recipe: Recipe, name: str) -> str:
    if recipe.prune in ("2:4", "sparsegpt:2:4"):
        return "2:4"
    if recipe.prune == "ffn-channels":
        return "structured"
    return "unstructured"


def _check_lm_head_quant(model: nn.Module, recipe: Recipe) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if recipe.include_lm_head and recipe.quant != "none" and head is not None and emb is not None \
            and head.weight is emb.weight:
        raise UsageError("cannot quantize an LM head tied to the embeddings (embeddings stay unquantized)")


def _config_dtype(folder: Path) -> torch.dtype:
    data = json.loads((folder / "config.json").read_text())
    name = data.get("dtype") or data.get("torch_dtype") or "float32"
    return resolve_dtype(name) if name in ("float32", "float16", "bfloat16") else torch.float32


def storage_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype of the floating-point weights in a folder's safetensors files (None if none; a GGUF
    folder: float32, what its dequantized values are exact in)."""
    from safetensors import safe_open

    if gguf_weights(folder) is not None:
        return GGUF_DTYPE  # dequantized GGUF values, exact in float32
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                dtype = names.get(st.get_slice(k).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def _folder_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def _model_folder(source: Any, folder: Path | None, config: Any, tmp: Path) -> Path:
    """A folder with config.json + model.safetensors for from_pretrained (written to tmp if needed)."""
    from safetensors.torch import load, load_file, save_file

    if folder is not None and folder.is_dir() and config is None:
        if not (folder / "config.json").exists() or not (folder / WEIGHTS_FILE).exists():
            raise UsageError(f"{folder} is not a variant folder (config.json and {WEIGHTS_FILE} expected)")
        return folder
    if config is None:
        raise UsageError("loading variant weights without a folder needs the model config")
    if isinstance(source, bytes):
        state = load(source)
    elif folder is not None:
        state = load_file(str(folder / WEIGHTS_FILE if folder.is_dir() else folder))
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in dict(source).items()}
    _config_object(config).save_pretrained(tmp)
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return tmp


def _config_object(config: Any):
    if isinstance(config, (dict, str)):
        from transformers import AutoConfig

        data = json.loads(config) if isinstance(config, str) else dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise UsageError("the variant config has no model_type")
        return AutoConfig.for_model(model_type, **data)
    return config
