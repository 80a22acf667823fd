"""GGUF variants in the registry (issue 26): bases stored as GGUF, variant add of a GGUF file / Hub repo,
variant create --quant gguf:TYPE (with pruning), export --format gguf; bad input refused in one line."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from adapterhub_c.formats.gguf_write import quantize_gguf, write_gguf_model
from adapterhub_c.models.gguf_tensors import read_gguf_state

sys.path.insert(0, str(Path(__file__).parent))
from gguftiny import TINY_GGUF_ARCH, smol_tokenizer, tiny_gguf_model  # noqa: E402

BASE = "tiny-smol-llama"
IDS = torch.arange(5, 37).view(1, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The cut SmolLM2 tokenizer, a tiny Llama as an HF folder and as F32 / Q8_0 / Q4_0 GGUFs, and a GGUF of
    another shape."""
    root = tmp_path_factory.mktemp("ggufvar")
    tok = smol_tokenizer(root / "tok")
    model = tiny_gguf_model("llama", tok)
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    f32 = write_gguf_model(model.state_dict(), model.config, root / "tok", root / "tiny.F32.gguf", ftype="f32")
    out = {"root": root, "tok": root / "tok", "hf": root / "hf", "model": model, "f32": f32}
    for t in ("Q8_0", "Q4_0"):
        out[t] = quantize_gguf(f32, root / f"tiny.{t}.gguf", t).path
    other = tiny_gguf_model("llama", tok)
    other.config.intermediate_size = TINY_GGUF_ARCH["intermediate_size"] // 2
    other = type(other)(other.config).eval()
    out["other"] = write_gguf_model(other.state_dict(), other.config, root / "tok", root / "other.gguf", ftype="f32")
    return out


@pytest.fixture
def base(reg, files):
    from adapterhub_c.workflows.bases import register_base_folder

    row, _ = register_base_folder(reg, BASE, files["hf"], None, None, None, None)
    return row


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _plain(config, state):
    """A plain transformers model of ``config`` holding ``state``."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32).eval()


def _nothing_registered(cli) -> None:
    assert json.loads(cli("variant", "ls", "--json").out) == []


def _one_line(r, *needles: str) -> None:
    assert r.code != 0 and len(r.err.strip().splitlines()) == 1, r.err
    for n in needles:
        assert n in r.err, r.err


def test_a_base_stored_as_a_gguf_is_its_dequantized_tensors_everywhere(reg, files, tmp_path):
    """A base folder holding a GGUF (as builtin:smollm2-135m is stored) loads, counts, and carries variants."""
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.workflows.bases import register_base_folder
    from adapterhub_c.workflows.variants import create_variant

    folder = tmp_path / "gguf-base"
    shutil.copytree(files["tok"], folder)
    shutil.copyfile(files["hf"] / "config.json", folder / "config.json")
    shutil.copyfile(files["Q8_0"], folder / files["Q8_0"].name)
    row, _ = register_base_folder(reg, "gguf-stored", folder, None, None, None, None)
    model = files["model"]
    assert row.params == sum(p.numel() for p in model.parameters())
    assert row.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert row.loaded_bytes == 4 * row.params and files["Q8_0"].stat().st_size < 1.1 * row.params  # Q8_0: ~1 byte
    loaded, _ = load_base_model(reg, row)
    # the base loads as its GGUF's tensors read by ours (models.gguf_tensors), and they are bit for bit
    # what transformers' own GGUF loader gives
    from transformers import AutoModelForCausalLM

    ours = read_gguf_state(files["Q8_0"], model.config)
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=files["Q8_0"].name, dtype=torch.float32)
    for name, t in ours.items():
        assert torch.equal(loaded.state_dict()[name], t), name
        assert torch.equal(theirs.state_dict()[name], t), name
    variant, created = create_variant(reg, row, prune="wanda", sparsity=0.5, quant="nf4", calib_samples=2,
                                      calib_seq_len=32, eval_tokens=0)
    assert created and variant.stats["storage"] == "delta" and variant.stored_bytes < row.size_bytes / 4
    w = load_variant(reg, variant).model.layers[0].mlp.up_proj
    assert w.weight.numel() > 0  # nf4 over base × masks loads


def test_variant_add_of_a_gguf_file_stores_the_file_and_computes_with_its_dequantized_tensors(cli, reg, base,
                                                                                           files):
    from adapterhub_c.runtime.variants import load_variant

    r = cli("variant", "add", str(files["Q4_0"]), "--base", BASE, "--eval-tokens", "0", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    size = files["Q4_0"].stat().st_size
    assert out["created"] and out["storage"] == "imported" and out["stored_bytes"] == size
    assert out["recipe"].startswith("gguf Q4_0") and 4.4 < out["bits_per_weight"] < 4.6  # 18 bytes per 32
    row = reg.get(out["name"], "variant")
    assert set(row.files) == {"config.json", files["Q4_0"].name}
    want = _logits(_plain(files["model"].config, read_gguf_state(files["Q4_0"], files["model"].config)))
    assert torch.equal(_logits(load_variant(reg, row)), want)
    assert not torch.equal(want, _logits(files["model"]))  # Q4_0 is not the float model
    again = json.loads(cli("variant", "add", str(files["Q4_0"]), "--base", BASE, "--eval-tokens", "0",
                           "--json").out)
    assert again["id"] == out["id"] and not again["created"]


def test_variant_add_refuses_bad_gguf_in_one_line_before_registering(cli, base, files, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["Q8_0"].read_bytes()[: files["Q8_0"].stat().st_size // 2])
    _one_line(cli("variant", "add", str(cut), "--base", BASE, "--eval-tokens", "0"), "truncated")
    _one_line(cli("variant", "add", str(files["other"]), "--base", BASE, "--eval-tokens", "0"),
              "tensor blk.0.ffn_", "shape")
    _nothing_registered(cli)


def test_variant_add_from_the_hub_picks_one_gguf(cli, base, files, hf):
    repo = "someone/tiny-smol-llama-GGUF"
    hf.store.create_repo(repo)
    hf.store.commit(repo, message="ggufs", add={p.name: p.read_bytes() for p in (files["Q8_0"], files["Q4_0"])})
    _one_line(cli("variant", "add", repo, "--base", BASE, "--eval-tokens", "0"), "2 GGUF files", "--include")
    _nothing_registered(cli)
    r = cli("variant", "add", f"{repo}:{files['Q8_0'].name}", "--base", BASE, "--eval-tokens", "0", "--json")
    assert r.code == 0, r.err
    first = json.loads(r.out)
    assert first["source"]["repo"] == repo and first["source"]["file"] == files["Q8_0"].name
    again = json.loads(cli("variant", "add", repo, "--include", "*Q8_0*", "--base", BASE, "--eval-tokens", "0",
                           "--json").out)
    local = json.loads(cli("variant", "add", str(files["Q8_0"]), "--base", BASE, "--eval-tokens", "0",
                           "--json").out)
    assert again["id"] == local["id"] == first["id"]


def test_variant_create_gguf_prunes_then_quantizes_and_is_idempotent(cli, reg, base, files):
    from adapterhub_c.runtime.variants import load_variant

    r = cli("variant", "create", BASE, "--quant", "gguf:Q8_0", "--prune", "magnitude", "--sparsity", "0.5",
            "--eval-tokens", "0", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    row = reg.get(out["name"], "variant")
    gguf_name = row.stats["gguf_file"]
    assert out["name"] == f"{BASE}-gguf-q8_0-mag50" and out["storage"] == "gguf" and not out["shares_base_weights"]
    assert set(row.files) == {"config.json", "variant.json", gguf_name}
    assert row.stats["gguf_bytes"] <= out["stored_bytes"] < row.stats["gguf_bytes"] + 16_000
    assert row.stats["gguf_types"]["Q8_0"] == 16  # every matrix: 7 per block x 2 blocks, embeddings, LM head
    up = load_variant(reg, row).model.layers[0].mlp.up_proj.weight
    assert 0.49 < float((up == 0).float().mean()) < 0.52  # pruned zeros stay zeros in Q8_0
    again = cli("variant", "create", BASE, "--quant", "gguf:Q8_0", "--prune", "magnitude", "--sparsity", "0.5",
                "--eval-tokens", "0", "--json")
    assert json.loads(again.out)["id"] == out["id"]
    _one_line(cli("variant", "create", BASE, "--quant", "gguf:Q8_0", "--moefy", "--experts", "2", "--active", "1",
                  "--eval-tokens", "0"), "MoE routing")


def test_export_gguf_copies_a_gguf_variant_and_converts_a_pruned_one(cli, reg, base, files, tmp_path):
    from adapterhub_c.runtime.variants import load_variant

    added = json.loads(cli("variant", "add", str(files["Q4_0"]), "--base", BASE, "--eval-tokens", "0",
                           "--json").out)
    r = cli("export", added["name"], "--out", str(tmp_path / "a"), "--format", "gguf", "--json")
    assert r.code == 0, r.err
    assert (tmp_path / "a" / files["Q4_0"].name).read_bytes() == files["Q4_0"].read_bytes()
    assert (tmp_path / "a" / "Modelfile").read_text() == f"FROM ./{files['Q4_0'].name}\n"
    pruned = json.loads(cli("variant", "create", BASE, "--prune", "magnitude", "--sparsity", "0.5",
                            "--eval-tokens", "0", "--json").out)
    r = cli("export", pruned["name"], "--out", str(tmp_path / "b"), "--format", "gguf", "--json")
    assert r.code == 0, r.err
    written = next((tmp_path / "b").glob("*.gguf"))
    assert written.name.endswith(".F32.gguf")  # the base is stored in float32: exact
    state = read_gguf_state(written, files["model"].config)
    vstate = load_variant(reg, pruned["name"]).state_dict()
    assert all(torch.equal(state[k], vstate[k]) for k in state)
    nf4 = json.loads(cli("variant", "create", BASE, "--quant", "nf4", "--eval-tokens", "0", "--json").out)
    _one_line(cli("export", nf4["name"], "--out", str(tmp_path / "c"), "--format", "gguf"), "gguf:TYPE")
    assert not (tmp_path / "c").exists()


def test_push_gguf_uploads_the_file_modelfile_and_a_gguf_card(cli, reg, base, files, hf, tmp_path):
    added = json.loads(cli("variant", "add", str(files["Q8_0"]), "--base", BASE, "--eval-tokens", "0",
                           "--json").out)
    r = cli("push", added["name"], "someone/tiny-q8-gguf", "--format", "gguf", "--token", hf.token, "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    names = {f["path"] for f in out["files"]}
    assert {files["Q8_0"].name, "Modelfile", "README.md", "adapterhub_c.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    from adapterhub_c.workflows.push import build_variant_push_folder

    build_variant_push_folder(reg, reg.get(added["name"], "variant"), tmp_path / "stage", "gguf")
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "library_name: gguf" in card and f"llama-cli -m {files['Q8_0'].name}" in card
    nf4 = json.loads(cli("variant", "create", BASE, "--quant", "nf4", "--eval-tokens", "0", "--json").out)
    _one_line(cli("push", nf4["name"], "someone/nf4-gguf", "--format", "gguf", "--dry-run"), "gguf:TYPE")


def test_the_whole_flow_runs_on_a_gguf_variant(reg, base, files):
    """Convert both ways (CA-LoRA, and --recover lowrank: a plain LoRA), pack and serve on an added Q4_0 GGUF."""
    from variantflow import FAST, TASK, convert_pack_serve

    from adapterhub_c.workflows.imports import add_variant
    from adapterhub_c.workflows.training import train_adapter

    train_adapter(reg, BASE, TASK, rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"],
                  name="src", baseline=False, **FAST)
    row, _ = add_variant(reg, str(files["Q4_0"]), BASE, eval_tokens=0)
    conv, low = convert_pack_serve(reg, row.name)
    assert conv.variant_id == low.variant_id == row.id


def _source(reg, base: str = BASE):
    from variantflow import FAST, TASK

    from adapterhub_c.workflows.training import train_adapter

    art, _ = train_adapter(reg, base, TASK, rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"],
                           name="src", baseline=False, **FAST)
    return art


def test_adapter_export_gguf_refuses_recovery_modules_and_another_base(cli, reg, base, files, tmp_path):
    from variantflow import FAST, TASK

    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.training import convert_adapter
    from adapterhub_c.workflows.variants import create_variant

    _source(reg)
    r = cli("export", "src", "--out", str(tmp_path / "src"), "--format", "gguf", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["adapter"] == "src" and out["variant"] == BASE
    assert (tmp_path / "src" / "Modelfile").read_text().splitlines() == [
        f"FROM ./{BASE}.F32.gguf", "ADAPTER ./src.lora.gguf"]
    _one_line(cli("export", "src", "--out", str(tmp_path / "x"), "--format", "hf"), "exports as gguf")
    dry = cli("push", "src", "someone/src-gguf", "--format", "gguf", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    pushed = {f["path"] for f in json.loads(dry.out)["files"]}
    assert pushed == {"src.lora.gguf", f"{BASE}.F32.gguf", "Modelfile", "README.md", "adapterhub_c.json"}
    row, _ = add_variant_q8(reg, files)
    convert_adapter(reg, "src", row.name, data=TASK, recover_rank=2, name="rec", reference_rows=False, **FAST)
    _one_line(cli("export", "rec", "--out", str(tmp_path / "r"), "--format", "gguf"), "recovery modules",
              "--recover lowrank")
    tiny = add_builtin_base(reg, "builtin:tiny-llama")[0]
    other, _ = create_variant(reg, tiny, prune="magnitude", sparsity=0.5, eval_tokens=0)
    _one_line(cli("export", "src", "--variant", other.name, "--out", str(tmp_path / "o"), "--format", "gguf"),
              f"base {BASE!r}", "builtin:tiny-llama")
    assert not any((tmp_path / n).exists() for n in ("x", "r", "o"))


def add_variant_q8(reg, files):
    from adapterhub_c.workflows.imports import add_variant

    return add_variant(reg, str(files["Q8_0"]), BASE, eval_tokens=0)


def _pull_convert_export_and_run(cli, reg, hf, base: str, gguf_file: Path, out: Path) -> None:
    """A GGUF pulled from the local Hub → variant add → convert --recover lowrank → export gguf (variant +
    LoRA + Modelfile) → llama.cpp (a subprocess without adapterhub_c): our logits and greedy tokens."""
    from test_gguf_llamacpp import QUANT_TOL, llama_cpp_run, ours, relative_gap

    from adapterhub_c.runtime.stack import StackSpec, load_stack
    from adapterhub_c.workflows.training import convert_adapter

    repo = f"someone/{base}-{gguf_file.stem}-GGUF"  # not the other tests' repos: the Hub server is shared
    hf.store.create_repo(repo)
    hf.store.commit(repo, message="gguf", add={gguf_file.name: gguf_file.read_bytes()})
    r = cli("variant", "add", repo, "--base", base, "--eval-tokens", "0", "--json")
    assert r.code == 0, r.err
    variant = reg.get(json.loads(r.out)["name"], "variant")
    _source(reg, base)
    convert_adapter(reg, "src", variant.name, recover="lowrank", recover_rank=2, calib_samples=2, calib_seq_len=32,
                    name="low", reference_rows=False, max_eval_tokens=100, max_eval_examples=1)
    r = cli("export", "low", "--out", str(out), "--format", "gguf", "--json")
    assert r.code == 0, r.err
    assert (out / gguf_file.name).read_bytes() == gguf_file.read_bytes()
    assert (out / "Modelfile").read_text().splitlines() == [f"FROM ./{gguf_file.name}", "ADAPTER ./low.lora.gguf"]
    model, tok = load_stack(reg, StackSpec(reg.get(base, "base"), variant, reg.get("low", "artifact")))
    tokens = tok("Reverse the words: a b c\nAnswer:").input_ids
    want, want_greedy = ours(model, tokens)
    got, got_greedy = llama_cpp_run(out / gguf_file.name, out / "low.lora.gguf", tokens, out.parent / "l.npy",
                                    f32_cache=False)
    gap = relative_gap(want, got)
    print(f"llama.cpp vs adapt, {gguf_file.name} + converted LoRA: relative max |Δlogit|", gap)
    assert gap <= QUANT_TOL
    assert got_greedy == want_greedy


def test_pull_variant_convert_export_and_llama_cpp_runs_it(cli, reg, base, files, hf, tmp_path):
    """Acceptance 2 on a tiny Llama's Q8_0 GGUF."""
    _pull_convert_export_and_run(cli, reg, hf, BASE, files["Q8_0"], tmp_path / "out")


def test_a_tiny_qwen2_in_a_4_bit_gguf_goes_the_same_way(cli, reg, files, hf, tmp_path):
    """Acceptance 1's second family and 4-bit type: a tiny Qwen2 exported to GGUF and quantized to Q4_0."""
    from adapterhub_c.workflows.bases import register_base_folder

    model = tiny_gguf_model("qwen2", smol_tokenizer(tmp_path / "tok"))
    model.save_pretrained(tmp_path / "hf")
    shutil.copytree(files["tok"], tmp_path / "hf", dirs_exist_ok=True)
    f32 = write_gguf_model(model.state_dict(), model.config, files["tok"], tmp_path / "qwen.F32.gguf", ftype="f32")
    q4 = quantize_gguf(f32, tmp_path / "qwen.Q4_0.gguf", "Q4_0").path
    register_base_folder(reg, "tiny-smol-qwen2", tmp_path / "hf", None, None, None, None)
    _pull_convert_export_and_run(cli, reg, hf, "tiny-smol-qwen2", q4, tmp_path / "out")


def test_variant_create_k_quant_goes_through_llama_cpps_quantizer(reg, base):
    pytest.importorskip("llama_cpp")
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.workflows.variants import create_variant

    row, created = create_variant(reg, BASE, quant="gguf:q4_k_m", eval_tokens=0)  # any case: canonical Q4_K_M
    assert created and row.name == f"{BASE}-gguf-q4_k_m" and json.loads(row.recipe)["quant"] == "gguf:Q4_K_M"
    assert row.stats["gguf_quantizer"] == "llama.cpp" and "Q4_K" in row.stats["gguf_types"]
    assert 4.0 < row.stats["bits_per_weight"] < 6.0
    assert load_variant(reg, row).model.layers[0].self_attn.q_proj.weight.shape == (256, 256)
