"""What a loaded transformers causal LM is made of: decoder blocks, their linear layers, roles.

Every module that needs to find layers (pruning, LoRA training defaults, recovery
placement, ffn-channel slicing, shape checks, ΔW orientation) asks :func:`describe`
instead of hard-coding Llama's ``q_proj … down_proj``.

- **Linear layers are found by type**: ``nn.Linear`` (and subclasses such as Falcon's),
  transformers' ``Conv1D`` (GPT-2 style; its weight is ``[in, out]``, PEFT's
  ``fan_in_fan_out``), bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (``[out, in]``
  always: transformers transposes a ``Conv1D`` when it quantizes it).
- **Roles** (``attn-in``, ``attn-out``, ``mlp-in``, ``mlp-out``) come from a table keyed by
  ``config.model_type`` (:data:`FAMILIES`), with the layout of fused outputs (Phi-3
  ``qkv_proj`` and ``gate_up_proj``, GPT-2 ``c_attn``, NeoX/Falcon/Bloom
  ``query_key_value``, interleaved per head where the model does so).
- **Unknown model types** are discovered by type: the first ``ModuleList`` whose items hold
  linear layers is the stack of decoder blocks; linears under a module named like
  ``attn``/``attention`` are attention (the one named like an output projection, else the
  last, is ``attn-out``), the others are the MLP (inputs read the hidden size, the output
  writes it). :func:`describe` reports what it found through an :class:`AdaptWarning`.
- **No recognisable decoder blocks** → :class:`UsageError` naming the model type and what
  was found.

The MLP pairing (:class:`MlpInfo`) is what structured pruning needs: the input linears whose
output rows are the intermediate channels (a fused gate/up linear holds every channel
twice, one per half), and the output linear whose input columns are the same channels.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from adapterhub_c.errors import AdaptWarning, UsageError

ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT = "attn-in", "attn-out", "mlp-in", "mlp-out"
ROLES = (ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT)
PEFT_PREFIX = "base_model.model."
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim", "d_ff", "inner_dim")


# ---- linear layers by type ---------------------------------------------------------------
def _has_base(module: nn.Module, name: str, package: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith(package) for c in type(module).__mro__)


def linear_kind(module: nn.Module) -> str | None:
    """``"bnb4"``, ``"bnb8"``, ``"conv1d"``, ``"linear"`` or None (not a linear layer).

    Judged by class (and base classes), without importing bitsandbytes or transformers.
    PEFT LoRA layers are not linears themselves (their ``base_layer`` is).
    """
    if _has_base(module, "Linear4bit", "bitsandbytes"):
        return "bnb4"
    if _has_base(module, "Linear8bitLt", "bitsandbytes"):
        return "bnb8"
    if _has_base(module, "Conv1D", "transformers"):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear (bnb included) and transformers' Conv1D."""
    return linear_kind(module) is not None


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer, a Conv1D or a PEFT layer around one."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if linear_kind(module) == "conv1d":
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def fan_in_fan_out(module: nn.Module) -> bool:
    """True when the layer stores its weight as ``[in, out]`` (a Conv1D)."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    return linear_kind(module) == "conv1d"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``[out, in]`` view (transposed for a Conv1D); not for bnb layers."""
    kind = linear_kind(module)
    if kind in ("bnb4", "bnb8"):
        raise UsageError(f"{type(module).__name__} is quantized; dequantize it first")
    if kind is None:
        raise UsageError(f"not a linear layer: {type(module).__name__}")
    return module.weight.t() if kind == "conv1d" else module.weight


def to_weight_layout(matrix: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """An ``[out, in]`` matrix in the layout the layer stores (transposed for a Conv1D)."""
    return matrix.t() if fan_in_fan_out(module) else matrix


# ---- fused outputs -------------------------------------------------------------------------
@dataclass(frozen=True)
class Fused:
    """How a fused linear's output rows split into parts: ``groups`` repeats of ``sizes``.

    Contiguous fusion (Phi-3 ``qkv_proj`` = [q | k | v]) has ``groups=1``; per-head
    interleaving (NeoX ``query_key_value`` = [q₀ k₀ v₀ | q₁ k₁ v₁ | …]) has one group per head.
    """

    labels: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: int = 1

    @property
    def width(self) -> int:
        return self.groups * sum(self.sizes)

    def rows(self, label: str) -> torch.Tensor:
        """The output rows (int64) of part ``label``."""
        j = self.labels.index(label)
        stride, offset = sum(self.sizes), sum(self.sizes[:j])
        base = torch.arange(self.sizes[j], dtype=torch.int64) + offset
        return (torch.arange(self.groups, dtype=torch.int64)[:, None] * stride + base[None, :]).reshape(-1)

    def describe(self) -> str:
        parts = "|".join(f"{lab}:{n}" for lab, n in zip(self.labels, self.sizes, strict=True))
        return f"[{parts}]" + (f"×{self.groups}" if self.groups > 1 else "")


# ---- the table -----------------------------------------------------------------------------
Layout = Callable[[object, int], "Fused | None"]  # (config, out_features) → layout


def _head_dim(cfg) -> int:
    hidden = _cfg(cfg, "hidden_size", "n_embd", "d_model")
    heads = _cfg(cfg, "num_attention_heads", "n_head", "num_heads")
    return int(getattr(cfg, "head_dim", None) or hidden // heads)


def _cfg(cfg, *keys):
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            return int(v)
    return None


def _qkv_contiguous(cfg, out: int) -> Fused:
    hd, heads = _head_dim(cfg), _cfg(cfg, "num_attention_heads", "n_head")
    kv = _cfg(cfg, "num_key_value_heads") or heads
    return Fused(("q", "k", "v"), (heads * hd, kv * hd, kv * hd))


def _qkv_per_head(cfg, out: int) -> Fused:
    hd, heads = _head_dim(cfg), _cfg(cfg, "num_attention_heads", "n_head")
    return Fused(("q", "k", "v"), (hd, hd, hd), groups=heads)


def _falcon_qkv(cfg, out: int) -> Fused:
    hd, heads = _head_dim(cfg), _cfg(cfg, "num_attention_heads")
    if getattr(cfg, "new_decoder_architecture", False):
        kv = _cfg(cfg, "num_kv_heads") or heads
        return Fused(("q", "k", "v"), (hd * heads // kv, hd, hd), groups=kv)
    if getattr(cfg, "multi_query", False):
        return Fused(("q", "k", "v"), (heads * hd, hd, hd))
    return Fused(("q", "k", "v"), (hd, hd, hd), groups=heads)


def _halves(labels=("gate", "up")) -> Layout:
    def layout(cfg, out: int) -> Fused:
        return Fused(labels, (out // 2, out // 2))
    return layout


@dataclass(frozen=True)
class Family:
    """One architecture family: roles by local name inside a block, fused layouts, MLP config key."""

    roles: dict[str, str]
    fused: dict[str, Layout] = field(default_factory=dict)
    gated: bool = True
    intermediate_key: str | None = "intermediate_size"
    conv1d: bool = False  # block linears are transformers Conv1D: checkpoints store weights [in, out]


def _llama(**over) -> Family:
    roles = {"self_attn.q_proj": ATTN_IN, "self_attn.k_proj": ATTN_IN, "self_attn.v_proj": ATTN_IN,
             "self_attn.o_proj": ATTN_OUT, "mlp.gate_proj": MLP_IN, "mlp.up_proj": MLP_IN,
             "mlp.down_proj": MLP_OUT}
    return Family(roles=roles, **over)


def _neox_style(attn: str, **over) -> Family:
    """NeoX / Falcon / Bloom: fused ``query_key_value`` and ``dense`` in ``attn``; h→4h, 4h→h MLP."""
    roles = {f"{attn}.query_key_value": ATTN_IN, f"{attn}.dense": ATTN_OUT, "mlp.dense_h_to_4h": MLP_IN,
             "mlp.dense_4h_to_h": MLP_OUT}
    return Family(roles=roles, gated=False, **over)


FAMILIES: dict[str, Family] = {
    **{t: _llama() for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                             "olmo2", "granite", "cohere", "smollm3", "helium", "glm")},
    "phi3": Family(roles={"self_attn.qkv_proj": ATTN_IN, "self_attn.o_proj": ATTN_OUT,
                          "mlp.gate_up_proj": MLP_IN, "mlp.down_proj": MLP_OUT},
                   fused={"self_attn.qkv_proj": _qkv_contiguous, "mlp.gate_up_proj": _halves()}),
    "phi": Family(roles={"self_attn.q_proj": ATTN_IN, "self_attn.k_proj": ATTN_IN, "self_attn.v_proj": ATTN_IN,
                         "self_attn.dense": ATTN_OUT, "mlp.fc1": MLP_IN, "mlp.fc2": MLP_OUT}, gated=False),
    "gpt2": Family(roles={"attn.c_attn": ATTN_IN, "attn.c_proj": ATTN_OUT, "mlp.c_fc": MLP_IN,
                          "mlp.c_proj": MLP_OUT},
                   fused={"attn.c_attn": lambda cfg, out: Fused(("q", "k", "v"), (out // 3,) * 3)},
                   gated=False, intermediate_key="n_inner", conv1d=True),
    "gptj": Family(roles={"attn.q_proj": ATTN_IN, "attn.k_proj": ATTN_IN, "attn.v_proj": ATTN_IN,
                          "attn.out_proj": ATTN_OUT, "mlp.fc_in": MLP_IN, "mlp.fc_out": MLP_OUT},
                   gated=False, intermediate_key="n_inner"),
    "gpt_neox": _neox_style("attention", fused={"attention.query_key_value": _qkv_per_head}),
    "falcon": _neox_style("self_attention", fused={"self_attention.query_key_value": _falcon_qkv},
                          intermediate_key="ffn_hidden_size"),
    "bloom": _neox_style("self_attention", fused={"self_attention.query_key_value": _qkv_per_head},
                         intermediate_key=None),
    "starcoder2": Family(roles={"self_attn.q_proj": ATTN_IN, "self_attn.k_proj": ATTN_IN,
                                "self_attn.v_proj": ATTN_IN, "self_attn.o_proj": ATTN_OUT,
                                "mlp.c_fc": MLP_IN, "mlp.c_proj": MLP_OUT}, gated=False),
    "opt": Family(roles={"self_attn.q_proj": ATTN_IN, "self_attn.k_proj": ATTN_IN, "self_attn.v_proj": ATTN_IN,
                         "self_attn.out_proj": ATTN_OUT, "fc1": MLP_IN, "fc2": MLP_OUT},
                  gated=False, intermediate_key="ffn_dim"),
}


def stored_layout_is_in_out(model_type: str | None, fan_in_fan_out: bool = False) -> bool:
    """Whether a checkpoint of ``model_type`` stores block linear weights as ``[in, out]``.

    From the table (GPT-2's Conv1D); for a type not in the table, the adapter's own
    ``fan_in_fan_out`` flag is believed.
    """
    family = FAMILIES.get(model_type or "")
    return family.conv1d if family is not None else bool(fan_in_fan_out)


# ---- the description -----------------------------------------------------------------------
@dataclass(eq=False)
class LinearInfo:
    """One linear layer of a decoder block."""

    name: str          # full module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    local: str         # name inside the block, e.g. "self_attn.q_proj"
    block: int
    role: str          # one of ROLES, or "other"
    kind: str          # linear, conv1d, bnb8, bnb4
    in_features: int
    out_features: int
    fused: Fused | None
    module: nn.Module = field(repr=False)

    @property
    def fan_in_fan_out(self) -> bool:
        """The weight is stored ``[in, out]`` (Conv1D)."""
        return self.kind == "conv1d"

    @property
    def leaf(self) -> str:
        return self.local.rsplit(".", 1)[-1]


@dataclass(eq=False)
class MlpInfo:
    """A block's MLP: input linears (their output rows are channels), the output linear."""

    name: str                 # full name of the module holding the MLP linears
    module: nn.Module = field(repr=False)
    inputs: tuple[str, ...] = ()   # attribute names on ``module`` (gate, up; or one fused / plain)
    output: str = ""
    halves: dict[str, int] = field(default_factory=dict)  # per input: 2 for a fused gate/up
    gated: bool = False

    @property
    def intermediate(self) -> int:
        return features(getattr(self.module, self.output))[0]

    def channel_rows(self, attr: str, kept: torch.Tensor) -> torch.Tensor:
        """Output rows of input linear ``attr`` that hold channels ``kept`` (every half)."""
        n = self.intermediate
        h = self.halves.get(attr, 1)
        kept = torch.as_tensor(kept, dtype=torch.int64)
        return torch.cat([kept + j * n for j in range(h)])

    def channel_rows_for_size(self, attr: str, kept: torch.Tensor, rows: int) -> torch.Tensor:
        """As :meth:`channel_rows` for a tensor of ``rows`` output rows of the unsliced layer."""
        h = self.halves.get(attr, 1)
        kept = torch.as_tensor(kept, dtype=torch.int64)
        return torch.cat([kept + j * (rows // h) for j in range(h)])


@dataclass(eq=False)
class BlockInfo:
    name: str
    module: nn.Module = field(repr=False)
    linears: dict[str, LinearInfo] = field(default_factory=dict)  # by local name
    mlp: MlpInfo | None = None


@dataclass(eq=False)
class Architecture:
    """The description :func:`describe` returns."""

    model_type: str
    family: str | None            # the table entry used; None when discovered by type
    blocks: list[BlockInfo]
    hidden_size: int | None
    intermediate_key: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def discovered(self) -> bool:
        return self.family is None

    def linears(self, roles: Iterable[str] | None = None) -> dict[str, LinearInfo]:
        """Every block linear by full name (in block order), optionally only these roles."""
        roles = set(roles) if roles is not None else None
        return {info.name: info for b in self.blocks for info in b.linears.values()
                if roles is None or info.role in roles}

    def linear(self, name: str) -> LinearInfo | None:
        """The block linear of this full (or PEFT-prefixed) name, if any."""
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, LinearInfo]:
        cache = getattr(self, "_cache", None)
        if cache is None:
            cache = self._cache = self.linears()
        return cache

    def mlp_of(self, module_name: str) -> MlpInfo | None:
        """The MLP whose linears sit in ``module_name`` (e.g. 'model.layers.0.mlp')."""
        for b in self.blocks:
            if b.mlp is not None and b.mlp.name == module_name:
                return b.mlp
        return None

    def lora_targets(self, roles: Iterable[str] = (ATTN_IN, ATTN_OUT)) -> list[str]:
        """PEFT ``target_modules`` suffixes selecting exactly the linears of ``roles`` in every block.

        The shortest suffix of each local name that no other block linear shares (GPT-2's
        attention ``c_proj`` becomes ``attn.c_proj``, its MLP has one too).
        """
        roles = set(roles)
        out: set[str] = set()
        for b in self.blocks:
            locals_ = list(b.linears)
            for local, info in b.linears.items():
                if info.role not in roles:
                    continue
                parts = local.split(".")
                for k in range(1, len(parts) + 1):
                    suffix = ".".join(parts[-k:])
                    clash = [o for o in locals_ if o != local and (o == suffix or o.endswith("." + suffix))]
                    if not any(b.linears[o].role not in roles for o in clash):
                        out.add(suffix)
                        break
        return sorted(out)

    def summary(self) -> str:
        """One line: family, blocks and the linears of the first block with their roles."""
        how = f"family {self.family}" if self.family else "discovered by type"
        first = self.blocks[0]
        parts = []
        for info in first.linears.values():
            extra = f" {info.fused.describe()}" if info.fused else ""
            extra += " fan_in_fan_out" if info.fan_in_fan_out else ""
            parts.append(f"{info.local} ({info.role}{extra})")
        prefix = first.name.rsplit(".", 1)[0]
        return (f"model type {self.model_type!r} ({how}): {len(self.blocks)} decoder blocks at {prefix}; "
                f"linears {', '.join(parts)}")


def _peft_unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is not None and type(model).__module__.startswith("peft"):
        return inner
    return model


def _block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Outermost linears of a block by local name (a PEFT layer counts as its base layer)."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in block.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") and hasattr(mod, "base_layer") else None
        if base is not None and is_linear(base):
            found[name] = base
            skip.append(name)
        elif is_linear(mod):
            found[name] = mod
            skip.append(name)
    return found


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def _hidden(model: nn.Module) -> int | None:
    try:
        emb = model.get_input_embeddings()
        return int(emb.weight.shape[1])
    except (AttributeError, NotImplementedError):
        return None


def _what_found(model: nn.Module) -> str:
    lin = [n for n, m in model.named_modules() if is_linear(m)]
    lists = [f"{n} ({len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return (f"{len(lin)} linear layers ({', '.join(lin[:4])}{', …' if len(lin) > 4 else ''}); "
            f"module lists: {', '.join(lists[:3]) or 'none'}")


def _find_blocks(model: nn.Module, wanted: set[str] | None) -> tuple[str, nn.ModuleList] | None:
    """The decoder stack: the first ModuleList whose first item holds linears (the table's, if given)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            lin = _block_linears(module[0])
            if (wanted is not None and wanted & set(lin)) or (wanted is None and len(lin) >= 2):
                return name, module
    return None


def describe(model: nn.Module, *, warn: bool = True) -> Architecture:
    """Describe a loaded transformers causal LM (PEFT-wrapped models too; names stay bare).

    Raises UsageError when no decoder blocks are recognisable. With ``warn``, a model
    described by discovery (its ``model_type`` is not in :data:`FAMILIES`) raises an
    :class:`AdaptWarning` saying what was found.
    """
    model = _peft_unwrapped(model)
    model_type = _model_type(model)
    config = getattr(model, "config", None)
    family = FAMILIES.get(model_type)
    notes: list[str] = []
    found = _find_blocks(model, set(family.roles)) if family else None
    if family is not None and found is None:
        notes.append(f"model type {model_type!r} is in the table but its blocks do not use the table's names")
        family = None
    if found is None:
        found = _find_blocks(model, None)
    if found is None:
        raise UsageError(f"model type {model_type!r}: no recognisable decoder blocks (a list of blocks "
                         f"holding linear layers); found {_what_found(model)}")
    stack_name, stack = found
    hidden = _hidden(model)
    blocks = []
    for i, block in enumerate(stack):
        prefix = f"{stack_name}.{i}"
        lin = _block_linears(block)
        if family is not None:
            roles = {local: family.roles.get(local, "other") for local in lin}
            fused = {local: layout for local, layout in family.fused.items()}
        else:
            roles, fused = _discover_roles(lin, hidden), {}
        infos = {}
        for local, mod in lin.items():
            in_f, out_f = features(mod)
            layout = fused.get(local)
            fz = layout(config, out_f) if layout is not None else None
            if fz is not None and fz.width != out_f:
                notes.append(f"{prefix}.{local}: fused layout {fz.describe()} does not fit {out_f} outputs; "
                             "treated as one part")
                fz = None
            infos[local] = LinearInfo(name=f"{prefix}.{local}", local=local, block=i, role=roles[local],
                                      kind=linear_kind(mod), in_features=in_f, out_features=out_f, fused=fz,
                                      module=mod)
        blocks.append(BlockInfo(prefix, block, infos, _mlp_info(prefix, block, infos, family)))
    key = family.intermediate_key if family is not None else _guess_intermediate_key(config, blocks)
    arch = Architecture(model_type, model_type if family is not None else None, blocks, hidden, key, notes)
    if family is None and warn:
        warnings.warn(f"{arch.summary()} (not in the architecture table; roles guessed by type and name)",
                      AdaptWarning, stacklevel=2)
    return arch


_ATTN_PARENT = re.compile(r"(^|\.)(self_)?(attn|attention|self_attention|attn_layer|mixer)(\.|$)", re.I)
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj", "out")
_FUSED_NAMES = ("qkv", "query_key_value", "c_attn", "wqkv", "in_proj", "qkv_proj")


def _discover_roles(lin: dict[str, nn.Module], hidden: int | None) -> dict[str, str]:
    """Roles of a block's linears by type, shape and name (see the module docstring)."""
    roles: dict[str, str] = {}
    attn = [local for local in lin if _ATTN_PARENT.search(local.rsplit(".", 1)[0] if "." in local else "")]
    rest = [local for local in lin if local not in attn]
    if attn:
        outs = [a for a in attn if a.rsplit(".", 1)[-1].lower() in _OUT_NAMES]
        out = outs[-1] if outs else attn[-1]
        for a in attn:
            roles[a] = ATTN_OUT if a == out else ATTN_IN
    if hidden is None and rest:
        hidden = Counter(features(lin[r])[0] for r in rest).most_common(1)[0][0]
    for r in rest:
        in_f, out_f = features(lin[r])
        if in_f == hidden and out_f != hidden:
            roles[r] = MLP_IN
        elif out_f == hidden and in_f != hidden:
            roles[r] = MLP_OUT
        else:
            roles[r] = "other"
    return roles


def _mlp_info(prefix: str, block: nn.Module, infos: dict[str, LinearInfo], family: Family | None) -> MlpInfo | None:
    """The block's MLP pairing, when it has one output linear and its inputs share its parent."""
    outs = [i for i in infos.values() if i.role == MLP_OUT]
    ins = [i for i in infos.values() if i.role == MLP_IN]
    if len(outs) != 1 or not ins:
        return None
    out = outs[0]
    parent = out.local.rsplit(".", 1)[0] if "." in out.local else ""
    if any((i.local.rsplit(".", 1)[0] if "." in i.local else "") != parent for i in ins):
        return None
    n = out.in_features
    halves = {}
    for i in ins:
        if i.out_features == n:
            halves[i.leaf] = 1
        elif i.out_features == 2 * n:
            halves[i.leaf] = 2
        else:
            return None
    module = block.get_submodule(parent) if parent else block
    if family is not None:
        gated = family.gated
    else:
        gated = len(ins) == 2 or any(h == 2 for h in halves.values())
    ordered = sorted(halves, key=lambda leaf: (0 if "gate" in leaf else 1))
    return MlpInfo(name=f"{prefix}.{parent}" if parent else prefix, module=module, inputs=tuple(ordered),
                   output=out.leaf, halves=halves, gated=gated)


def _guess_intermediate_key(config, blocks: list[BlockInfo]) -> str | None:
    mlp = blocks[0].mlp
    if mlp is None or config is None:
        return None
    for key in INTERMEDIATE_KEYS:
        if getattr(config, key, None) == mlp.intermediate:
            return key
    return None


def set_intermediate_size(model: nn.Module, arch: Architecture, size: int) -> None:
    """Record a new MLP width in the model's config (and on MLP modules that keep one)."""
    if arch.intermediate_key is None:
        raise UsageError(f"model type {arch.model_type!r}: no config key holds the MLP width, so a model "
                         "with fewer MLP channels could not be loaded again")
    setattr(model.config, arch.intermediate_key, int(size))
    for b in arch.blocks:
        if b.mlp is not None and hasattr(b.mlp.module, "intermediate_size"):
            b.mlp.module.intermediate_size = int(size)


def context_length(config) -> int | None:
    """The number of positions the model was built for (from its config), or None when unknown."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


__all__ = ["describe", "Architecture", "BlockInfo", "LinearInfo", "MlpInfo", "Fused", "Family", "FAMILIES",
           "ROLES", "ATTN_IN", "ATTN_OUT", "MLP_IN", "MLP_OUT", "linear_kind", "is_linear", "features",
           "fan_in_fan_out", "weight_out_in", "to_weight_layout", "set_intermediate_size",
           "stored_layout_is_in_out", "context_length"]
