"""models/arch.py: blocks, linear roles, fused layouts and MLP pairing of six tiny architectures."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from adapterhub_c.errors import AdaptWarning, UsageError
from adapterhub_c.models import arch as A
from adapterhub_c.models.tiny import TINY_ARCHS, build_tiny

SIX = ("llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox")

EXPECTED = {  # local name → role, for block 0
    "llama": {"self_attn.q_proj": A.ATTN_IN, "self_attn.k_proj": A.ATTN_IN, "self_attn.v_proj": A.ATTN_IN,
              "self_attn.o_proj": A.ATTN_OUT, "mlp.gate_proj": A.MLP_IN, "mlp.up_proj": A.MLP_IN,
              "mlp.down_proj": A.MLP_OUT},
    "phi3": {"self_attn.qkv_proj": A.ATTN_IN, "self_attn.o_proj": A.ATTN_OUT, "mlp.gate_up_proj": A.MLP_IN,
             "mlp.down_proj": A.MLP_OUT},
    "gpt2": {"attn.c_attn": A.ATTN_IN, "attn.c_proj": A.ATTN_OUT, "mlp.c_fc": A.MLP_IN, "mlp.c_proj": A.MLP_OUT},
    "gpt_neox": {"attention.query_key_value": A.ATTN_IN, "attention.dense": A.ATTN_OUT,
                 "mlp.dense_h_to_4h": A.MLP_IN, "mlp.dense_4h_to_h": A.MLP_OUT},
}
EXPECTED["qwen2"] = EXPECTED["gemma2"] = EXPECTED["llama"]
TARGETS = {"llama": ["k_proj", "o_proj", "q_proj", "v_proj"], "phi3": ["o_proj", "qkv_proj"],
           "gpt2": ["attn.c_proj", "c_attn"], "gpt_neox": ["dense", "query_key_value"]}
TARGETS["qwen2"] = TARGETS["gemma2"] = TARGETS["llama"]


@pytest.fixture(scope="module")
def tiny_models():
    return {mt: build_tiny(mt)[0] for mt in SIX}


@pytest.mark.parametrize("model_type", SIX)
def test_table_roles_blocks_and_orientation(tiny_models, model_type):
    model = tiny_models[model_type]
    assert TINY_ARCHS[model_type]  # every tiny config is hidden 64, 2 layers
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptWarning)  # a table family never warns
        arch = A.describe(model)
    assert arch.family == model_type and not arch.discovered and len(arch.blocks) == 2
    assert {k: v.role for k, v in arch.blocks[0].linears.items()} == EXPECTED[model_type]
    assert arch.lora_targets() == TARGETS[model_type]
    for info in arch.linears().values():
        assert info.fan_in_fan_out == (model_type == "gpt2")
        assert info.kind == ("conv1d" if model_type == "gpt2" else "linear")
        w = A.weight_out_in(info.module)
        assert tuple(w.shape) == (info.out_features, info.in_features)
        x = torch.randn(3, info.in_features)
        torch.testing.assert_close(info.module(x) - (info.module.bias if info.module.bias is not None else 0),
                                   x @ w.t(), rtol=1e-5, atol=1e-5)
    mlp = arch.blocks[0].mlp
    assert mlp is not None and mlp.intermediate == 128
    assert mlp.gated == (model_type not in ("gpt2", "gpt_neox"))
    assert arch.intermediate_key == ("n_inner" if model_type == "gpt2" else "intermediate_size")
    assert getattr(model.config, arch.intermediate_key) == 128
    assert "decoder blocks" in arch.summary()


def test_fused_layouts_match_the_models_own_split(tiny_models):
    phi = A.describe(tiny_models["phi3"]).blocks[0]
    qkv = phi.linears["self_attn.qkv_proj"].fused
    assert qkv.sizes == (64, 32, 32) and torch.equal(qkv.rows("k"), torch.arange(64, 96))
    gate_up = phi.linears["mlp.gate_up_proj"].fused
    assert gate_up.labels == ("gate", "up") and torch.equal(gate_up.rows("up"), torch.arange(128, 256))
    assert phi.mlp.halves == {"gate_up_proj": 2}
    assert torch.equal(phi.mlp.channel_rows("gate_up_proj", torch.tensor([0, 5])), torch.tensor([0, 5, 128, 133]))
    # NeoX interleaves q, k, v per head: view(heads, 3 * head_dim)
    neox = A.describe(tiny_models["gpt_neox"]).blocks[0].linears["attention.query_key_value"].fused
    by_head = torch.arange(192).view(4, 48)
    assert torch.equal(neox.rows("v"), by_head[:, 32:].reshape(-1))
    gpt2 = A.describe(tiny_models["gpt2"]).blocks[0].linears["attn.c_attn"]
    assert gpt2.fused.sizes == (64, 64, 64) and gpt2.out_features == 192


def test_quantized_conv1d_becomes_an_out_in_bnb_linear(tmp_path, tiny_models):
    from adapterhub_c.variants.quantize import load_quantized

    tiny_models["gpt2"].save_pretrained(tmp_path / "gpt2")
    model = load_quantized(tmp_path / "gpt2", "nf4")
    arch = A.describe(model)
    info = arch.blocks[0].linears["attn.c_attn"]
    assert info.kind == "bnb4" and not info.fan_in_fan_out
    assert (info.in_features, info.out_features) == (64, 192)


def test_unknown_model_type_is_discovered_and_says_so(monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32))
    monkeypatch.delitem(A.FAMILIES, "opt")
    with pytest.warns(AdaptWarning, match=r"model type 'opt' \(discovered by type\).*fc1 \(mlp-in\)"):
        arch = A.describe(opt)
    assert arch.discovered
    roles = {k: v.role for k, v in arch.blocks[0].linears.items()}
    assert roles == {"self_attn.k_proj": A.ATTN_IN, "self_attn.v_proj": A.ATTN_IN, "self_attn.q_proj": A.ATTN_IN,
                     "self_attn.out_proj": A.ATTN_OUT, "fc1": A.MLP_IN, "fc2": A.MLP_OUT}
    mlp = arch.blocks[0].mlp
    assert (mlp.inputs, mlp.output, mlp.gated, mlp.intermediate) == (("fc1",), "fc2", False, 32)
    assert arch.intermediate_key == "ffn_dim"


def test_no_decoder_blocks_is_a_usage_error_naming_type_and_findings():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "weird"})()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UsageError, match=r"model type 'weird': no recognisable decoder blocks.*1 linear layers \(proj\)"):
        A.describe(Weird())


def test_peft_wrapped_model_keeps_bare_names(tiny_models):
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny("gpt2")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    arch = A.describe(peft_model)
    info = arch.linear("base_model.model.transformer.h.0.attn.c_attn")
    assert info is not None and info.kind == "conv1d" and info.name == "transformer.h.0.attn.c_attn"


# ---- pruning along the right axes (variants/pruning.py through the description) -------------
def _calib(n: int = 4, length: int = 16):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 259, (length,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("model_type", SIX)
def test_wanda_and_2_4_prune_each_output_row_along_its_inputs(model_type):
    from adapterhub_c.variants.pruning import prune_2_4, prune_wanda

    model, _ = build_tiny(model_type)
    arch = A.describe(model)
    first = next(iter(arch.blocks[0].linears.values()))
    w0 = A.weight_out_in(first.module).detach().clone()
    sq = torch.zeros(first.in_features)

    def accumulate(_module, args):
        sq.add_((args[0].reshape(-1, sq.numel()) ** 2).sum(0))

    hook = first.module.register_forward_pre_hook(accumulate)
    with torch.no_grad():
        for row in _calib():
            model(row[None])
    hook.remove()
    expected = torch.ones_like(w0, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(w0.abs() * sq.sqrt()[None, :], dim=1, stable=True)[:, :w0.shape[1] // 2], False)
    prune_wanda(model, 0.5, _calib())
    assert torch.equal(A.weight_out_in(first.module) != 0, expected)  # block 0 sees the unpruned inputs
    for info in A.describe(model).linears().values():
        w = A.weight_out_in(info.module)
        assert ((w != 0).sum(dim=1) == info.in_features // 2).all(), info.name
    model, _ = build_tiny(model_type)
    prune_2_4(model)
    for info in A.describe(model).linears().values():
        w = A.weight_out_in(info.module)
        assert ((w.reshape(info.out_features, -1, 4) != 0).sum(dim=2) == 2).all(), info.name


def test_layer_granularity_ranks_each_fused_part_alone():
    from adapterhub_c.variants.pruning import kept_at_sparsity, prune_magnitude

    model, _ = build_tiny("phi3")
    prune_magnitude(model, 0.5, granularity="layer")
    info = A.describe(model).blocks[0].linears["self_attn.qkv_proj"]
    w = info.module.weight
    for label, n in zip(info.fused.labels, info.fused.sizes, strict=True):
        assert int((w[info.fused.rows(label)] != 0).sum()) == kept_at_sparsity(n * 64, sparsity=0.5), label


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "gpt_neox", "gemma2"])
def test_ffn_channels_equals_zeroing_the_removed_channels(model_type, tmp_path):
    """Removing channels is the same model as zeroing their output columns; the result reloads."""
    from transformers import AutoModelForCausalLM

    from adapterhub_c.variants.pruning import prune_ffn_channels

    model, _ = build_tiny(model_type)
    ref, _ = build_tiny(model_type)
    kept = prune_ffn_channels(model, 0.25, _calib())
    arch = A.describe(model)
    assert getattr(model.config, arch.intermediate_key) == 96
    for b in A.describe(ref).blocks:
        idx = kept[b.mlp.name]
        assert idx.numel() == 96
        out = getattr(b.mlp.module, b.mlp.output)
        drop = torch.ones(128, dtype=torch.bool)
        drop[idx] = False
        with torch.no_grad():
            w = A.weight_out_in(out)
            w[:, drop] = 0
    for b in arch.blocks:
        for attr in b.mlp.inputs:
            assert A.features(getattr(b.mlp.module, attr))[1] == 96 * b.mlp.halves[attr]
    ids = torch.randint(3, 259, (2, 12))
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_readme_support_table_names_real_tests():
    """Every `file.py::test_name` in the README's support table is a test that exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("### Supported architectures and adapter flavours"):]
    section = section[:section.index("\n### ", 5)]
    refs = re.findall(r"`(test_\w+\.py)::(test_\w+)", section)
    bare = re.findall(r"`(test_\w+\.py)` \(all\)", section)
    assert len(refs) >= 12 and bare == ["test_dora.py"]
    for file, name in refs:
        assert f"def {name}(" in (root / "tests" / file).read_text(), (file, name)
    for name in re.findall(r"`(?:…|::)(test_\w+)", section):
        assert any(f"def {name}(" in p.read_text() for p in (root / "tests").glob("test_*.py")), name
