"""Pruning on the tiny Llama: exact sparsity, 2:4 groups, Wanda scores, channel pruning."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from adapterhub_c.errors import UsageError
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.variants import (
    kept_at_sparsity,
    prune_2_4,
    prune_ffn_channels,
    prune_magnitude,
    prune_wanda,
    target_linears,
)

PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def calib(n: int = 8, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (length,), generator=g) for _ in range(n)]


def skewed_tiny():
    """Tiny Llama whose RMSNorm gains vary over features by ~1000x: very non-uniform activations."""
    model, _ = build_tiny_llama()
    gains = torch.logspace(-1.5, 1.5, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(gains)
            layer.post_attention_layernorm.weight.copy_(gains)
    return model


def test_targets_are_the_seven_projections_of_each_block():
    model, _ = build_tiny_llama()
    names = target_linears(model)
    assert len(names) == 14
    assert {n.rsplit(".", 1)[-1] for n in names} == PROJ
    assert all(".layers." in n for n in names)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_magnitude_row_keeps_exact_count_per_row_and_the_largest(sparsity):
    model, _ = build_tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    emb, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    prune_magnitude(model, sparsity, granularity="row")
    for name, lin in target_linears(model).items():
        w, w0 = lin.weight, before[name]
        kept = w != 0
        assert (kept.sum(dim=1) == kept_at_sparsity(w.shape[1], sparsity=sparsity)).all(), name
        assert torch.equal(w[kept], w0[kept])  # survivors untouched
        # every kept |w| >= every pruned |w| of the same row
        big = torch.where(kept, w0.abs(), torch.inf).min(dim=1).values
        small = torch.where(~kept, w0.abs(), -torch.inf).max(dim=1).values
        assert (big >= small).all()
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert torch.equal(model.lm_head.weight, head)


def test_kept_at_sparsity_rounds_half_up():
    assert kept_at_sparsity(128, sparsity=0.5) == 64
    assert kept_at_sparsity(5, sparsity=0.5) == 3
    assert kept_at_sparsity(64, sparsity=0.3) == 45  # 44.8
    assert kept_at_sparsity(10, sparsity=0.0) == 10


@pytest.mark.parametrize("sparsity", [0.25, 0.6])
def test_magnitude_layer_keeps_exact_count_per_matrix(sparsity):
    model, _ = build_tiny_llama()
    prune_magnitude(model, sparsity, granularity="layer")
    row_counts = set()
    for lin in target_linears(model).values():
        nnz = int((lin.weight != 0).sum())
        assert nnz == kept_at_sparsity(lin.weight.numel(), sparsity=sparsity)
        row_counts |= set((lin.weight != 0).sum(dim=1).tolist())
    assert len(row_counts) > 1  # rows differ: really per layer, not per row


def test_embeddings_and_lm_head_pruned_only_when_flagged():
    model, _ = build_tiny_llama()
    prune_magnitude(model, 0.5, include_embeddings=True, include_lm_head=True)
    emb = model.model.embed_tokens.weight
    assert ((emb[1:] != 0).sum(dim=1) == 32).all()  # row 0 is the all-zero padding row
    assert ((model.lm_head.weight != 0).sum(dim=1) == 32).all()


def test_wanda_matches_hand_computed_scores_and_differs_from_magnitude():
    data = calib()
    model = skewed_tiny()
    q = model.model.layers[0].self_attn.q_proj
    w0 = q.weight.detach().clone()
    # hand-computed ||X_j||_2 of layer 0's q_proj input on the unpruned model
    sq = torch.zeros(64)

    def hook(_module, args):
        sq.add_((args[0].reshape(-1, 64) ** 2).sum(0))

    h = q.register_forward_pre_hook(hook)
    with torch.no_grad():
        for row in data:
            model(row[None])
    h.remove()
    score = w0.abs() * sq.sqrt()[None, :]
    expected = torch.ones_like(w0, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :32], False)

    prune_wanda(model, 0.5, data)
    assert torch.equal(q.weight != 0, expected)
    for lin in target_linears(model).values():
        assert ((lin.weight != 0).sum(dim=1) == lin.weight.shape[1] // 2).all()

    mag = skewed_tiny()
    prune_magnitude(mag, 0.5)
    masks_w = [lin.weight != 0 for lin in target_linears(model).values()]
    masks_m = [lin.weight != 0 for lin in target_linears(mag).values()]
    differing = sum(int((a != b).sum()) for a, b in zip(masks_w, masks_m, strict=False))
    assert differing > 0.1 * sum(m.numel() for m in masks_m)


def test_wanda_needs_calibration():
    model, _ = build_tiny_llama()
    with pytest.raises(UsageError):
        prune_wanda(model, 0.5, None)


def _check_2_4(model, reference, scores=None):
    for name, lin in target_linears(model).items():
        w = lin.weight.reshape(lin.weight.shape[0], -1, 4)
        assert ((w != 0).sum(dim=2) == 2).all(), name
        w0 = reference[name].reshape_as(w)
        s = w0.abs() if scores is None else scores[name].reshape_as(w)
        kept = w != 0
        assert torch.equal(w[kept], w0[kept])
        big = torch.where(kept, s, torch.inf).min(dim=2).values
        small = torch.where(~kept, s, -torch.inf).max(dim=2).values
        assert (big >= small).all()


def test_2_4_zeroes_the_two_smallest_of_every_group_of_four():
    model, _ = build_tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    prune_2_4(model)
    _check_2_4(model, before)


def test_2_4_with_calibration_uses_wanda_scores():
    data = calib()
    model = skewed_tiny()
    prune_2_4(model, calib_input_ids=data)
    plain = skewed_tiny()
    prune_2_4(plain)
    a = model.model.layers[0].self_attn.q_proj.weight != 0
    b = plain.model.layers[0].self_attn.q_proj.weight != 0
    assert ((a.reshape(64, -1, 4).sum(2)) == 2).all()
    assert not torch.equal(a, b)


def _reference_llama(original: LlamaForCausalLM, kept: dict[str, torch.Tensor], k: int) -> LlamaForCausalLM:
    """A fresh Llama with intermediate k, built by slicing the original weights by `kept`."""
    cfg = original.config.__class__.from_dict(original.config.to_dict())
    cfg.intermediate_size = k
    ref = LlamaForCausalLM(cfg).eval()
    state = dict(original.state_dict())
    for i in range(cfg.num_hidden_layers):
        idx = kept[f"model.layers.{i}.mlp"]
        p = f"model.layers.{i}.mlp."
        state[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][idx]
        state[p + "up_proj.weight"] = state[p + "up_proj.weight"][idx]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, idx]
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("with_calib", [False, True])
def test_ffn_channels_shrinks_and_matches_sliced_reference(with_calib):
    original, _ = build_tiny_llama()
    model, _ = build_tiny_llama()
    calls = []
    kept = prune_ffn_channels(model, 0.25, calib() if with_calib else None,
                              progress=lambda d, c, t: calls.append((c, t)))
    assert calls[-1] == (2, 2)
    assert set(kept) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for name, idx in kept.items():
        assert idx.dtype == torch.int64 and idx.numel() == 96
        assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == 96
        mlp = model.get_submodule(name)
        assert mlp.gate_proj.weight.shape == (96, 64) and mlp.down_proj.weight.shape == (64, 96)
        orig = original.get_submodule(name)
        assert torch.equal(mlp.up_proj.weight, orig.up_proj.weight[idx])
        assert torch.equal(mlp.down_proj.weight, orig.down_proj.weight[:, idx])
        x = torch.randn(5, 64)
        hand = (nn.functional.silu(x @ orig.gate_proj.weight[idx].T) * (x @ orig.up_proj.weight[idx].T)) \
            @ orig.down_proj.weight[:, idx].T
        torch.testing.assert_close(mlp(x), hand, rtol=1e-5, atol=1e-6)
    assert model.config.intermediate_size == 96
    ref = _reference_llama(original, kept, 96)
    ids = torch.randint(3, 259, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, original(ids).logits, atol=1e-3)


def test_ffn_channels_calibration_changes_the_choice():
    a, b = skewed_tiny(), skewed_tiny()
    kept_w = prune_ffn_channels(a, 0.5)
    kept_a = prune_ffn_channels(b, 0.5, calib())
    assert any(not torch.equal(kept_w[k], kept_a[k]) for k in kept_w)


def test_ffn_channels_prunes_a_plain_mlp_too():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    kept = prune_ffn_channels(opt, 0.25)
    assert opt.config.ffn_dim == 24 and opt.model.decoder.layers[0].fc2.in_features == 24
    assert set(kept) == {"model.decoder.layers.0"}


def test_model_without_decoder_blocks_is_a_usage_error():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UsageError, match="no recognisable decoder blocks"):
        prune_magnitude(NoBlocks(), 0.5)


def test_blockwise_calibration_matches_full_forward_statistics():
    from adapterhub_c.variants.calibration import BlockwiseCalibrator, input_sq_norms, normalise_calibration

    model = skewed_tiny()
    rows = normalise_calibration(calib(n=5, length=20) + calib(n=2, length=9, seed=4))  # two lengths
    blocks = list(model.model.layers)
    mods = {"o": blocks[1].self_attn.o_proj, "down": blocks[1].mlp.down_proj}
    full = input_sq_norms(model, rows, mods, stop_after=blocks[1])
    cal = BlockwiseCalibrator(model, rows, blocks, batch_size=3)
    cal.advance(0)
    step = cal.stats(1, mods)
    for k in mods:
        torch.testing.assert_close(step[k], full[k], rtol=1e-4, atol=1e-5)
