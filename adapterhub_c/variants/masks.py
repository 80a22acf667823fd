"""Bit-packed keep-masks: how a pruned variant stores what it removed from its base.

A keep-mask holds one bit per weight of a pruned tensor (1 = kept), packed with
`numpy.packbits` (little bit order) over the flattened tensor; the last byte is padded
with zeros when the length is not a multiple of 8, and the shape is stored beside it, so
the round trip is bit-exact for any shape. A mask file is a safetensors file with one
uint8 tensor per pruned weight (named like the weight) and the shapes in its metadata.

`apply_masks` zeroes the removed weights of the base's tensors with the same operation
the pruning code uses (`weight.mul_(mask)`), so base × mask is bit for bit the pruned
tensor (signed zeros included). Loading a variant uses `apply_mask_file`, which applies the
packed bits directly with a compiled kernel (`kernels.masks_cpu`) and gives the same bits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from adapterhub_c.errors import IntegrityError

MASK_FORMAT = "adapterhub_c.keep-mask"
MASK_VERSION = "1"
BITORDER = "little"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 positions per byte (flattened, little bit order)."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu().numpy()
    return torch.from_numpy(np.packbits(flat, bitorder=BITORDER))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The boolean tensor of `shape` that `pack_mask` packed."""
    shape = tuple(int(d) for d in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    data = packed.detach().cpu().numpy()
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != -(-numel // 8):
        raise IntegrityError(f"a keep-mask of {data.size} bytes cannot hold shape {list(shape)}")
    bits = np.unpackbits(data, count=numel, bitorder=BITORDER)
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)


def masks_to_bytes(masks: Mapping[str, torch.Tensor]) -> bytes:
    """Keep-masks {weight name: bool tensor} as one safetensors blob."""
    from safetensors.torch import save

    packed = {name: pack_mask(m) for name, m in sorted(masks.items())}
    shapes = {name: list(m.shape) for name, m in sorted(masks.items())}
    return save(packed, metadata={"format": MASK_FORMAT, "version": MASK_VERSION, "bitorder": BITORDER,
                                  "shapes": json.dumps(shapes, sort_keys=True)})


def masks_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """The {weight name: bool tensor} of a mask blob (IntegrityError when it is not one)."""
    packed, shapes = _packed_masks(data)
    return {name: unpack_mask(packed[name], shapes[name]) for name in sorted(packed)}


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """`masks_from_bytes` of a file."""
    return masks_from_bytes(Path(path).read_bytes())


def _packed_masks(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """({weight name: packed uint8 tensor}, {weight name: shape}) of a mask blob, checked."""
    from safetensors.torch import load

    meta = _metadata(data)
    if meta.get("format") != MASK_FORMAT:
        raise IntegrityError("not a keep-mask file (format metadata missing)")
    if meta.get("version") != MASK_VERSION:
        raise IntegrityError(f"keep-mask format version {meta.get('version')!r} is not supported")
    shapes = json.loads(meta.get("shapes") or "{}")
    packed = load(data)
    if set(packed) != set(shapes):
        raise IntegrityError("keep-mask file: tensors and shapes do not match")
    return packed, shapes


@torch.no_grad()
def apply_mask_file(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """`apply_masks(state, load_masks(path))` without unpacking the bits: the same result, bit for
    bit, for finite weights, from the packed masks (see :mod:`adapterhub_c.kernels.masks_cpu`)."""
    from adapterhub_c.kernels.masks_cpu import apply_packed_mask

    packed, shapes = _packed_masks(Path(path).read_bytes())
    for name in sorted(packed):
        t = _mask_target(state, name, shapes[name])
        shape = tuple(t.shape)  # the mask's own, checked equal
        data = packed[name].numpy()
        if data.dtype != np.uint8 or data.ndim != 1 or data.size != -(-t.numel() // 8):
            raise IntegrityError(f"a keep-mask of {data.size} bytes cannot hold shape {list(shape)}")
        if not t.is_contiguous():
            state[name] = t = t.contiguous()
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        apply_packed_mask(t.view(-1).view(ints).numpy(), data)


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise IntegrityError("keep-mask file is truncated")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise IntegrityError("keep-mask file is truncated")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise IntegrityError(f"keep-mask file has a corrupt header ({e})") from None
    return header.get("__metadata__") or {}


@torch.no_grad()
def apply_masks(state: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the removed weights of `state` in place (`weight.mul_(mask)`, as pruning does)."""
    for name, mask in masks.items():
        t = _mask_target(state, name, mask.shape)
        t.mul_(mask.to(t.dtype))


def _mask_target(state: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    """The base tensor a keep-mask of ``shape`` applies to; IntegrityError when it is missing or another shape."""
    if name not in state:
        raise IntegrityError(f"keep-mask for {name!r}, which the base does not have")
    t = state[name]
    if tuple(t.shape) != tuple(int(d) for d in shape):
        raise IntegrityError(f"keep-mask for {name!r} has shape {list(shape)}, the base {list(t.shape)}")
    return t


# The Llama names' slicing rule: how variants written before the channel plan existed are read.
CHANNEL_DIMS = {("gate_proj", "weight"): 0, ("up_proj", "weight"): 0, ("down_proj", "weight"): 1,
                ("gate_proj", "bias"): 0, ("up_proj", "bias"): 0}
CHANNEL_PLAN_KEY = "channel_plan"


def channel_plan(arch) -> dict[str, list]:
    """{tensor name: [MLP name, dim, halves]} for every tensor that ffn-channels slices.

    From the architecture description (models/arch.py), before the model is shrunk: the MLP's
    input linears lose output rows (dim 0 of an ``nn.Linear`` weight, dim 1 of a ``Conv1D``'s
    ``[in, out]`` weight; their biases too), in every half of a fused gate/up linear; the
    output linear loses input columns (dim 1, or dim 0 for a ``Conv1D``)."""
    from adapterhub_c.models.arch import fan_in_fan_out

    plan: dict[str, list] = {}
    for block in arch.blocks:
        mlp = block.mlp
        if mlp is None:
            continue
        for attr in mlp.inputs:
            lin = getattr(mlp.module, attr)
            halves = mlp.halves.get(attr, 1)
            plan[f"{mlp.name}.{attr}.weight"] = [mlp.name, 1 if fan_in_fan_out(lin) else 0, halves]
            if getattr(lin, "bias", None) is not None:
                plan[f"{mlp.name}.{attr}.bias"] = [mlp.name, 0, halves]
        out = getattr(mlp.module, mlp.output)
        plan[f"{mlp.name}.{mlp.output}.weight"] = [mlp.name, 0 if fan_in_fan_out(out) else 1, 1]
    return plan


@torch.no_grad()
def select_channels(state: dict[str, torch.Tensor], kept: Mapping[str, torch.Tensor],
                    plan: Mapping[str, list] | None = None) -> None:
    """ffn-channels: keep only the listed intermediate channels of each MLP, in place.

    `kept`: {MLP module name: sorted int64 channel indices}; `plan`: the variant's
    :func:`channel_plan` (None for variants written before it: Llama names, rows of
    gate_proj / up_proj and their biases, columns of down_proj) — what
    `pruning.shrink_mlp` does to modules.
    """
    if plan is not None:
        for name, (mlp, _dim, _halves) in plan.items():
            if mlp in kept and name not in state:
                raise IntegrityError(f"kept channels for {mlp!r}, but the base has no {name}")
    else:
        for mlp in kept:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if f"{mlp}.{proj}.weight" not in state:
                    raise IntegrityError(f"kept channels for {mlp!r}, but the base has no {mlp}.{proj}.weight")
    for name in list(state):
        state[name] = select_tensor_channels(name, state[name], kept, plan)


def select_tensor_channels(name: str, tensor: torch.Tensor, kept: Mapping[str, torch.Tensor],
                           plan: Mapping[str, list] | None = None) -> torch.Tensor:
    """One tensor of `select_channels`: sliced if the plan (or the Llama rule) lists it."""
    if plan is not None:
        entry = plan.get(name)
        if entry is None or entry[0] not in kept:
            return tensor
        mlp, dim, halves = entry
        size = tensor.shape[dim] // halves
        index = kept[mlp].to(torch.int64)
        index = torch.cat([index + j * size for j in range(halves)])
        return tensor.index_select(dim, index).contiguous()
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or parts[0] not in kept or (parts[1], parts[2]) not in CHANNEL_DIMS:
        return tensor
    return tensor.index_select(CHANNEL_DIMS[(parts[1], parts[2])], kept[parts[0]].to(torch.int64)).contiguous()
