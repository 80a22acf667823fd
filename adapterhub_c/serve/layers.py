"""Our own multi-adapter linear layer: one base layer, any resident adapter per batch row.

Every linear layer of the served model (but the output head) is wrapped once, at start,
in :class:`MultiAdapterLinear`; the wrapper holds a reference to the original layer (plain
``nn.Linear`` or a bitsandbytes one), never a copy. Adapters stay outside the model as
:class:`AdapterWeights` (LoRA factors + recovery modules per module name); a forward reads
which rows use which adapter from the :class:`Router`'s current :class:`BatchContext`.
Switching adapters is therefore a pointer change: nothing is copied into the model.

The arithmetic is PEFT's and the recovery hook's, in the same order, so a row served
alone gives the same numbers as ``adapt generate``:

    out = base(x);  out = out + lora_B(lora_A(x)) · scale;  out = out + R(x)
    R(x) = act(x @ Dᵀ) @ Uᵀ · scale_R       (adapters.recovery.recovery_forward, the one definition)

Rows of one batch are sorted by adapter, so each adapter's rows are one contiguous slice.
With few distinct adapters in a batch each slice gets its own two matmuls ("grouped");
with more (``GATHER_MIN`` or more) the LoRA part runs as two batched matmuls over per-row
gathered factors, ranks zero-padded to the largest ("gathered", as Punica / S-LoRA's
BGMV); recovery modules always run per slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterhub_c.adapters.recovery import recovery_forward

GATHER_MIN = 4  # distinct adapters in a batch from which the LoRA part is gathered


@dataclass
class LoraPart:
    A: torch.Tensor          # [r, in]
    B: torch.Tensor          # [out, r]
    scale: float
    bias: torch.Tensor | None = None


@dataclass
class RecoveryPart:
    D: torch.Tensor          # [r, in]
    U: torch.Tensor          # [out, r]
    scale: float
    act: str


@dataclass
class AdapterWeights:
    """A resident adapter: LoRA parts and recovery parts by (model) module name."""

    key: str
    name: str
    lora: dict[str, LoraPart] = field(default_factory=dict)
    recovery: dict[str, RecoveryPart] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        total = 0
        for p in self.lora.values():
            total += p.A.nbytes + p.B.nbytes + (p.bias.nbytes if p.bias is not None else 0)
        for p in self.recovery.values():
            total += p.D.nbytes + p.U.nbytes
        return total

    def modules(self) -> set[str]:
        return set(self.lora) | set(self.recovery)


@dataclass
class PromptWeights:
    """A resident soft prompt: ``k`` embeddings [k, hidden]."""

    key: str
    name: str
    embeddings: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.embeddings.nbytes

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


def recovery_part_forward(x: torch.Tensor, part: RecoveryPart) -> torch.Tensor:
    """R(x) of a resident recovery part: :func:`~adapterhub_c.adapters.recovery.recovery_forward`
    (the training module's own function) in eval mode."""
    return recovery_forward(x, part.D, part.U, part.scale, part.act)


def lora_forward(x: torch.Tensor, part: LoraPart) -> torch.Tensor:
    """lora_B(lora_A(x)) · scale, as PEFT's LoRA layer (x cast to the factors' dtype)."""
    return F.linear(F.linear(x.to(part.A.dtype), part.A), part.B, part.bias) * part.scale


@dataclass
class _Group:
    start: int
    stop: int
    lora: LoraPart | None
    recovery: RecoveryPart | None


@dataclass
class _Plan:
    groups: list[_Group]
    rows: int
    gathered: tuple | None = None  # (A_rows [B, R, in], B_rows [B, out, R], bias_rows | None, scale_rows [B, 1, 1])


class BatchContext:
    """Which adapter each row of the current batch uses (rows sorted by adapter)."""

    def __init__(self, rows: list[AdapterWeights | None], gather_min: int = GATHER_MIN):
        self.rows = list(rows)
        self.gather_min = gather_min
        self.slices: list[tuple[int, int, AdapterWeights | None]] = []
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] is not rows[start]:
                self.slices.append((start, i, rows[start]))
                start = i
        keys = [(w.key if w is not None else None) for w in rows]
        if len(set(keys)) != len(self.slices):
            raise ValueError("batch rows must be sorted by adapter")
        self._plans: dict[str, _Plan | None] = {}

    @property
    def distinct(self) -> int:
        return sum(1 for _, _, w in self.slices if w is not None)

    def plan(self, module: str) -> _Plan | None:
        try:
            return self._plans[module]
        except KeyError:
            pass
        groups = []
        for start, stop, w in self.slices:
            if w is None:
                continue
            lora, rec = w.lora.get(module), w.recovery.get(module)
            if lora is not None or rec is not None:
                groups.append(_Group(start, stop, lora, rec))
        plan = _Plan(groups, len(self.rows)) if groups else None
        if plan is not None and sum(g.lora is not None for g in groups) >= self.gather_min:
            plan.gathered = _gather(plan, len(self.rows))
        self._plans[module] = plan
        return plan


def _gather(plan: _Plan, n_rows: int) -> tuple:
    """Per-row LoRA factors for one module (zero for rows without one), ranks zero-padded."""
    parts = [g.lora for g in plan.groups if g.lora is not None]
    ref = parts[0]
    rank = max(p.A.shape[0] for p in parts)
    d_in, d_out = ref.A.shape[1], ref.B.shape[0]
    dev, dt = ref.A.device, ref.A.dtype
    A = torch.zeros(n_rows, rank, d_in, device=dev, dtype=dt)
    B = torch.zeros(n_rows, d_out, rank, device=dev, dtype=dt)
    scale = torch.zeros(n_rows, 1, 1, device=dev, dtype=dt)
    has_bias = any(p.bias is not None for p in parts)
    bias = torch.zeros(n_rows, 1, d_out, device=dev, dtype=dt) if has_bias else None
    for g in plan.groups:
        p = g.lora
        if p is None:
            continue
        r = p.A.shape[0]
        A[g.start:g.stop, :r] = p.A
        B[g.start:g.stop, :, :r] = p.B
        scale[g.start:g.stop] = p.scale
        if p.bias is not None:
            bias[g.start:g.stop, 0] = p.bias
    return A.transpose(1, 2), B.transpose(1, 2), bias, scale


class Router:
    """Holds the batch context the wrapped layers read during a forward (one engine thread)."""

    def __init__(self):
        self.context: BatchContext | None = None

    def plan(self, module: str) -> _Plan | None:
        ctx = self.context
        return None if ctx is None else ctx.plan(module)


class MultiAdapterLinear(nn.Module):
    """``base_layer(x)`` plus, per row, that row's adapter's LoRA and recovery at this module."""

    def __init__(self, base_layer: nn.Module, name: str, router: Router):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self._router = router

    # what callers of a linear layer read
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        plan = self._router.plan(self.module_name)
        if plan is None:
            return out
        if x.shape[0] != plan.rows:
            raise RuntimeError(f"{self.module_name}: batch of {x.shape[0]} rows, context of {plan.rows}")
        dtype = out.dtype
        if len(plan.groups) == 1 and plan.groups[0].start == 0 and plan.groups[0].stop == plan.rows:
            g = plan.groups[0]  # the whole batch on one adapter: PEFT's exact sequence of operations
            if g.lora is not None:
                out = (out + lora_forward(x, g.lora)).to(dtype)
            if g.recovery is not None:
                out = out + recovery_part_forward(x, g.recovery).to(dtype)
            return out
        out = out.clone()
        if plan.gathered is not None:
            A, B, bias, scale = plan.gathered
            d = torch.bmm(torch.bmm(x.to(A.dtype).reshape(x.shape[0], -1, x.shape[-1]), A), B)
            if bias is not None:
                d = d + bias
            out = (out + (d * scale).reshape(out.shape)).to(dtype)
        for g in plan.groups:
            if plan.gathered is None and g.lora is not None:
                out[g.start:g.stop] = (out[g.start:g.stop] + lora_forward(x[g.start:g.stop], g.lora)).to(dtype)
            if g.recovery is not None:
                out[g.start:g.stop] = out[g.start:g.stop] + recovery_part_forward(x[g.start:g.stop], g.recovery).to(dtype)
        return out


def wrap_linears(model: nn.Module, router: Router) -> dict[str, MultiAdapterLinear]:
    """Wrap every ``nn.Linear`` (bnb layers included) but the output head, in place.

    Returns {module name: wrapper}; names are the bare model's (``model.layers.0.mlp.up_proj``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head and n.split(".")[-1] != "lm_head"]
    wrapped = {}
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiAdapterLinear(module, name, router)
        setattr(parent, leaf, wrapper)
        wrapped[name] = wrapper
    return wrapped
