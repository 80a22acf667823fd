"""Compensated conversion: fold a variant's compression error into one plain LoRA (after EoRA).

For every compensated linear layer the converted adapter's update ΔW' is the best
rank-k approximation, in the norm weighted by the calibration inputs' second moment, of

    D = (W + s·B·A) − Ŵ

W: the base weight; s·B·A: the source LoRA's update (0 where it has none); Ŵ: the
variant's effective weight as the variant computes it (``effective_weight``: the
dequantized weight of a bitsandbytes layer, the masked weight of a pruned one; for
``ffn-channels`` variants W and s·B·A are sliced to the kept channels first);
k = r + R (r: the source's rank on that layer, 0 where it has none; R: the extra rank),
clamped to min(out, in).

The weighted norm is ||E||_C = ||E·C^{1/2}||_F with C = XᵀX / n the second moment of the
layer's n calibration inputs X (rows are tokens): ||E·x||² summed over the calibration
tokens, i.e. the error of the layer's output. Solution (Eckart–Young in the weighted
space): with the eigendecomposition C = Q·diag(e)·Qᵀ and S = Q·diag(√e) (S·Sᵀ = C),
M = D·S, truncated SVD M ≈ U_k·Σ_k·V_kᵀ, then

    B' = U_k·Σ_k,   A' = V_kᵀ·S⁻¹ = V_kᵀ·diag(1/√e)·Qᵀ,   ΔW' = B'·A',

stored re-balanced (``balanced``: the same ΔW', both factors √Σ-scaled) so that distillation
can start from them.

The PEFT scaling is folded into the factors: every layer gets lora_alpha = its rank
(scale 1), ``rank_pattern`` / ``alpha_pattern`` where the ranks differ.

Regularisation (always, so the solve is defined whatever the calibration set): C is
replaced by C + λ·mean(diag C)·I with λ = ``REG_LAMBDA`` = 0.01, GPTQ's dampening of the
same XᵀX matrix. Since C + δI has C's eigenvectors and eigenvalues e + δ, the cached
eigendecomposition serves any λ. With fewer calibration tokens than input features the
raw moment is rank-deficient: the same regularised solve applies and a warning names
the layers (``AdaptWarning``). An all-zero moment (no signal) falls back to C = I
(plain Frobenius). Everything is computed in float64; the factors are stored in float32.

Pure domain code: tensors in, a ``LoraAdapter`` out; the moments come from
``collect_moments`` (forward hooks on the variant), the caller caches them.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from adapterhub_c.adapters.lora import MAGNITUDE, LoraAdapter, LoraLayer
from adapterhub_c.adapters.slicing import slice_lora_layer, slice_to_variant
from adapterhub_c.errors import AdaptWarning, UsageError
from adapterhub_c.models.arch import (
    ATTN_IN,
    ATTN_OUT,
    MLP_IN,
    ROLES,
    Architecture,
    describe,
    features,
    linear_kind,
    weight_out_in,
)
from adapterhub_c.progress import Progress
from adapterhub_c.variants.calibration import length_batches, normalise_calibration
from adapterhub_c.variants.pruning import target_linears
from adapterhub_c.variants.quantize import dequantize_linear, is_bnb_linear

REG_LAMBDA = 0.01
TARGET_SETS = {"attn": (ATTN_IN, ATTN_OUT), "all": ROLES}  # roles of models/arch.py
# roles whose linears in one block read the very same input tensor (q/k/v, gate/up; verified while collecting)
SHARED_INPUT_ROLES = (ATTN_IN, MLP_IN)
DEFAULT_LORA = {"peft_type": "LORA", "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"}



# ---------------------------------------------------------------------------------------
# activation moments


@dataclass
class Moment:
    """The second moment C = XᵀX / n of one input, held as its eigendecomposition C = Q·diag(e)·Qᵀ."""

    Q: torch.Tensor        # [d, d], orthonormal columns
    e: torch.Tensor        # [d], eigenvalues (float64, ascending, clipped at 0)
    tokens: int

    @classmethod
    def from_matrix(cls, C: torch.Tensor, tokens: int, q_dtype: torch.dtype = torch.float64) -> "Moment":
        """Eigendecomposition in float64; Q kept in ``q_dtype`` (float32 halves the memory and the cache)."""
        C = C.double()
        if not torch.isfinite(C).all():
            raise UsageError("the calibration activations contain NaN or infinite values")
        e, Q = torch.linalg.eigh((C + C.T) / 2)
        return cls(Q=Q.to(q_dtype), e=e.clamp_min(0.0), tokens=int(tokens))

    @property
    def dim(self) -> int:
        return self.e.numel()

    def matrix(self) -> torch.Tensor:
        """C in float64."""
        Q = self.Q.double()
        return (Q * self.e) @ Q.T

    def factors(self, reg: float = REG_LAMBDA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q, √e_reg, e_reg) of the regularised moment C + reg·mean(diag C)·I (float64).

        An all-zero moment becomes the identity (plain Frobenius norm)."""
        Q, e = self.Q.double(), self.e.double()
        mean_diag = float(e.sum()) / max(1, e.numel())  # trace / d = mean(diag C)
        if not mean_diag > 0:
            e = torch.ones_like(e)
        else:
            e = e + reg * mean_diag
        return Q, e.sqrt(), e


@dataclass
class Moments:
    """Second moments of the calibration inputs of a model's linears.

    ``groups``: module name → group key (linears reading the same input share one moment);
    ``moments``: group key → Moment."""

    groups: dict[str, str]
    moments: dict[str, Moment]

    def __contains__(self, module: str) -> bool:
        return module in self.groups

    def __getitem__(self, module: str) -> Moment:
        return self.moments[self.groups[module]]


def _input_groups(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Module name → the key of the input it shares: the attention (or MLP) input linears of one
    block by models/arch.py's roles (Llama's q/k/v, Phi-3's fused qkv alone, GPT-2's c_attn, …);
    every other linear its own name. Only a guess: ``collect_moments`` checks it on every call."""
    groups = {name: name for name in names}
    for info in describe(model, warn=False).linears(SHARED_INPUT_ROLES).values():
        if info.name in names:
            groups[info.name] = f"block{info.block}:{info.role}"
    members: dict[str, int] = {}
    for g in groups.values():
        members[g] = members.get(g, 0) + 1
    return {name: (g if members[g] > 1 else name) for name, g in groups.items()}


class _MomentSums:
    """The running XᵀX sums of one :func:`collect_moments` pass, and the hooks that feed them.

    ``groups``: module → group key (a module that turns out to see an input of its own is
    moved to a group of its own); the first module of a group to run in a forward
    accumulates the group's input, the others check they received that very tensor."""

    def __init__(self, groups: dict[str, str]):
        self.groups = groups
        self.members: dict[str, set[str]] = {}
        for name, g in groups.items():
            self.members.setdefault(g, set()).add(name)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}                      # group → the module that accumulates it
        self.live: dict[str, tuple[torch.Tensor, set]] = {}  # group → (input of this forward, members seen)

    def accumulate(self, key: str, x: torch.Tensor) -> None:
        """Add ``x``'s rows (tokens) to the sum of ``key``, in float64."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        if key in self.sums:
            self.sums[key] += xtx
        else:
            self.sums[key] = xtx
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def hook(self, name: str):
        """The forward pre-hook of module ``name``."""
        def hook(_mod, args):
            self.seen(name, args[0])  # the very object: q/k/v of one block receive the same tensor
        return hook

    def seen(self, name: str, x: torch.Tensor) -> None:
        """Module ``name`` is called with input ``x``."""
        g = self.groups[name]
        self.owner.setdefault(g, name)
        if self.owner[g] == name:
            self.accumulate(g, x)
            self.live[g] = (x, {name})
        elif g in self.live and self.live[g][0] is x:
            self.live[g][1].add(name)
        else:  # this model gives it an input of its own
            self.groups[name] = name
            self.members[g].discard(name)
            self.members[name] = {name}
            self.accumulate(name, x)
        if g in self.live and self.live[g][1] >= self.members[g]:
            del self.live[g]

    def moments(self, progress: Progress | None) -> Moments:
        """The eigendecomposed moments (the sums are released as they go)."""
        moments, total = {}, len(self.sums)
        for i, key in enumerate(list(self.sums)):
            # Q in float32, as the cache stores it: a fresh and a cached conversion give the same adapter
            moments[key] = Moment.from_matrix(self.sums.pop(key) / self.counts[key], self.counts[key],
                                              q_dtype=torch.float32)
            if progress:
                progress("eigendecomposition", i + 1, total)
        return Moments(groups=self.groups, moments=moments)


@torch.no_grad()
def collect_moments(model: nn.Module, rows: list[torch.Tensor], modules: Mapping[str, nn.Module] | None = None,
                    batch_size: int = 8, progress: Progress | None = None) -> Moments:
    """XᵀX / n of the input of every named linear (default: the decoder-block projections).

    One forward pass over the calibration rows (input_ids, [T] or [1, T] each); q/k/v (and gate/up)
    share one moment when the model really feeds them the same tensor (checked on every
    call; a module that sees another input gets its own). Accumulated in float64."""
    rows = normalise_calibration(rows)
    if not rows:
        raise UsageError("calibration data is empty")
    modules = dict(target_linears(model) if modules is None else modules)
    if not modules:
        raise UsageError("the model has no linear layers to compensate")
    sums = _MomentSums(_input_groups(model, set(modules)))
    device = next(model.parameters()).device
    handles = [mod.register_forward_pre_hook(sums.hook(name)) for name, mod in modules.items()]
    try:
        batches = list(length_batches(rows, batch_size))
        for i, batch in enumerate(batches):
            model(input_ids=batch.to(device), use_cache=False)
            sums.live.clear()
            if progress:
                progress("calibration moments", i + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    return sums.moments(progress)


# ---------------------------------------------------------------------------------------
# effective weights


def effective_weight(module: nn.Module, name: str = "") -> torch.Tensor:
    """The float32 [out, in] weight a linear layer computes with: bitsandbytes layers
    dequantized, plain ``nn.Linear`` as stored (pruned ones hold their zeros), a ``Conv1D``'s
    ``[in, out]`` weight transposed.

    Anything else (an unknown quantizer's layer) is refused: its weight cannot be read."""
    _check_kind(module, name)
    w = dequantize_linear(module) if is_bnb_linear(module) else weight_out_in(module).detach().float()
    d_in, d_out = features(module)
    if w.dim() != 2 or tuple(w.shape) != (d_out, d_in) or not torch.isfinite(w).all():
        raise UsageError(f"cannot read the effective weight of {name or 'a layer'}: got shape "
                         f"{tuple(w.shape)} for a {d_out}×{d_in} layer")
    return w


def check_readable(model: nn.Module, names: Iterable[str]) -> None:
    """UsageError naming the first layer whose effective weight ``effective_weight`` cannot read."""
    mods = dict(model.named_modules())
    for name in names:
        module = mods.get(name)
        if module is None:
            raise UsageError(f"the variant has no layer {name}")
        _check_kind(module, name)


def _check_kind(module: nn.Module, name: str) -> None:
    if not (is_bnb_linear(module) or type(module) is nn.Linear or linear_kind(module) == "conv1d"):
        kind = type(module)
        raise UsageError(f"cannot read the effective weight of {name or 'a layer'} ({kind.__module__}."
                         f"{kind.__name__}): not a plain or bitsandbytes linear (unknown quantizer)")


# ---------------------------------------------------------------------------------------
# the weighted low-rank solve


@dataclass
class Factors:
    """ΔW' = B·A of one layer and how much of the weighted target it captures."""

    B: torch.Tensor     # [out, k] float64
    A: torch.Tensor     # [k, in] float64
    energy: float       # ||D||_C²
    residual: float     # ||D − B·A||_C² (the discarded singular values)

    @property
    def captured(self) -> float:
        return 1.0 - self.residual / self.energy if self.energy > 0 else 1.0


@torch.no_grad()
def weighted_lowrank(D: torch.Tensor, moment: Moment | None, rank: int, reg: float = REG_LAMBDA) -> Factors:
    """Best rank-``rank`` approximation of ``D`` in the norm ||E·C^{1/2}||_F (C regularised).

    ``moment=None``: C = I (plain truncated SVD). Float64 throughout."""
    D = D.double()
    out_f, in_f = D.shape
    if rank < 1 or rank > min(out_f, in_f):
        raise UsageError(f"rank {rank} is outside 1..{min(out_f, in_f)} for a {out_f}×{in_f} layer")
    if moment is None:
        M = D
    else:
        if moment.dim != in_f:
            raise UsageError(f"the calibration moment has {moment.dim} features, the layer {in_f} inputs")
        Q, root, _ = moment.factors(reg)
        M = (D @ Q) * root          # D·S, S = Q·diag(√e)
    U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
    B = U[:, :rank] * sigma[:rank]
    A = Vh[:rank]
    if moment is not None:
        A = (A / root) @ Q.T        # V_kᵀ·S⁻¹ = V_kᵀ·diag(1/√e)·Qᵀ
    sq = sigma.pow(2)
    return Factors(B=B, A=A, energy=float(sq.sum()), residual=float(sq[rank:].sum()))


@torch.no_grad()
def balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B'·A' = B·A, both √Σ-scaled factors of its thin SVD (U·√Σ, √Σ·Vᵀ; float64).

    Why: the weighted solve's own factors (B = U·Σ, A = Vᵀ·S⁻¹) are far apart in size, and
    Adam moves every entry by about the learning rate whatever its size; distilling from them
    wrecked the compensation (SmolLM2 NF4 + Wanda, reverse-words, R = 64, 20 steps at 1e-3:
    exact match 0.40 before training, 0.00 after; from the balanced pair 0.56)."""
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s.sqrt()
    return (root[:, None] * vh) @ qa.T, (qb @ u) * root


# ---------------------------------------------------------------------------------------
# the whole adapter


@dataclass
class Compensation:
    """The compensated adapter (PEFT LoRA on the variant) and a per-layer account."""

    adapter: LoraAdapter
    layers: dict[str, dict] = field(default_factory=dict)   # module → {rank, source_rank, captured}
    clamped: list[str] = field(default_factory=list)
    rank_deficient: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)        # nothing to compensate (D = 0)
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        caps = [v["captured"] for v in self.layers.values() if v.get("captured") is not None]
        return {"layers": len(self.layers), "ranks": sorted({v["rank"] for v in self.layers.values()}),
                "captured_mean": sum(caps) / len(caps) if caps else None,
                "captured_min": min(caps) if caps else None,
                "clamped": list(self.clamped), "rank_deficient": list(self.rank_deficient),
                "skipped": list(self.skipped), "reg_lambda": REG_LAMBDA, "wall_s": round(self.wall_s, 2)}


def compensation_targets(model: nn.Module, targets: str | Iterable[str] = "all") -> list[str]:
    """Names of the variant's decoder-block linears selected by ``targets`` ("attn", "all" or leaf names)."""
    if isinstance(targets, str):
        if targets not in TARGET_SETS:
            raise UsageError(f"--targets must be one of {', '.join(TARGET_SETS)} (got {targets!r})")
        wanted = TARGET_SETS[targets]
        names = list(describe(model).linears(wanted))
    else:
        wanted = tuple(targets)
        names = [n for n in target_linears(model) if n.rpartition(".")[2] in wanted]
    if not names:
        raise UsageError(f"the model has no {'/'.join(wanted)} layers to compensate")
    return names


def _names(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:6]) + (f" (and {len(names) - 6} more)" if len(names) > 6 else "")


@dataclass
class _Job:
    """What every layer of one :func:`compensate` call needs."""

    base: dict[str, nn.Module]
    variant: dict[str, nn.Module]
    moments: Moments | None
    extra_rank: int
    kept_indices: Mapping[str, torch.Tensor] | None
    arch: Architecture | None
    result: Compensation


@torch.no_grad()
def compensate(base_model: nn.Module, variant_model: nn.Module, source: LoraAdapter | None,
               moments: Moments | None, extra_rank: int, targets: str | Iterable[str] = "all",
               kept_indices: Mapping[str, torch.Tensor] | None = None,
               progress: Progress | None = None) -> Compensation:
    """The compensated LoRA of ``source`` (None: the compensation of the variant alone) on the variant.

    ``base_model`` / ``variant_model``: unwrapped transformers models (module names as in
    the source's PEFT keys without ``base_model.model.``); ``moments``: from
    ``collect_moments`` on the variant (None: C = I). The source's modules outside the
    compensated ``targets`` are carried as they are (sliced for ffn-channels). A DoRA
    source's update is its weight-space ΔW (``LoraLayer.dora_delta`` on the base weight,
    as the merges take it), folded into the solve like a LoRA's s·B·A; the output is one
    plain LoRA without magnitude vectors, so every DoRA layer must be compensated. Warns
    (``AdaptWarning``) naming the layers whose rank was clamped and those whose moment
    was rank-deficient. Returns the adapter with its scaling folded in (alpha = rank)."""
    if extra_rank < 1:
        raise UsageError(f"--recover-rank must be >= 1 (got {extra_rank})")
    t0 = time.perf_counter()
    wanted = compensation_targets(variant_model, targets)
    src_layers = source.layers() if source is not None else {}
    job = _Job(dict(base_model.named_modules()), dict(variant_model.named_modules()), moments, extra_rank,
               kept_indices, describe(variant_model, warn=False) if kept_indices else None,
               Compensation(adapter=None))  # type: ignore[arg-type]
    _check_source(job, src_layers, wanted)
    check_readable(variant_model, wanted)
    layers: dict[str, LoraLayer] = {}
    todo = list(dict.fromkeys(wanted + sorted(src_layers)))
    for i, name in enumerate(todo):
        layer = _compensated(job, name, src_layers.get(name)) if name in wanted else \
            _carried_over(job, name, src_layers[name])
        if layer is not None:
            layers[name] = layer
            if progress and name in wanted:
                progress("compensation", i + 1, len(todo))
    if not layers:
        raise UsageError("nothing to compensate: the variant computes exactly the base's weights "
                         "and there is no source adapter")
    _warn(job.result, moments)
    job.result.adapter = _adapter(layers, source, variant_model)
    job.result.wall_s = time.perf_counter() - t0
    return job.result


def _check_source(job: _Job, src_layers: dict[str, LoraLayer], wanted: list[str]) -> None:
    """The source's modules exist in both models; its DoRA layers are all among the compensated ones."""
    unknown = [m for m in src_layers if m not in job.variant or m not in job.base]
    if unknown:
        raise UsageError(f"the adapter targets modules the variant does not have: {_names(unknown)}")
    outside = [m for m, layer in src_layers.items() if layer.is_dora and m not in wanted]
    if outside:
        raise UsageError(f"the adapter is DoRA and --targets leaves out its layers {_names(outside)}: a DoRA "
                         "update lives in weight space and the converted adapter is one plain LoRA, so every "
                         "DoRA layer must be compensated; use --targets all (or convert without --recover lowrank)")


def _carried_over(job: _Job, name: str, src: LoraLayer) -> LoraLayer:
    """A source layer outside the compensated set: its own factors (sliced)."""
    job.result.layers[name] = {"rank": src.rank, "source_rank": src.rank, "captured": None}
    return _carried(src, name, job.kept_indices, job.arch)


def _target(job: _Job, name: str, src: LoraLayer | None) -> torch.Tensor:
    """D = (W + ΔW) − Ŵ of one layer, float64 (ΔW: s·B·A, or a DoRA layer's weight-space update on W)."""
    W_full = effective_weight(job.base[name], name).double()
    W = slice_to_variant(W_full, name, job.kept_indices, job.arch)
    W_hat = effective_weight(job.variant[name], name).double()
    if W.shape != W_hat.shape:
        raise UsageError(f"{name}: the variant's weight is {tuple(W_hat.shape)} but the base's "
                         f"{tuple(W.shape)} (an ffn-channels variant needs its kept indices)")
    D = W - W_hat
    if src is not None:  # DoRA: its norms are the full base rows', so ΔW is taken before slicing
        D = D + slice_to_variant(src.dora_delta(W_full, torch.float64), name, job.kept_indices, job.arch)
    return D


def _moment(job: _Job, name: str) -> Moment | None:
    """The layer's calibration moment (None: C = I), noting a rank-deficient one."""
    if job.moments is None:
        return None
    if name not in job.moments:
        raise UsageError(f"no calibration moment for {name}")
    moment = job.moments[name]
    if moment.tokens < moment.dim:
        job.result.rank_deficient.append(name)
    return moment


def _compensated(job: _Job, name: str, src: LoraLayer | None) -> LoraLayer | None:
    """The compensated layer of ``name`` (None when there is nothing to compensate: D = 0)."""
    D = _target(job, name, src)
    if not torch.any(D != 0):
        job.result.skipped.append(name)
        return None
    r = src.rank if src is not None else 0
    k = r + job.extra_rank
    if k > min(D.shape):
        job.result.clamped.append(name)
        k = min(D.shape)
    f = weighted_lowrank(D, _moment(job, name), k, REG_LAMBDA)
    if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all()):
        raise UsageError(f"{name}: the compensation is not finite (degenerate calibration moment)")
    bias = _carried(src, name, job.kept_indices, job.arch).bias if src is not None else None
    A, B = balanced(f.A, f.B)
    job.result.layers[name] = {"rank": k, "source_rank": r, "captured": f.captured}
    return LoraLayer(A=A.float().contiguous(), B=B.float().contiguous(), scale=1.0, bias=bias)


def _warn(result: Compensation, moments: Moments | None) -> None:
    """Word the clamped and rank-deficient layers into ``result.warnings`` and warn them."""
    if result.clamped:
        result.warnings.append(f"--recover-rank: rank clamped to min(out, in) on {len(result.clamped)} layer(s): "
                               f"{_names(result.clamped)}")
    if result.rank_deficient:
        tokens = min(moments[n].tokens for n in result.rank_deficient)
        dims = max(moments[n].dim for n in result.rank_deficient)
        result.warnings.append(
            f"calibration too short for a full-rank activation moment ({tokens} tokens < {dims} input features) "
            f"on {len(result.rank_deficient)} layer(s): {_names(result.rank_deficient)}; solved with "
            f"C + {REG_LAMBDA:g}·mean(diag C)·I (give more --calib-samples)")
    for message in result.warnings:
        warnings.warn(message, AdaptWarning, stacklevel=3)


def _adapter(layers: dict[str, LoraLayer], source: LoraAdapter | None, variant_model: nn.Module) -> LoraAdapter:
    """The plain PEFT LoRA of ``layers`` on the variant, the source's config and side tensors kept
    (``modules_to_save`` copies; never a DoRA magnitude: the output is plain LoRA)."""
    config = {k: v for k, v in (source.config if source is not None else DEFAULT_LORA).items()
              if k not in ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")}
    adapter = LoraAdapter.from_layers(layers, config)
    adapter.config["target_modules"] = exact_targets(adapter.config["target_modules"], list(layers), variant_model)
    if source is not None:  # modules_to_save copies and the like travel unchanged
        adapter.tensors.update({k: v for k, v in source.tensors.items()
                                if not k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_B.bias",
                                                   f".{MAGNITUDE}"))})
    return adapter


def _carried(src: LoraLayer, name: str, kept_indices, arch: Architecture | None) -> LoraLayer:
    """The source's own factors of ``name`` (plain LoRA), sliced to an ffn-channels variant's kept channels."""
    sliced = slice_lora_layer(src, name, kept_indices, arch)
    return LoraLayer(A=sliced.A, B=sliced.B, scale=src.scale, bias=sliced.bias)


def exact_targets(leaves: list[str], modules: list[str], model: nn.Module) -> list[str]:
    """``leaves`` when they select exactly ``modules`` among the model's linears, else the full names
    (so plain PEFT attaches no extra, empty LoRA)."""
    chosen = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in leaves}
    return sorted(leaves) if chosen == set(modules) else sorted(modules)


__all__ = ["REG_LAMBDA", "TARGET_SETS", "Moment", "Moments", "collect_moments", "effective_weight",
           "slice_to_variant", "weighted_lowrank", "balanced", "Factors", "Compensation", "compensate",
           "compensation_targets", "exact_targets", "check_readable"]
