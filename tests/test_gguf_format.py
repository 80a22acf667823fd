"""GGUF in and out without llama.cpp: names, round trips, quantization error bounds, refusals."""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguftiny import smol_tokenizer, tiny_gguf_model

from adapterhub_c.errors import AdaptError, IntegrityError, UsageError
from adapterhub_c.formats.gguf_read import check_gguf_against, inspect_gguf
from adapterhub_c.formats.gguf_write import quantize_gguf, write_gguf_model
from adapterhub_c.models.gguf_names import gguf_arch, gguf_to_hf, hf_to_gguf, permute_for_gguf, unpermute_from_gguf
from adapterhub_c.models.gguf_tensors import read_gguf_state


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The cut SmolLM2 tokenizer, a tiny Llama (untied) and a tiny Qwen2 (tied), each written as f32 GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    tok = smol_tokenizer(root / "tok")
    out = {"root": root, "tok": root / "tok", "tokenizer": tok}
    for kind, tie in (("llama", False), ("qwen2", True)):
        model = tiny_gguf_model(kind, tok, tie=tie)
        out[kind] = model
        out[f"{kind}.f32"] = write_gguf_model(model.state_dict(), model.config, root / "tok", root / f"{kind}.gguf",
                                              ftype="f32")
    return out


def _state(model) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _state(model).items()}


def test_names_come_from_the_gguf_table_and_refuse_other_families():
    assert hf_to_gguf("llama", "model.layers.1.self_attn.q_proj.weight", 2) == "blk.1.attn_q.weight"
    assert hf_to_gguf("qwen2", "model.layers.0.self_attn.k_proj.bias", 2) == "blk.0.attn_k.bias"
    assert hf_to_gguf("llama", "lm_head.weight", 2) == "output.weight"
    assert gguf_to_hf("qwen2", "blk.1.ffn_down.weight", 2) == "model.layers.1.mlp.down_proj.weight"
    assert gguf_to_hf("llama", "token_embd.weight", 2) == "model.embed_tokens.weight"
    with pytest.raises(AdaptError, match="'gpt2'"):
        gguf_arch("gpt2")
    with pytest.raises(UsageError, match="no llama.cpp"):
        hf_to_gguf("llama", "model.layers.0.mlp.fc9.weight", 2)


def test_llama_qk_rows_are_interleaved_per_head_and_qwen2_is_left_alone():
    cfg = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
    k = torch.arange(2 * 8, dtype=torch.float32)[:, None].repeat(1, 3)  # 2 KV heads of head_dim 8
    p = permute_for_gguf("model.layers.0.self_attn.k_proj.weight", k, cfg)
    # head 0's rows 0..7 (two halves 0-3 | 4-7) become 0,4,1,5,2,6,3,7; head 1 likewise
    assert p[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(unpermute_from_gguf("model.layers.0.self_attn.k_proj.weight", p, cfg), k)
    assert torch.equal(permute_for_gguf("model.layers.0.self_attn.v_proj.weight", k, cfg), k)
    assert torch.equal(permute_for_gguf("model.layers.0.self_attn.k_proj.weight", k, {**cfg, "model_type": "qwen2"}), k)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f32_round_trip_is_exact_and_f16_is_the_f16_rounding(world, kind):
    model = world[kind]
    state = _state(model)
    info = inspect_gguf(world[f"{kind}.f32"])
    assert info.architecture == kind and info.block_count == 2
    assert info.file_size == world[f"{kind}.f32"].stat().st_size
    assert ("output.weight" in info.tensors) == (not model.config.tie_word_embeddings)
    check_gguf_against(info, model.config.to_dict(), _shapes(model), "f32")
    back = read_gguf_state(world[f"{kind}.f32"], model.config.to_dict())
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)

    f16 = write_gguf_model(state, model.config, world["tok"], world["root"] / f"{kind}.f16.gguf")
    types = inspect_gguf(f16).types()
    assert set(types) == {"F16", "F32"}  # matrices f16, norms (and Qwen2's biases) f32
    back = read_gguf_state(f16, model.config)
    for k, v in state.items():
        want = v if v.dim() == 1 else v.to(torch.float16).to(torch.float32)
        assert torch.equal(back[k], want), k


def _block_absmax(w: torch.Tensor) -> torch.Tensor:
    """max |w| over each 32-wide block along the last dimension, broadcast back to w's shape."""
    blocks = w.reshape(*w.shape[:-1], -1, 32).abs().amax(-1, keepdim=True)
    return blocks.expand(*w.shape[:-1], w.shape[-1] // 32, 32).reshape(w.shape)


# worst rounding error as a fraction of the 32-block's max |w|: Q8_0 half a step of absmax/127; Q4_0 a whole
# step of absmax/8 (scale = the signed extreme / -8, so the opposite extreme clamps from +8 to +7); Q5_1 half a
# step of (max - min)/31 <= 2·absmax/31
@pytest.mark.parametrize("type_name,frac", [("Q8_0", 0.5 / 127), ("Q4_0", 1 / 8), ("Q5_1", 1 / 31)])
def test_numpy_quants_read_back_within_their_rounding_error(world, type_name, frac):
    model = world["llama"]
    dest = world["root"] / f"llama.{type_name}.gguf"
    report = quantize_gguf(world["llama.f32"], dest, type_name)
    assert report.quantizer == "gguf" and report.fallbacks() == {}
    assert report.tensor_types["blk.0.attn_q.weight"] == type_name
    assert report.tensor_types["blk.0.attn_norm.weight"] == "F32"
    back = read_gguf_state(dest, model.config)
    for name, w in _state(model).items():
        err = (back[name] - w).abs()
        if w.dim() == 1:
            assert torch.equal(back[name], w)
            continue
        bound = _block_absmax(w) * (frac + 2 ** -9) + 1e-7  # 2^-9: the f16 rounding of scale and minimum
        assert bool((err <= bound).all()), (name, float((err - bound).max()))
    # Q8_0 is what ggml computes: our reader gives exactly gguf.quants' values
    if type_name == "Q8_0":
        q = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
        want = gguf.quants.dequantize(gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(back["model.layers.0.mlp.up_proj.weight"].numpy(), want)


def test_a_shape_changed_or_foreign_gguf_is_refused_naming_the_tensor(world):
    llama = world["llama"]
    state = _state(llama)
    wide = dict(state)
    wide["model.layers.1.mlp.up_proj.weight"] = torch.zeros(512, 256)
    cfg = llama.config.to_dict()
    changed = write_gguf_model(state, cfg, world["tok"], world["root"] / "changed.gguf", ftype="f32")
    base = _shapes(llama)
    base["model.layers.1.mlp.up_proj.weight"] = (384, 256)
    with pytest.raises(UsageError, match=r"blk\.1\.ffn_up\.weight .* shape \[512, 256\], the base's is \[384, 256\]"):
        check_gguf_against(inspect_gguf(changed), cfg, base, "changed.gguf")
    with pytest.raises(UsageError, match="architecture 'qwen2', the base is 'llama'"):
        check_gguf_against(inspect_gguf(world["qwen2.f32"]), cfg, _shapes(llama), "q.gguf")
    fewer = {k: v for k, v in _shapes(llama).items() if k != "model.norm.weight"}
    with pytest.raises(UsageError, match="output_norm.weight is not in the base"):
        check_gguf_against(inspect_gguf(world["llama.f32"]), cfg, fewer, "x.gguf")


def test_truncated_corrupt_and_undequantizable_files_are_refused_in_one_line(world, tmp_path):
    data = world["llama.f32"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(IntegrityError, match="truncated") as e:
        inspect_gguf(cut)
    assert "\n" not in str(e.value)
    with pytest.raises(IntegrityError):
        read_gguf_state(cut, world["llama"].config)
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:4] + data[4:8] + (2 ** 62).to_bytes(8, "little") + data[16:])  # absurd tensor count
    with pytest.raises(IntegrityError, match="corrupt|truncated"):
        inspect_gguf(header)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(IntegrityError, match="not a GGUF"):
        inspect_gguf(notgguf)
    ints = tmp_path / "ints.gguf"
    w = gguf.GGUFWriter(ints, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UsageError, match="token_embd.weight has type I32"):
        inspect_gguf(ints)


def test_writer_refusals_leave_nothing_behind(world, tmp_path):
    from adapterhub_c.models.tiny import build_tiny

    gpt2, _ = build_tiny("gpt2")
    with pytest.raises(AdaptError, match="'gpt2'"):
        write_gguf_model(gpt2.state_dict(), gpt2.config, world["tok"], tmp_path / "g.gguf")
    byte_model, byte_tok = build_tiny("llama")
    byte_tok.save_pretrained(tmp_path / "bytetok")
    with pytest.raises(UsageError, match="no merges"):
        write_gguf_model(byte_model.state_dict(), byte_model.config, tmp_path / "bytetok", tmp_path / "b.gguf")
    with pytest.raises(UsageError, match="ftype 'q4_0'"):
        write_gguf_model(byte_model.state_dict(), byte_model.config, world["tok"], tmp_path / "b.gguf", ftype="q4_0")
    with pytest.raises(UsageError, match="GGUF type 'Q7_X'"):
        quantize_gguf(world["llama.f32"], tmp_path / "q.gguf", "Q7_X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bytetok"]


def test_a_k_quant_without_llama_cpp_says_to_install_the_extra(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UsageError, match=r"install the extra .*llama-cpp-python"):
        quantize_gguf(world["llama.f32"], tmp_path / "k.gguf", "q4_k_m")
    assert not list(tmp_path.iterdir())


# ---- GGUF LoRA adapters ----------------------------------------------------------------------
def _lora_folder(dest: Path, modules: dict[str, tuple[int, int]], seed: int = 3, **config) -> Path:
    """A PEFT LoRA folder (rank 4, alpha 8) over ``modules`` {name: (out, in)}, written by our own LoraAdapter."""
    from adapterhub_c.adapters.lora import LoraAdapter, LoraLayer

    g = torch.Generator().manual_seed(seed)
    layers = {m: LoraLayer(A=torch.randn(4, i, generator=g), B=torch.randn(o, 4, generator=g), scale=2.0)
              for m, (o, i) in modules.items()}
    adapter = LoraAdapter.from_layers(layers, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config})
    adapter.config.update(config)
    return adapter.to_folder(dest)


def test_gguf_lora_is_laid_out_as_llama_cpp_reads_it(world, tmp_path):
    from adapterhub_c.formats.gguf_lora import write_gguf_lora

    cfg = world["llama"].config
    folder = _lora_folder(tmp_path / "lora", {"model.layers.1.self_attn.q_proj": (256, 256),
                                              "model.layers.0.mlp.down_proj": (256, 512)})
    report = write_gguf_lora(folder, cfg, tmp_path / "lora.gguf")
    assert report.alpha == 8 and report.folded == {} and report.architecture == "llama"
    r = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0
    tensors = {t.name: t for t in r.tensors}
    assert sorted(tensors) == ["blk.0.ffn_down.weight.lora_a", "blk.0.ffn_down.weight.lora_b",
                               "blk.1.attn_q.weight.lora_a", "blk.1.attn_q.weight.lora_b"]
    assert tensors["blk.0.ffn_down.weight.lora_a"].shape.tolist() == [512, 4]  # ggml order: ne0 = in
    assert tensors["blk.0.ffn_down.weight.lora_b"].shape.tolist() == [4, 256]
    from adapterhub_c.adapters.lora import LoraAdapter

    layer = LoraAdapter.from_folder(folder).layers()["model.layers.1.self_attn.q_proj"]
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight.lora_a"].data), layer.A.numpy())
    b = permute_for_gguf("model.layers.1.self_attn.q_proj.weight", layer.B, cfg)
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight.lora_b"].data), b.numpy())


def _refused(folder, cfg, tmp_path, pattern):
    from adapterhub_c.formats.gguf_lora import write_gguf_lora

    with pytest.raises(AdaptError, match=pattern) as e:
        write_gguf_lora(folder, cfg, tmp_path / "out.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "out.gguf").exists()
    return str(e.value)


def test_what_a_gguf_lora_cannot_hold_is_refused_with_the_reason(world, tmp_path):
    cfg = world["llama"].config
    q = {"model.layers.0.self_attn.q_proj": (256, 256)}
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_gguf_model("llama", world["tokenizer"]),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    peft.save_pretrained(tmp_path / "dora")  # a real PEFT DoRA folder, magnitude vectors included
    _refused(tmp_path / "dora", cfg, tmp_path, r"DoRA adapter \(use_dora\).*magnitude")
    recovered = _lora_folder(tmp_path / "rec", q)
    from adapterhub_c.adapters.recovery import FILE_NAME

    (recovered / FILE_NAME).write_bytes(b"")  # the file's presence is what marks a converted adapter
    _refused(recovered, cfg, tmp_path, r"recovery modules .*adapt convert --recover lowrank, whose output is a plain LoRA")
    prompted = _lora_folder(tmp_path / "prompt", q)
    (prompted / "prompt.safetensors").write_bytes(b"")
    _refused(prompted, cfg, tmp_path, "soft prompt")
    head = _lora_folder(tmp_path / "head", {"lm_head": (2048, 256)})
    _refused(head, cfg, tmp_path, "lm_head LoRA")
    odd = _lora_folder(tmp_path / "odd", {"model.layers.0.mlp.extra_proj": (256, 256)})
    _refused(odd, cfg, tmp_path, r"target module model\.layers\.0\.mlp\.extra_proj has no llama\.cpp \(llama\) name")
    wrong = _lora_folder(tmp_path / "wrong", {"model.layers.0.mlp.up_proj": (384, 256)})
    _refused(wrong, cfg, tmp_path, r"up_proj's LoRA is \[384, 256\] .* \[512, 256\]")
    from adapterhub_c.models.tiny import build_tiny

    _refused(_lora_folder(tmp_path / "g", q), build_tiny("gpt2")[0].config, tmp_path, "'gpt2'")


def test_embedding_loras_are_refused(world, tmp_path):
    from adapterhub_c.adapters.lora import LoraAdapter

    folder = _lora_folder(tmp_path / "emb", {"model.layers.0.self_attn.q_proj": (256, 256)})
    adapter = LoraAdapter.from_folder(folder)
    adapter.tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 2048)
    adapter.tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(256, 4)
    adapter.to_folder(folder)
    _refused(folder, world["llama"].config, tmp_path, r"embedding LoRA \(model\.embed_tokens\)")
