"""formats/gptq.py: our qweight / qzeros packing is AutoGPTQ's, and unpacking inverts it (issue 25).

The reference is AutoGPTQ's ``QuantLinear.pack`` loop (qlinear_cuda_old), transcribed in numpy
below: codes packed along the inputs, ``32 / bits`` per int32 word (3-bit codes straddling words
in its 10 + 1 + 10 + 1 + 10 pattern), zeros stored minus one and packed along the outputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub_c.formats.gptq import GptqLinear, pack_gptq, unpack_along_rows


def _autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight loop over intweight [in, out] (uint32)."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_autogptqs_and_unpacking_inverts_it(bits):
    g = torch.Generator().manual_seed(bits)
    out_f, in_f, group = 64, 128, 32
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.int64)
    zeros = torch.randint(1, 2**bits, (out_f, in_f // group), generator=g).float()
    scales = torch.rand(out_f, in_f // group, generator=g) / 10 + 0.01
    perm = torch.randperm(in_f, generator=g)
    g_idx = (torch.arange(in_f) // group)[torch.argsort(perm)]  # an act-order checkpoint's groups
    t = pack_gptq(codes, scales, zeros, g_idx, bits)
    ref_q = _autogptq_pack_rows(codes.t().numpy().astype(np.uint32), bits)
    assert np.array_equal(t["qweight"].numpy(), ref_q)
    z_ref = (zeros.t().numpy().astype(np.int64) - 1).astype(np.uint32)  # [G, out], AutoGPTQ's zeros - 1
    ref_z = _autogptq_pack_rows(z_ref.T.copy(), bits).T  # packed along the outputs
    assert np.array_equal(t["qzeros"].numpy(), ref_z)
    lin = GptqLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert torch.equal(lin.codes().t().long(), codes)
    assert torch.equal(lin.zeros(v1=True).t().float(), zeros)
    want = t["scales"].float().t()[:, g_idx] * (codes.float() - zeros[:, g_idx])
    assert torch.equal(lin.dense(), want)


def test_unpack_refuses_a_short_tensor():
    from adapterhub_c.errors import IntegrityError

    with pytest.raises(IntegrityError, match="cannot hold"):
        unpack_along_rows(torch.zeros(2, 4, dtype=torch.int32), 4, 32)


def test_dense_matches_our_gptq_dequantize():
    from adapterhub_c.variants.gptq import dequantize

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(32, 2, generator=g).half().float(), torch.randint(1, 15, (32, 2), generator=g).float()
    t = pack_gptq(codes, scales, zeros, torch.arange(64) // 32, 4)
    dense = GptqLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4).dense()
    assert torch.equal(dense, dequantize(codes, scales, zeros))
