"""delta-fit packs: the gauge, the fitted scale, counts and bits as ComPEFT, through the pack file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.packing import (
    compress_tensors,
    decode_tensors,
    kept_at_density,
    pack_adapter,
    read_pack,
    read_pack_dense,
    unpack_to_adapter,
    write_pack,
)
from adapterhub_c.packing.alpha import ALPHA_GRID, search_grid
from adapterhub_c.packing.deltafit import GAIN_GRID, balance, pairs, product_scale

P = "base_model.model.model.layers.0.self_attn"


def _lopsided_lora(seed=0, out=96, inp=80, r=8, b_scale=0.02):
    """Factors as a short training run leaves them: A at its random init, B small and of a low
    effective rank (a few directions learned), so B·A is dominated by a few components."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g) / inp ** 0.5
    B = b_scale * (torch.randn(out, 2, generator=g) @ torch.randn(2, r, generator=g)
                   + 0.1 * torch.randn(out, r, generator=g))
    return A, B


def _tensors(seed=0):
    A, B = _lopsided_lora(seed)
    A2, B2 = _lopsided_lora(seed + 1, out=24)
    return {f"{P}.q_proj.lora_A.weight": A, f"{P}.q_proj.lora_B.weight": B,
            f"{P}.k_proj.lora_A.weight": A2, f"{P}.k_proj.lora_B.weight": B2.to(torch.bfloat16),
            f"{P}.k_proj.lora_B.bias": 0.1 * torch.randn(24, generator=torch.Generator().manual_seed(9))}


def _update(dense, module):
    return dense[f"{P}.{module}.lora_B.weight"].double() @ dense[f"{P}.{module}.lora_A.weight"].double()


def test_balance_keeps_the_product_and_splits_the_spectrum_evenly():
    A, B = (t.double().numpy() for t in _lopsided_lora())
    A2, B2 = balance(A, B)
    assert A2.shape == A.shape and B2.shape == B.shape
    np.testing.assert_allclose(B2 @ A2, B @ A, atol=1e-12)
    # rows of A' and columns of B' are √σ·(unit vectors): equal norms, in decreasing order
    np.testing.assert_allclose(np.linalg.norm(A2, axis=1), np.linalg.norm(B2, axis=0), rtol=1e-10)
    sv = np.linalg.svd(B @ A, compute_uv=False)[: A.shape[0]]
    np.testing.assert_allclose(np.linalg.norm(A2, axis=1) ** 2, sv, rtol=1e-8)


def test_balance_pads_a_rank_above_the_layer_with_zeros():
    g = np.random.default_rng(0)
    A, B = g.normal(size=(12, 5)), g.normal(size=(7, 12))  # r = 12 > min(out 7, in 5)
    A2, B2 = balance(A, B)
    np.testing.assert_allclose(B2 @ A2, B @ A, atol=1e-12)
    assert not A2[5:].any() and not B2[:, 5:].any()


def test_the_update_along_the_original_is_the_original_and_counts_are_compefts():
    ts = _tensors()
    out = compress_tensors(ts, 0.2, scope="tensor", method="delta-fit")
    for name, t in out.items():
        assert t.nnz == kept_at_density(ts[name].numel(), density=0.2)  # same selection count → same bits
    dense = decode_tensors(out)
    for module in ("q_proj", "k_proj"):
        A, B = ts[f"{P}.{module}.lora_A.weight"].double(), ts[f"{P}.{module}.lora_B.weight"].double()
        want, got = B @ A, _update(dense, module)
        # <ΔŴ, ΔW> = ‖ΔW‖² (float32 scales, bf16 values for k_proj's B)
        assert torch.dot(got.flatten(), want.flatten()).item() == pytest.approx(want.norm().item() ** 2,
                                                                               rel=1e-2 if module == "k_proj" else 1e-5)
    bias = ts[f"{P}.k_proj.lora_B.bias"].double()
    got = dense[f"{P}.k_proj.lora_B.bias"].double()
    assert torch.dot(got, bias).item() == pytest.approx(bias.norm().item() ** 2, rel=1e-5)


def test_delta_fit_is_closer_to_the_update_than_compeft_at_any_alpha():
    ts = _tensors(3)
    want = ts[f"{P}.q_proj.lora_B.weight"].double() @ ts[f"{P}.q_proj.lora_A.weight"].double()

    def cosine(x):
        return torch.dot(x.flatten(), want.flatten()).item() / (x.norm() * want.norm()).item()

    for k in (0.05, 0.1, 0.2):
        ours = _update(decode_tensors(compress_tensors(ts, k, scope="tensor", method="delta-fit")), "q_proj")
        theirs = [cosine(_update(decode_tensors(compress_tensors(ts, k, alpha=a, scope="tensor")), "q_proj"))
                  for a in ALPHA_GRID]
        # alpha only scales ComPEFT's update, so its best direction is the same for every alpha
        assert cosine(ours) > 1.1 * max(theirs), (k, cosine(ours), max(theirs))


def test_gain_scales_the_output_side_only():
    ts = _tensors()
    ts[f"{P}.q_proj.recovery_D"] = torch.randn(4, 80)
    ts[f"{P}.q_proj.recovery_U"] = 0.01 * torch.randn(96, 4)
    one = compress_tensors(ts, 0.1, alpha=1.0, scope="tensor", method="delta-fit")
    two = compress_tensors(ts, 0.1, alpha=2.0, scope="tensor", method="delta-fit")
    for name in ts:
        same = name.endswith(("lora_A.weight", "recovery_D"))
        ratio = two[name].scale / one[name].scale
        assert ratio == pytest.approx(1.0 if same else 2.0, rel=1e-6), name
        assert np.array_equal(one[name].indices, two[name].indices)


def test_zero_modules_and_parameters():
    ts = _tensors()
    ts[f"{P}.q_proj.lora_B.weight"] = torch.zeros(96, 8)  # an untrained module: B = 0
    out = compress_tensors(ts, 0.1, scope="tensor", method="delta-fit")
    assert out[f"{P}.q_proj.lora_A.weight"].scale == 0 or out[f"{P}.q_proj.lora_B.weight"].nnz == 0
    assert not _update(decode_tensors(out), "q_proj").any()
    with pytest.raises(UsageError, match="scope tensor"):
        compress_tensors(ts, 0.1, scope="global", method="delta-fit")
    assert search_grid("delta-fit") == GAIN_GRID and search_grid("compeft") == ALPHA_GRID
    with pytest.raises(UsageError, match="ignores alpha"):
        search_grid("stc")
    found, others = pairs(ts)
    assert len(found) == 2 and others == [f"{P}.k_proj.lora_B.bias"]
    assert product_scale(np.ones((1, 2)), np.ones((2, 1)), np.zeros((1, 2)), np.zeros((2, 1))) == 0.0


@pytest.mark.parametrize("encoding", ["golomb", "bitmask"])
def test_pack_file_round_trip_and_peft_folder(tmp_path, encoding):
    ts = {k: v for k, v in _tensors().items() if "bias" not in k}
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj"]}
    adapter = LoraAdapter(config, ts)
    pack = pack_adapter(adapter, density=0.1, base="tiny", source_digest="x", scope="tensor",
                        method="delta-fit", alpha=1.25, encoding=encoding)
    path = tmp_path / "p.pack"
    write_pack(pack, path)
    back = read_pack(path)
    assert back.method == "delta-fit" and back.alpha == 1.25
    want = decode_tensors(pack.tensors)
    dense = read_pack_dense(path)
    for name in ts:
        assert torch.equal(dense.tensors[name], want[name]), name
        assert torch.equal(back.tensors[name].to_dense(), want[name])
    out = unpack_to_adapter(back)
    for name in ts:
        assert torch.equal(out.tensors[name], want[name])
