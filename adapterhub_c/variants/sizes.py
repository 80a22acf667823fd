"""Bit and byte accounting for variants: what bitsandbytes holds, and the ideal size.

Quantized formats (bitsandbytes, as transformers configures them):
- int8 (LLM.int8): one int8 per weight + one fp32 absmax (SCB) per output row:
  bits = 8·n + 32·rows, i.e. 8 + 32/in_features per weight.
- nf4 / fp4: 4 bits per weight (two per byte) + one fp32 absmax per block of 64
  weights of the flattened tensor: 4 + 32/64 = 4.5 bits per weight.
- nf4 / fp4 with double quantization: the block absmaxes are themselves quantized to
  8 bits in blocks of 256, each with an fp32 absmax, plus one fp32 offset per tensor:
  4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.
Per-tensor constants (the 16-entry code table, the quant-state metadata) are left out.

Ideal size (as the CPET paper's Table 1 counts a compressed model): per tensor,
  values   = nonzero count × value bits   (dense tensors: numel × value bits)
  scales   = the format's scale bits above (computed over the dense tensor, as bnb does)
  positions = where sparsity is unstructured, the cheaper of a bitmask (1 bit per
              position) and per-row column indices (nnz · ceil(log2(in_features)));
              for 2:4, the hardware metadata (2 bits per kept value);
              none for dense or structured (channel-pruned) tensors, whose shapes shrink.
Value bits are the quant format's (8 or 4) and, for tensors left unquantized, 16
(fp16/bf16 deployment), whatever dtype the blob stores.

GPTQ (as a variant stores it, packed.py): `bits` per code, packed, + per output row and
group one fp16 scale and one uint8 zero point: bits + 24 · groups / in_features per weight
(the act-order permutation, 32 bits per input column, is left out here as the per-tensor
constants above; `stored_bytes` counts it). Its loaded form is the dense Ŵ.
"""
from __future__ import annotations

import math

BLOCKSIZE_4BIT = 64
NESTED_BLOCKSIZE = 256
DEPLOY_BITS = 16


def value_bits(quant: str, dense_bits: int = DEPLOY_BITS, gptq_bits: int = 4) -> int:
    """Bits per stored value of a format ('none' → dense_bits)."""
    return {"int8": 8, "nf4": 4, "fp4": 4, "gptq": gptq_bits}.get(quant, dense_bits)


def scale_bits(numel: int, in_features: int, quant: str, double_quant: bool = False,
               group_size: int | None = None) -> int:
    """Bits of the quantization scales of one weight tensor (0 when unquantized)."""
    if quant == "gptq":
        return 24 * (numel // in_features) * (in_features // (group_size or in_features))
    if quant == "int8":
        return 32 * (numel // in_features)
    if quant in ("nf4", "fp4"):
        blocks = math.ceil(numel / BLOCKSIZE_4BIT)
        if double_quant:
            return 8 * blocks + 32 * math.ceil(blocks / NESTED_BLOCKSIZE) + 32
        return 32 * blocks
    return 0


def quantized_tensor_bits(numel: int, in_features: int, quant: str, double_quant: bool = False,
                          dense_bits: int = DEPLOY_BITS, gptq_bits: int = 4, group_size: int | None = None) -> int:
    """Bits a dense weight tensor takes in the format (as bitsandbytes holds it; gptq: as stored)."""
    if quant in ("nf4", "fp4"):
        values = 8 * math.ceil(numel / 2)
    elif quant == "gptq":
        values = 8 * math.ceil(numel * gptq_bits / 8)
    else:
        values = numel * value_bits(quant, dense_bits)
    return values + scale_bits(numel, in_features, quant, double_quant, group_size)


def bits_per_weight(numel: int, in_features: int, quant: str, double_quant: bool = False,
                    dense_bits: int = DEPLOY_BITS) -> float:
    """Effective bits per weight of one tensor in the format, scales included."""
    return quantized_tensor_bits(numel, in_features, quant, double_quant, dense_bits) / numel


def position_bits(numel: int, nnz: int, in_features: int, pattern: str) -> int:
    """Bits needed to say where the kept values are (see the module docstring)."""
    if pattern in ("dense", "structured"):
        return 0
    if pattern == "2:4":
        return 2 * nnz
    if pattern == "unstructured":
        return min(numel, nnz * max(1, math.ceil(math.log2(max(in_features, 2)))))
    raise ValueError(f"unknown sparsity pattern {pattern!r}")


def ideal_tensor_bits(numel: int, nnz: int, in_features: int, quant: str = "none",
                      double_quant: bool = False, pattern: str = "dense",
                      dense_bits: int = DEPLOY_BITS, gptq_bits: int = 4, group_size: int | None = None) -> int:
    """Ideal bits of one tensor: values + scales + positions (see the module docstring)."""
    values = numel if pattern in ("dense", "structured") else nnz
    return (values * value_bits(quant, dense_bits, gptq_bits)
            + scale_bits(numel, in_features, quant, double_quant, group_size)
            + position_bits(numel, nnz, in_features, pattern))
