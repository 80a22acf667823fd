"""The packed keep-mask kernel against its twin, ``weight.mul_(mask)``, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub_c.errors import IntegrityError
from adapterhub_c.kernels.masks_cpu import apply_packed_mask
from adapterhub_c.variants.masks import apply_mask_file, apply_masks, masks_to_bytes

INTS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", list(INTS), ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 1000, 12345])
def test_kernel_equals_mul_including_signed_zeros(dtype, n):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=g).to(dtype)
    w[::5] = -0.0
    w[1::7] = 0.0
    for keep in (torch.rand(n, generator=g) > 0.5, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)):
        want = w.clone().mul_(keep.to(dtype))
        got = w.clone()
        apply_packed_mask(got.view(INTS[dtype]).numpy(), np.packbits(keep.numpy(), bitorder="little"))
        assert torch.equal(got.view(INTS[dtype]), want.view(INTS[dtype]))


def test_kernel_refuses_a_mask_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not cover"):
        apply_packed_mask(np.zeros(17, np.int32), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="flat"):
        apply_packed_mask(np.zeros((2, 8), np.int32), np.zeros(2, np.uint8))


def test_mask_file_equals_apply_masks_on_a_state(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(5, 13, generator=g), "b.weight": torch.randn(3, 3, generator=g).bfloat16(),
             "c.weight": torch.randn(4, 4, generator=g).t()}  # not contiguous
    masks = {k: torch.rand(v.shape, generator=g) > 0.3 for k, v in state.items()}
    (tmp_path / "m.safetensors").write_bytes(masks_to_bytes(masks))
    want = {k: v.clone() for k, v in state.items()}
    apply_masks(want, masks)
    got = {k: v.clone() for k, v in state.items()}
    apply_mask_file(got, tmp_path / "m.safetensors")
    for k in state:
        assert torch.equal(got[k].contiguous().view(INTS[got[k].dtype]), want[k].contiguous().view(INTS[want[k].dtype]))
    with pytest.raises(IntegrityError, match="shape"):
        apply_mask_file({**state, "a.weight": torch.zeros(5, 12)}, tmp_path / "m.safetensors")
    with pytest.raises(IntegrityError, match="does not have"):
        apply_mask_file({k: v for k, v in state.items() if k != "b.weight"}, tmp_path / "m.safetensors")
