"""What GPTQ and SparseGPT variants store per weight, instead of a dense copy.

- gptq: the integer codes bit-packed at ``bits`` per weight (2, 3, 4 or 8; little bit order
  over the flattened [out, in] codes, columns in the sweep's order), one fp16 scale and one
  uint8 zero point per output row and group, and with act-order the column permutation
  (int32): bits/16 of the fp16 weight plus the groups' overhead. Ŵ = scale · (code − zero).
- sparse (SparseGPT alone): the bit-packed keep-mask (masks.pack_mask) and the kept values,
  row-major, in 16 bits — the base's dtype when it is 16-bit, else float16 (bfloat16 for a
  value beyond float16's range). The OBS update changed them, so a mask over the base's
  values could not hold them.
- sparse-gptq (SparseGPT jointly with GPTQ): the keep-mask and the codes of the kept
  entries only, with the scales and zeros; pruned entries are 0.
Every weight is stored as its [out, in] matrix with ``transposed`` set for a layer that holds
[in, out] (GPT-2's Conv1D). A file is one safetensors file (``compressed.safetensors``) with
tensors ``<weight name>.<part>`` and the per-weight description in the metadata.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from adapterhub_c.errors import IntegrityError
from adapterhub_c.variants.gptq import dequantize
from adapterhub_c.variants.masks import pack_mask, unpack_mask

COMPRESSED_FILE = "compressed.safetensors"
FORMAT = "adapterhub_c.compressed-weights"
VERSION = "1"
PARTS = ("mask", "values", "codes", "scales", "zeros", "perm")
FP16_MAX = 65504.0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes < 2^bits as uint8 bytes, ``bits`` per code (flattened, little bit order)."""
    flat = codes.detach().reshape(-1).to(torch.uint8).cpu().numpy()
    if bits == 8:
        return torch.from_numpy(flat.copy())
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` uint8 codes that `pack_codes` packed."""
    data = packed.detach().cpu().numpy()
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != math.ceil(count * bits / 8):
        raise IntegrityError(f"{data.size} bytes of {bits}-bit codes cannot hold {count} codes")
    if bits == 8:
        return torch.from_numpy(data.copy())
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8))


def value_dtype(base_dtype: torch.dtype | None, values: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype kept values are stored in: the base's if 16-bit, else float16 (bfloat16 beyond its range)."""
    if base_dtype in (torch.float16, torch.bfloat16):
        return base_dtype
    big = values.numel() and values.abs().max().item() > FP16_MAX
    return torch.bfloat16 if big else torch.float16


@dataclass
class StoredWeight:
    """One weight as a variant stores it (see the module docstring); `matrix()` is its Ŵ."""

    shape: tuple[int, int]  # [out, in]
    transposed: bool = False  # the layer holds [in, out]
    keep: torch.Tensor | None = None  # bool [out, in] (sparse, sparse-gptq)
    values: torch.Tensor | None = None  # 16-bit kept values, row-major (sparse)
    codes: torch.Tensor | None = None  # uint8: [out, in] in sweep order (gptq) or the kept entries (sparse-gptq)
    scales: torch.Tensor | None = None  # float16 [out, groups]
    zeros: torch.Tensor | None = None  # uint8 [out, groups]
    perm: torch.Tensor | None = None  # int32 [in] (act-order)
    bits: int = 16

    @property
    def kind(self) -> str:
        """'gptq', 'sparse' or 'sparse-gptq'."""
        if self.codes is None:
            return "sparse"
        return "gptq" if self.keep is None else "sparse-gptq"

    def matrix(self) -> torch.Tensor:
        """Ŵ as a float32 [out, in] matrix."""
        if self.kind == "sparse":
            out = torch.zeros(self.shape, dtype=torch.float32)
            out[self.keep] = self.values.float()
            return out
        codes = self.codes
        if self.keep is not None:
            codes = torch.zeros(self.shape, dtype=torch.uint8)
            codes[self.keep] = self.codes
        Q = dequantize(codes.reshape(self.shape), self.scales, self.zeros, self.perm)
        if self.keep is not None:
            Q[~self.keep] = 0
        return Q

    def tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """Ŵ in ``dtype``, in the layer's own layout (transposed for a Conv1D)."""
        m = self.matrix().to(dtype)
        return (m.t() if self.transposed else m).contiguous()

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors stored for this weight, by part name (codes bit-packed)."""
        out = {"mask": pack_mask(self.keep) if self.keep is not None else None, "values": self.values,
               "codes": pack_codes(self.codes, self.bits) if self.codes is not None else None,
               "scales": self.scales, "zeros": self.zeros, "perm": self.perm}
        return {k: v.contiguous() for k, v in out.items() if v is not None}

    def describe(self) -> dict:
        """The JSON metadata of this weight."""
        return {"shape": list(self.shape), "transposed": self.transposed, "bits": self.bits, "kind": self.kind}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (headers excluded)."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def compressed_to_bytes(weights: Mapping[str, StoredWeight]) -> bytes:
    """{weight name: StoredWeight} as one safetensors blob."""
    from safetensors.torch import save

    tensors = {f"{name}.{part}": t for name in sorted(weights) for part, t in weights[name].parts().items()}
    meta = {name: weights[name].describe() for name in sorted(weights)}
    return save(tensors, metadata={"format": FORMAT, "version": VERSION, "weights": json.dumps(meta, sort_keys=True)})


def load_compressed(path: str | Path) -> dict[str, StoredWeight]:
    """The {weight name: StoredWeight} of a file `compressed_to_bytes` wrote (IntegrityError when it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on a bad file
        raise IntegrityError(f"compressed-weights file {Path(path).name} is unreadable ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise IntegrityError(f"{Path(path).name} is not a compressed-weights file of version {VERSION}")
    return {name: _stored_weight(name, desc, tensors) for name, desc in json.loads(meta["weights"]).items()}


def _stored_weight(name: str, desc: dict, tensors: dict[str, torch.Tensor]) -> StoredWeight:
    shape = tuple(int(d) for d in desc["shape"])
    parts = {p: tensors.get(f"{name}.{p}") for p in PARTS}
    keep = unpack_mask(parts["mask"], shape) if parts["mask"] is not None else None
    codes = None
    if parts["codes"] is not None:
        count = int(keep.sum()) if keep is not None else shape[0] * shape[1]
        codes = unpack_codes(parts["codes"], int(desc["bits"]), count)
    w = StoredWeight(shape, bool(desc["transposed"]), keep, parts["values"], codes, parts["scales"],
                     parts["zeros"], parts["perm"], int(desc["bits"]))
    if w.kind != desc["kind"] or (w.kind == "sparse" and (keep is None or w.values is None
                                                          or w.values.numel() != int(keep.sum()))):
        raise IntegrityError(f"compressed weight {name!r} lacks parts of a {desc['kind']!r} weight")
    return w


@torch.no_grad()
def apply_compressed(state: dict[str, torch.Tensor], weights: Mapping[str, StoredWeight]) -> None:
    """Replace each stored weight of ``state`` by its Ŵ, in the state tensor's dtype (in place)."""
    for name, w in weights.items():
        if name not in state:
            raise IntegrityError(f"compressed weight for {name!r}, which the base does not have")
        t = state[name]
        want = tuple(reversed(w.shape)) if w.transposed else tuple(w.shape)
        if tuple(t.shape) != want:
            raise IntegrityError(f"compressed weight for {name!r} has shape {list(want)}, the base {list(t.shape)}")
        state[name] = w.tensor(t.dtype)
