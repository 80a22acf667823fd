"""Compensated conversion (issue 18): the weighted low-rank solve, the adapter, the registry path, plain PEFT."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import AdaptWarning, UsageError
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.training import peft_io
from adapterhub_c.training.compensate import (
    REG_LAMBDA,
    Moment,
    Moments,
    balanced,
    collect_moments,
    compensate,
    effective_weight,
    weighted_lowrank,
)
from adapterhub_c.training.convert import load_adapted

SOURCE_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 44, 120, 200, 17]])


@pytest.fixture(scope="module")
def source() -> LoraAdapter:
    """A LoRA of the tiny base with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(SOURCE_TARGETS)))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_io.extract_lora(pm)


def pruned() -> nn.Module:
    """The tiny base with the smaller half of every row of every block linear zeroed."""
    model = build_tiny_llama()[0]
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                w = mod.weight
                thr = w.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
                w.masked_fill_(w.abs() <= thr, 0.0)
    return model


def calib_rows(n: int = 6, length: int = 40, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (1, length), generator=gen) for _ in range(n)]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_target(base, variant, source, name) -> torch.Tensor:
    W = base.get_submodule(name).weight.double()
    D = W - variant.get_submodule(name).weight.double()
    if source is not None and name in source.layers():
        D = D + source.layers()[name].delta(torch.float64)
    return D


def adapter_delta(adapter: LoraAdapter, name: str) -> torch.Tensor:
    return adapter.layers()[name].delta(torch.float64)


# ---------------------------------------------------------------------------------------
# the solve


def test_weighted_svd_equals_a_direct_dense_float64_computation():
    gen = torch.Generator().manual_seed(3)
    D = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    X = torch.randn(200, 40, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, 40, dtype=torch.float64)
    C = X.T @ X / X.shape[0]
    f = weighted_lowrank(D, Moment.from_matrix(C, 200), rank=5)
    # the direct computation: C_reg^{1/2} by matrix square root, truncated SVD, map back
    C_reg = C + REG_LAMBDA * C.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    e, Q = torch.linalg.eigh(C_reg)
    root = Q @ torch.diag(e.sqrt()) @ Q.T
    U, s, Vh = torch.linalg.svd(D @ root)
    expected = (U[:, :5] * s[:5]) @ Vh[:5] @ torch.linalg.inv(root)
    torch.testing.assert_close(f.B @ f.A, expected, atol=1e-5, rtol=0)
    # it is the optimum: no other rank-5 matrix does better in the weighted norm (vs plain SVD here)
    plain = weighted_lowrank(D, None, rank=5)
    err = lambda L: torch.linalg.matrix_norm((D - L) @ root)  # noqa: E731
    assert err(f.B @ f.A) < err(plain.B @ plain.A)
    assert f.residual == pytest.approx(float(s[5:].pow(2).sum()), rel=1e-9)


def test_balanced_factors_keep_the_product_and_split_the_singular_values():
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(24, 6, generator=gen, dtype=torch.float64) * 30
    A = torch.randn(6, 40, generator=gen, dtype=torch.float64) / 50
    A2, B2 = balanced(A, B)
    assert A2.shape == A.shape and B2.shape == B.shape
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-10, rtol=0)
    sigma = torch.linalg.svdvals(B @ A)[:6]
    torch.testing.assert_close(A2 @ A2.T, torch.diag(sigma), atol=1e-10, rtol=0)
    torch.testing.assert_close(B2.T @ B2, torch.diag(sigma), atol=1e-10, rtol=0)


def test_short_calibration_is_regularised_never_nan():
    X = torch.randn(3, 40, dtype=torch.float64)  # 3 tokens, 40 features: rank 3
    m = Moment.from_matrix(X.T @ X / 3, 3)
    f = weighted_lowrank(torch.randn(16, 40, dtype=torch.float64), m, rank=8)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    zero = Moment.from_matrix(torch.zeros(40, 40), 10)  # no signal at all: plain Frobenius
    D = torch.randn(16, 40, dtype=torch.float64)
    g, h = weighted_lowrank(D, zero, rank=8), weighted_lowrank(D, None, rank=8)
    torch.testing.assert_close(g.B @ g.A, h.B @ h.A)
    with pytest.raises(UsageError, match="NaN"):
        Moment.from_matrix(torch.full((4, 4), float("nan")), 4)


# ---------------------------------------------------------------------------------------
# the adapter


def test_full_rank_with_identity_activations_reproduces_the_target_exactly(source):
    base, variant = build_tiny_llama()[0], pruned()
    with pytest.warns(AdaptWarning, match="clamped") as record:
        comp = compensate(base, variant, source, None, extra_rank=1000, targets="all")
    message = next(str(w.message) for w in record if "clamped" in str(w.message))
    assert "model.layers.0.self_attn.q_proj" in message
    assert comp.clamped and comp.warnings
    for name in comp.layers:
        torch.testing.assert_close(adapter_delta(comp.adapter, name), dense_target(base, variant, source, name),
                                   atol=1e-5, rtol=0)
    # and the variant + compensated LoRA computes what the base + source does (up to float32)
    ours = load_adapted(pruned(), comp.adapter)
    teacher = load_adapted(build_tiny_llama()[0], source)
    torch.testing.assert_close(logits(ours), logits(teacher), atol=1e-4, rtol=0)


def test_layers_ranks_and_the_peft_config(source):
    base, variant = build_tiny_llama()[0], pruned()
    moments = collect_moments(variant, calib_rows())
    # q/k/v and gate/up read one tensor: one moment each
    assert moments.groups["model.layers.0.self_attn.k_proj"] == moments.groups["model.layers.0.self_attn.q_proj"]
    assert moments.groups["model.layers.0.mlp.up_proj"] == moments.groups["model.layers.0.mlp.gate_proj"]
    assert len(moments.moments) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comp = compensate(base, variant, source, moments, extra_rank=3, targets="attn")
    layers = comp.adapter.layers()
    assert set(layers) == ({f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj",
                                                                                              "v_proj", "o_proj")}
                           | {m for m in source.modules()})
    assert layers["model.layers.0.self_attn.q_proj"].rank == 7      # r + R on a source layer
    assert layers["model.layers.0.self_attn.k_proj"].rank == 3      # R alone elsewhere
    assert layers["model.layers.0.mlp.up_proj"].rank == 4           # outside --targets attn: carried
    assert torch.equal(layers["model.layers.0.mlp.up_proj"].B, source.layers()["model.layers.0.mlp.up_proj"].B)
    cfg = comp.adapter.config
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    assert all(layer.scale == pytest.approx(1.0) for n, layer in layers.items() if "self_attn" in n)
    # each compensated layer: the weighted truncated SVD of its own target, with its own moment
    name = "model.layers.1.self_attn.v_proj"
    direct = weighted_lowrank(dense_target(base, variant, source, name), moments[name], 7)
    torch.testing.assert_close(adapter_delta(comp.adapter, name), direct.B @ direct.A, atol=1e-5, rtol=0)
    # stored balanced (distillation starts from these factors): the i-th row of A and the i-th
    # column of B both have norm √σ_i, where the solve's own B = U·Σ, A = Vᵀ·S⁻¹ do not
    layer = layers[name]
    torch.testing.assert_close(layer.A.norm(dim=1), layer.B.norm(dim=0), rtol=1e-4, atol=1e-7)
    sigma = torch.linalg.svdvals(direct.B @ direct.A)[:7].float()
    torch.testing.assert_close(layer.A.norm(dim=1).pow(2), sigma, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(direct.A.norm(dim=1).float(), direct.B.norm(dim=0).float(), rtol=0.1)
    # compensation alone (no source): rank R everywhere, the variant's own error
    alone = compensate(base, variant, None, moments, extra_rank=2, targets="all")
    assert {layer.rank for layer in alone.adapter.layers().values()} == {2}
    assert len(alone.adapter.layers()) == 14


def test_compensation_lowers_the_output_error_on_the_calibration_inputs(source):
    base, variant = build_tiny_llama()[0], pruned()
    rows = calib_rows(8)
    ids = torch.cat(rows[:2])
    teacher = logits(load_adapted(build_tiny_llama()[0], source), ids)

    def error(adapter):
        return (logits(load_adapted(pruned(), adapter), ids) - teacher).norm()

    weighted = compensate(base, variant, source, collect_moments(variant, rows), extra_rank=8)
    plain = compensate(base, variant, source, None, extra_rank=8)  # C = I: plain truncated SVD
    # random tiny weights make the pruning error far from low rank, yet rank 12 of 64 removes a good part of it,
    # and weighting by the activations does better than the plain SVD of the same rank
    assert error(weighted.adapter) < 0.7 * error(source)
    assert error(weighted.adapter) < error(plain.adapter)
    assert weighted.summary()["captured_mean"] > 0.7


def test_too_short_calibration_warns_and_stays_finite(source):
    base, variant = build_tiny_llama()[0], pruned()
    moments = collect_moments(variant, calib_rows(n=1, length=12))   # 12 tokens < 64 / 128 features
    with pytest.warns(AdaptWarning, match="too short") as record:
        comp = compensate(base, variant, source, moments, extra_rank=4)
    assert any("0.01·mean(diag C)·I" in str(w.message) for w in record)
    assert all(torch.isfinite(t).all() for t in comp.adapter.tensors.values())


def test_unreadable_effective_weight_is_refused(source):
    class PackedLinear(nn.Linear):  # an unknown quantizer's layer
        pass

    variant = pruned()
    layer = variant.model.layers[0].self_attn.o_proj
    packed = PackedLinear(layer.in_features, layer.out_features, bias=False)
    variant.model.layers[0].self_attn.o_proj = packed
    with pytest.raises(UsageError, match="model.layers.0.self_attn.o_proj.*unknown quantizer"):
        compensate(build_tiny_llama()[0], variant, source, None, extra_rank=2)
    with pytest.raises(UsageError, match="unknown quantizer"):
        effective_weight(packed, "x")
    with pytest.raises(UsageError, match="targets"):
        compensate(build_tiny_llama()[0], pruned(), source, None, extra_rank=2, targets="mlp")


def test_moments_match_a_direct_computation():
    variant = pruned()
    rows = calib_rows(3, 20)
    got = collect_moments(variant, rows, batch_size=2)
    seen = {}
    mod = variant.model.layers[1].mlp.down_proj
    handle = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        for r in rows:
            variant(input_ids=r)
    handle.remove()
    X = torch.cat(seen["x"]).double()
    m = got["model.layers.1.mlp.down_proj"]
    assert m.tokens == 60
    torch.testing.assert_close(m.matrix(), X.T @ X / 60, atol=1e-6, rtol=1e-5)
    assert isinstance(got, Moments)


# ---------------------------------------------------------------------------------------
# through the registry: adapt convert --recover lowrank


TASK = "builtin:task/reverse-words"
FAST = dict(steps=2, lr=3e-3, batch_size=2, seq_len=48, max_eval_tokens=200, max_eval_examples=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tiny base, an NF4 + wanda variant, an ffn-channels variant, and a source LoRA (q/v/up/down)."""
    from adapterhub_c.registry import Registry
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.training import train_adapter
    from adapterhub_c.workflows.variants import create_variant

    home = tmp_path_factory.mktemp("lowrank_home")
    reg = Registry(home=home)
    add_builtin_base(reg, "builtin:tiny-llama")
    nf4, _ = create_variant(reg, "builtin:tiny-llama", quant="nf4", prune="wanda", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0)
    ffn, _ = create_variant(reg, "builtin:tiny-llama", prune="ffn-channels", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0)
    train_adapter(reg, "builtin:tiny-llama", TASK, rank=4, alpha=8, targets=list(SOURCE_TARGETS), name="src",
                  baseline=False, **{**FAST, "steps": 4})
    yield {"reg": reg, "home": home, "nf4": nf4, "ffn": ffn}
    reg.close()


def run_cli(home, capsys, *args):
    from adapterhub_c.cli.main import main

    capsys.readouterr()
    try:
        main(["--home", str(home), *args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_zero_data_lowrank_is_a_plain_lora_and_moments_are_computed_once(world, monkeypatch):
    from adapterhub_c.runtime import compensation
    from adapterhub_c.workflows.training import convert_adapter

    reg, nf4 = world["reg"], world["nf4"]
    calls = []
    real = compensation.collect_moments
    monkeypatch.setattr(compensation, "collect_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = dict(recover="lowrank", recover_rank=4, calib_samples=4, calib_seq_len=64, max_eval_tokens=200,
                max_eval_examples=2)
    art, report = convert_adapter(reg, "src", nf4.name, name="lr-1", **opts)
    assert art.kind == "lora" and art.variant_id == nf4.id
    assert report["recover_method"] == "lowrank" and report["train"] is None
    assert report["compensation"]["moments_cached"] is False and len(calls) == 1
    folder = reg.materialize(art)
    assert not (folder / "recovery.safetensors").exists()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["base_model_name_or_path"] == "builtin:tiny-llama"
    assert len(LoraAdapter.from_folder(folder).layers()) == 14  # every decoder linear
    # a second adapter (and a second conversion) to the same variant reuses the moments
    art2, report2 = convert_adapter(reg, "src", nf4.name, name="lr-2", inherit=False, reference_rows=False, **opts)
    assert report2["compensation"]["moments_cached"] is True and len(calls) == 1
    assert {layer.rank for layer in LoraAdapter.from_folder(reg.materialize(art2)).layers().values()} == {4}
    by = {r["row"]: r for r in report["rows"]}
    assert by["variant + converted"]["completion_ppl"] < by["variant + source (naive)"]["completion_ppl"]


def test_lowrank_with_data_distils_from_the_compensated_lora(world):
    from adapterhub_c.workflows.training import convert_adapter

    reg, nf4 = world["reg"], world["nf4"]
    art, report = convert_adapter(reg, "src", nf4.name, data=TASK, recover="lowrank", recover_rank=2,
                                  recover_targets="attn", calib_samples=4, calib_seq_len=64, name="lr-data",
                                  reference_rows=False, **FAST)
    assert art.kind == "lora" and report["train"]["steps"] == 2 and "distill_loss_end" in report["train"]
    assert not (reg.materialize(art) / "recovery.safetensors").exists()
    layers = LoraAdapter.from_folder(reg.materialize(art)).layers()
    assert layers["model.layers.0.self_attn.q_proj"].rank == 6 and layers["model.layers.0.self_attn.k_proj"].rank == 2


def test_ffn_channels_variant_compensation_is_sliced(world):
    from adapterhub_c.runtime.adapters import load_adapter_artifact
    from adapterhub_c.runtime.variants import variant_kept_indices
    from adapterhub_c.workflows.training import convert_adapter

    reg, ffn = world["reg"], world["ffn"]
    art, report = convert_adapter(reg, "src", ffn.name, recover="lowrank", recover_rank=2, calib_samples=2,
                                  calib_seq_len=64, name="lr-ffn", max_eval_tokens=200, max_eval_examples=1)
    kept = variant_kept_indices(reg, ffn)["model.layers.0.mlp"]
    got = load_adapter_artifact(reg, art).lora.layers()
    src = load_adapter_artifact(reg, reg.get("src", "artifact")).lora.layers()
    # unquantized ffn-channels keeps the base's own weights: the compensation is the sliced source update
    up = "model.layers.0.mlp.up_proj"
    torch.testing.assert_close(got[up].delta(torch.float64), src[up].delta(torch.float64)[kept], atol=1e-5, rtol=0)
    assert "model.layers.0.self_attn.k_proj" in report["compensation"]["skipped"]  # nothing to compensate
    by = {r["row"]: r for r in report["rows"]}
    assert by["variant + converted"]["completion_ppl"] == pytest.approx(by["variant + source (naive)"]["completion_ppl"],
                                                                    rel=1e-4)


PLAIN_PEFT = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
import bitsandbytes as bnb
variant_dir, adapter_dir, out = sys.argv[1:4]
# an `adapt export --format hf` folder: bitsandbytes-serialized NF4 weights and their quantization_config
model = AutoModelForCausalLM.from_pretrained(variant_dir, dtype=torch.float32, device_map={"": "cpu"})
for m in model.modules():
    if isinstance(m, bnb.nn.Linear4bit):
        m.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(model, adapter_dir).eval()
ids = torch.tensor([[5, 70, 80, 90, 100, 33, 44, 120, 200, 17]])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, out)
"""


def test_the_folder_loads_in_plain_peft_on_the_bnb_variant_with_our_logits(world, tmp_path):
    """The variant as `adapt export --format hf` writes it, the adapter folder as stored: plain
    transformers + bitsandbytes + PEFT in a subprocess give our loader's logits."""
    from adapterhub_c import api
    from adapterhub_c.runtime.stack import load_stack, resolve_stack

    reg, nf4 = world["reg"], world["nf4"]
    art = reg.get("lr-1", "artifact")
    ours, _ = load_stack(reg, resolve_stack(reg, nf4.name, adapter="lr-1"))
    expected = logits(ours)
    out = tmp_path / "logits.pt"
    exported = api.export(nf4.name, tmp_path / "variant", "hf", registry=reg).report["out"]
    proc = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(exported), str(reg.materialize(art)), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, logits(load_stack(reg, resolve_stack(reg, nf4.name))[0]), atol=1e-3)


def test_cli_convert_lowrank_and_bad_input(world, capsys, monkeypatch):
    home, nf4 = world["home"], world["nf4"]
    code, out, err = run_cli(home, capsys, "convert", "src", "--variant", nf4.name, "--recover", "lowrank",
                             "--recover-rank", "64", "--calib-samples", "1", "--calib-seq-len", "16",
                             "--max-eval-tokens", "100", "--max-eval-examples", "1", "--name", "lr-cli", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "lora"
    assert "warning: --recover-rank: rank clamped" in err and "model.layers.0.self_attn.k_proj" in err
    assert "warning: calibration too short" in err
    assert all(torch.isfinite(t).all() for t in LoraAdapter.from_folder(
        world["reg"].materialize(world["reg"].get("lr-cli", "artifact"))).tensors.values())
    code, out, err = run_cli(home, capsys, "convert", "src", "--variant", nf4.name, "--recover", "lowrank",
                             "--no-recover")
    assert code == 2 and "exclude" in err
    code, out, err = run_cli(home, capsys, "convert", "src", "--variant", nf4.name, "--recover", "lowrank",
                             "--calib", "builtin:nope")
    assert code == 2 and "builtin:nope" in err and len(err.strip().splitlines()) == 1

    # a variant whose effective weights cannot be read: one line, exit 2, nothing registered
    from adapterhub_c.workflows import training

    real = training.load_variant

    class PackedLinear(nn.Linear):
        pass

    def odd_variant(*a, **k):
        model = real(*a, **k)
        layer = model.model.layers[0].mlp.down_proj
        model.model.layers[0].mlp.down_proj = PackedLinear(layer.in_features, layer.out_features, bias=False)
        return model

    monkeypatch.setattr(training, "load_variant", odd_variant)
    code, out, err = run_cli(home, capsys, "convert", "src", "--variant", nf4.name, "--recover", "lowrank",
                             "--name", "lr-bad")
    assert code == 2, (out, err)
    assert "unknown quantizer" in err and len(err.strip().splitlines()) == 1
    from adapterhub_c.registry.artifacts import name_taken

    assert not name_taken(world["reg"], "lr-bad")


def test_batch_convert_lowrank_needs_no_data(world, capsys, tmp_path):
    home, nf4, reg = world["home"], world["nf4"], world["reg"]
    items = tmp_path / "items.txt"
    items.write_text("artifact:src\n")
    code, out, err = run_cli(home, capsys, "batch", "convert", "--variant", nf4.name, "--from-file", str(items),
                             "--recover", "lowrank", "--recover-rank", "2", "--targets", "attn", "--calib-samples",
                             "2", "--max-eval-tokens", "64", "--max-eval-examples", "1", "--no-reference-rows",
                             "--threads", "1", "--name", "lowrank-batch", "--json")
    assert code == 0, (out, err)
    item = json.loads(out)["items"][0]
    assert item["state"] == "done", item
    art = reg.get(item["result"], "artifact")
    assert art.kind == "lora" and art.variant_id == nf4.id and art.config["recover_method"] == "lowrank"
    assert art.config["compensation"]["targets"] == "attn"


def test_moment_cache_round_trips_exactly(tmp_path):
    from adapterhub_c.runtime.compensation import _read, _write

    moments = collect_moments(pruned(), calib_rows(2, 16))
    path = tmp_path / "m.safetensors"
    _write(path, moments, {"variant": "v"})
    back = _read(path)
    assert back.groups == moments.groups and back.moments.keys() == moments.moments.keys()
    for key, m in moments.moments.items():
        assert torch.equal(back.moments[key].Q, m.Q) and torch.equal(back.moments[key].e, m.e)
        assert back.moments[key].tokens == m.tokens == 32
    path.write_bytes(path.read_bytes()[:100])  # a broken file is recomputed, never trusted
    assert _read(path) is None


@pytest.mark.parametrize("model_type,mlp_in,mlp_out", [("phi3", "gate_up_proj", "down_proj"),
                                                       ("gpt2", "c_fc", "mlp.c_proj")])
def test_ffn_channels_compensation_slices_fused_and_conv1d_mlps(model_type, mlp_in, mlp_out):
    """On a fused gate/up (phi3) and a Conv1D MLP (gpt2), the ffn-channels compensation is the
    source's update sliced by the MLP pairing of models/arch: both halves of gate_up, the
    output linear's columns (unquantized ffn-channels keeps the base's own weights)."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.arch import describe
    from adapterhub_c.models.tiny import build_tiny
    from adapterhub_c.variants import Recipe, apply_recipe

    base = build_tiny(model_type)[0]
    pm = get_peft_model(build_tiny(model_type)[0], LoraConfig(r=2, lora_alpha=4, target_modules=[mlp_in, mlp_out],
                                                              fan_in_fan_out=model_type == "gpt2"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    src = peft_io.extract_lora(pm)
    variant = build_tiny(model_type)[0]
    build = apply_recipe(variant, Recipe(prune="ffn-channels", sparsity=0.5), None)
    comp = compensate(base, variant, src, None, extra_rank=1, targets="all", kept_indices=build.kept_indices)
    mlp = describe(variant, warn=False).blocks[0].mlp
    kept = build.kept_indices[mlp.name]
    got, want = comp.adapter.layers(), src.layers()
    inp, out = f"{mlp.name}.{mlp.inputs[0]}", f"{mlp.name}.{mlp.output}"
    full = want[inp].delta(torch.float64)
    halves = mlp.halves.get(mlp.inputs[0], 1)
    rows = torch.cat([kept + j * (full.shape[0] // halves) for j in range(halves)])
    torch.testing.assert_close(got[inp].delta(torch.float64), full[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[out].delta(torch.float64), want[out].delta(torch.float64)[:, kept],
                               atol=1e-6, rtol=0)
