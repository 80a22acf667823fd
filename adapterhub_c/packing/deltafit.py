"""``delta-fit``: ternary packs of LoRA factors fitted to the update they make, ΔW = B·A.

ComPEFT compresses A and B one by one, each as ``alpha · std · T``. What the adapter does
is ΔW = s·B·A, and B·A = (B·G)(G⁻¹·A) for any invertible G, so the factors a training run
leaves behind are one of many equivalent pairs, usually a lopsided one (B starts at zero
and stays ~4x smaller than A). A top-k of such a pair wastes the sparsity budget. Here,
per adapted module:

1. the gauge is re-balanced: B·A = U·Σ·Vᵀ (thin SVD through two QRs and an r×r SVD, never
   the dense ΔW), B' = U·√Σ, A' = √Σ·Vᵀ, so both factors carry the same spectrum and a
   stronger component gets more of the kept entries;
2. each factor keeps its top-k entries by magnitude as signs (the same selection and tie
   rule as ComPEFT, so the same bits per parameter);
3. one scale per module, chosen so that the packed update's component along B·A is B·A
   itself: c = ‖B·A‖² / ⟨B·A, T_B·T_A⟩ (computed from r×r products); the two factors get
   √c each, and B's is multiplied by ``gain`` (the ``alpha`` of a pack, 1 by default;
   ``--alpha auto`` searches :data:`GAIN_GRID` on validation data).

Why that scale: the least-squares one, ⟨B·A, P⟩ / ‖P‖² (P = T_B·T_A), shrinks the update
along B·A by ρ², ρ the cosine between P and B·A (~0.75 at k = 10%); on the zoo tasks the
validation search then picked gains of 1.5–2.7 over it, i.e. about 1/ρ². What the sparse
pattern loses is noise-like, orthogonal to B·A; a shrunk B·A is a systematic error, so the
scale puts back the whole update along B·A and leaves the rest (ComPEFT's own best alpha,
~1/√k times the std, over-shoots each factor the same way). Measured on the zoo LoRAs at
k = 10%, the relative squared error of ΔW at the least-squares scale is ~0.45 against ~0.82
for ComPEFT at its best alpha: the gain is the gauge. Re-fitting B to the ternarised A before
ternarising it, and one scale per rank component instead of one per module, each moved that
error by less than 0.01 and were left out (per-component scales would also cost 16 bits each).

Tensors without a factor partner keep ComPEFT's selection with the same rule for their
scale, ‖x‖² / ⟨x, T⟩: LoRA biases (times ``gain``), and the recovery modules
R(x) = U·act(D·x) of converted adapters, which are non-linear, so no gauge moves between D
and U (U times ``gain``; D, the input of the activation, without).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from adapterhub_c.packing.ternary import TernaryTensor

GAIN_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# (first factor, second factor) name suffixes: the update is second @ first
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
_INPUT_SIDE = re.compile(r"\.recovery_D$")  # a recovery module's input map: no gain


def pairs(names) -> tuple[list[tuple[str, str]], list[str]]:
    """([(A name, B name)], the other names): LoRA and embedding-LoRA factor pairs."""
    present = set(names)
    found, paired = [], set()
    for name in sorted(present):
        for first, second in _PAIRS:
            if name.endswith(first):
                partner = name[: -len(first)] + second
                if partner in present:
                    found.append((name, partner))
                    paired.update((name, partner))
    return found, sorted(present - paired)


def balance(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A', B') of A's and B's shapes with B'·A' = B·A, both factors U·√Σ / √Σ·Vᵀ of its thin
    SVD (float64); rows of A' / columns of B' beyond min(out, in) are zero."""
    qb, rb = np.linalg.qr(B)
    qa, ra = np.linalg.qr(A.T)
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    root = np.sqrt(s)
    A2, B2 = np.zeros_like(A, dtype=np.float64), np.zeros_like(B, dtype=np.float64)
    A2[: root.size] = (root[:, None] * vt) @ qa.T
    B2[:, : root.size] = (qb @ u) * root
    return A2, B2


def product_scale(A: np.ndarray, B: np.ndarray, TA: np.ndarray, TB: np.ndarray) -> float:
    """c with ⟨c·T_B·T_A, B·A⟩ = ‖B·A‖² (the packed update's part along B·A is B·A), from r×r
    products; 0 when the pattern is empty or does not point along B·A."""
    along = float(np.sum((TB.T @ B) * (TA @ A.T)))  # ⟨T_B·T_A, B·A⟩
    if along <= 0:
        return 0.0
    return max(float(np.sum((B.T @ B) * (A @ A.T))), 0.0) / along


def fit(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], gain: float,
        select) -> dict[str, TernaryTensor]:
    """Ternary tensors for every name of ``arrays`` (flat float arrays of the source tensors).

    ``select(flat) -> kept indices`` is the caller's top-k (ComPEFT's selection at the pack's
    density), applied to the balanced factors of each pair and to every other tensor.
    """
    out: dict[str, TernaryTensor] = {}
    found, others = pairs(arrays)

    def signs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = select(flat)
        return idx, flat[idx] < 0

    def ternary(name: str, idx: np.ndarray, negative: np.ndarray, scale: float) -> TernaryTensor:
        return TernaryTensor(idx, negative, float(np.float32(scale)), shapes[name], dtypes[name])

    for a_name, b_name in found:
        A = arrays[a_name].astype(np.float64).reshape(shapes[a_name])
        B = arrays[b_name].astype(np.float64).reshape(shapes[b_name])
        A2, B2 = balance(A, B)
        sa, sb = signs(A2.reshape(-1)), signs(B2.reshape(-1))
        TA, TB = _dense(*sa, A.shape), _dense(*sb, B.shape)
        root = math.sqrt(product_scale(A, B, TA, TB))
        out[a_name] = ternary(a_name, *sa, root)
        out[b_name] = ternary(b_name, *sb, gain * root)
    for name in others:
        flat = arrays[name].astype(np.float64)
        idx, negative = signs(flat)
        along = float(np.abs(flat[idx]).sum())  # ⟨x, T⟩
        scale = float(np.sum(flat ** 2)) / along if along > 0 else 0.0
        out[name] = ternary(name, idx, negative, scale if _INPUT_SIDE.search(name) else gain * scale)
    return out


def _dense(idx: np.ndarray, negative: np.ndarray, shape) -> np.ndarray:
    t = np.zeros(math.prod(shape), dtype=np.float64)
    t[idx] = np.where(negative, -1.0, 1.0)
    return t.reshape(shape)
