"""The GPTQ checkpoint layout of AutoGPTQ / GPTQModel / optimum, read and written by our own code.

Per quantized linear ``<module>``, with ``in`` inputs, ``out`` outputs, ``b`` bits, ``G`` groups:
- ``qweight``: int32 [in·b/32, out]: each column's integer codes packed along the inputs as
  one little-endian bit stream (code j of a column at bits b·j … b·j+b−1 of the stream; for
  2, 4 and 8 bits that is ``32/b`` codes per word, 3-bit codes straddle words);
- ``qzeros``: int32 [G, out·b/32]: each group's zero points, packed the same way along the
  outputs. ``checkpoint_format`` "gptq" (v1, AutoGPTQ) stores zero − 1, "gptq_v2"
  (GPTQModel) the zero itself;
- ``scales``: float16 [G, out];
- ``g_idx``: int32 [in]: the group of each input column (act-order checkpoints permute it);
  absent in old checkpoints (then column i is in group i // group_size);
- ``bias`` as in the plain layer.
Ŵ[o, i] = scales[g_idx[i], o] · (code[i, o] − zero[g_idx[i], o]), computed here in float32
(exact products of the fp16 scales; AutoGPTQ's kernels round them to fp16).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adapterhub_c.errors import IntegrityError, UsageError

GPTQ_BITS = (2, 3, 4, 8)
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [ceil(n·bits/32), C]: the codes ``values`` [n, C] (< 2^bits) of each column as a bit stream."""
    v = values.detach().to(torch.int64).cpu().numpy().astype(np.uint8).T  # [C, n]
    if v.size and int(v.max()) >= 2**bits:
        raise UsageError(f"a code {int(v.max())} does not fit in {bits} bits")
    cols, n = v.shape
    planes = ((v[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(cols, n * bits)
    words = -(-n * bits // 32)
    padded = np.zeros((cols, words * 32), dtype=np.uint8)
    padded[:, :n * bits] = planes
    packed = np.packbits(padded, axis=1, bitorder="little").view("<i4")  # [C, words]
    return torch.from_numpy(np.ascontiguousarray(packed.T).astype(np.int32))


def unpack_along_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [count, C]: the codes `pack_along_rows` packed."""
    p = packed.detach().cpu().numpy()
    if p.dtype != np.int32 or p.ndim != 2 or p.shape[0] * 32 < count * bits:
        raise IntegrityError(f"a packed tensor {list(p.shape)} of {p.dtype} cannot hold {count} {bits}-bit codes")
    as_bytes = np.ascontiguousarray(p.T).astype("<i4").view(np.uint8)  # [C, words·4]
    planes = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :count * bits].reshape(-1, count, bits)
    codes = (planes << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)  # [C, count]
    return torch.from_numpy(np.ascontiguousarray(codes.T))


@dataclass
class GptqLinear:
    """One quantized linear in the GPTQ layout (see the module docstring)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in] of the dense weight."""
        return int(self.qweight.shape[1]), int(self.qweight.shape[0]) * 32 // self.bits

    def codes(self) -> torch.Tensor:
        """uint8 [in, out]."""
        out_f, in_f = self.shape
        return unpack_along_rows(self.qweight, self.bits, in_f)

    def zeros(self, v1: bool = True) -> torch.Tensor:
        """int64 [G, out]: the zero points (v1 checkpoints store zero − 1)."""
        out_f, _ = self.shape
        z = unpack_along_rows(self.qzeros.t().contiguous(), self.bits, out_f).t().to(torch.int64)
        return z + 1 if v1 else z

    def groups(self, group_size: int | None) -> torch.Tensor:
        """int64 [in]: each input column's group."""
        _, in_f = self.shape
        if self.g_idx is not None:
            return self.g_idx.to(torch.int64)
        return torch.arange(in_f) // (group_size or in_f)

    def dense(self, group_size: int | None = None, v1: bool = True) -> torch.Tensor:
        """Ŵ as float32 [out, in]."""
        g = self.groups(group_size)
        n_groups = int(self.scales.shape[0])
        if g.numel() != self.shape[1] or (g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups)):
            raise IntegrityError(f"g_idx names groups outside the {n_groups} groups of scales")
        w = self.scales.float()[g] * (self.codes().float() - self.zeros(v1).float()[g])  # [in, out]
        return w.t().contiguous()


def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              bits: int, v1: bool = True) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear from codes [out, in] (original column order), scales and zeros
    [out, G] and each column's group ``g_idx`` [in]; ``v1`` stores zero − 1 (AutoGPTQ)."""
    if bits not in GPTQ_BITS:
        raise UsageError(f"GPTQ checkpoints hold 2, 3, 4 or 8 bits, not {bits}")
    z = zeros.detach().round().to(torch.int64) - (1 if v1 else 0)
    if v1 and bool((z < 0).any()):  # AutoGPTQ v1 cannot store a zero point of 0 (it wraps)
        raise UsageError("a zero point of 0 cannot be stored in the v1 GPTQ layout; write gptq_v2")
    return {"qweight": pack_along_rows(codes.t(), bits),
            "qzeros": pack_along_rows(z, bits).t().contiguous(),
            "scales": scales.detach().t().to(torch.float16).contiguous(),
            "g_idx": g_idx.detach().to(torch.int32).contiguous()}


def gptq_modules(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, GptqLinear]:
    """{module name: GptqLinear} of every ``<module>.qweight`` in a checkpoint's tensors."""
    out = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        missing = [p for p in ("qzeros", "scales") if f"{prefix}.{p}" not in tensors]
        if missing:
            raise IntegrityError(f"{prefix} has a qweight but no {missing[0]}")
        out[prefix] = GptqLinear(tensors[key], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"],
                                 tensors.get(f"{prefix}.g_idx"), bits)
    return out


def dense_state(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None,
                v1: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with every GPTQ linear replaced by its dense Ŵ (``<module>.weight``)."""
    modules = gptq_modules(tensors, bits)
    if not modules:
        raise IntegrityError("a GPTQ checkpoint without any qweight tensor")
    parts = {f"{m}.{p}" for m in modules for p in PARTS}
    state = {k: v for k, v in tensors.items() if k not in parts}
    for name, lin in modules.items():
        state[f"{name}.weight"] = lin.dense(group_size, v1)
    return state
