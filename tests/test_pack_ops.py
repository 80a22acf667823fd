"""Packs in the registry and the CLI: pack / unpack / inspect / eval --adapter PACK,
recovery modules, alpha auto search, and bad input (all on the tiny base)."""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError

BASE = "builtin:tiny-llama"


# ---- fixtures ------------------------------------------------------------------------------
def _tiny_model(reg, base):
    from adapterhub_c.runtime.bases import load_base_model

    model, _ = load_base_model(reg, base)
    return model


def _make_lora(reg, base, tmp_path, name="lora1", seed=0, recovery=False, b_scale=0.25):
    """A random LoRA (r=4 on q/v) trained on nothing, registered as an artefact."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.training import peft_io

    model = _tiny_model(reg, base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    lora = peft_io.extract_lora(peft_model)
    for k in lora.tensors:  # B like a trained one: about the size of A, not 4x larger
        if ".lora_B." in k:
            lora.tensors[k] = lora.tensors[k] * b_scale
    extra = {}
    if recovery:
        from adapterhub_c.training.recovery import (
            FILE_NAME,
            RecoveryConfig,
            attach_recovery,
            recovery_file_bytes,
            recovery_state,
        )

        bare = _tiny_model(reg, base)
        cfg = RecoveryConfig(rank=4, act="gelu")
        mods = attach_recovery(bare, cfg)
        with torch.no_grad():
            for rec in mods.values():
                rec.U.normal_(0, 0.05)
        extra[FILE_NAME] = recovery_file_bytes(recovery_state(bare), cfg)
    folder = lora.to_folder(tmp_path / f"src-{name}", extra_files=extra)
    return register_artifact(reg, kind="recovered-lora" if recovery else "lora", name=name,
                             base_id=base.id, folder=folder)


@pytest.fixture
def lora(reg, tiny_base, tmp_path):
    return _make_lora(reg, tiny_base, tmp_path)


def _packs(cli):
    r = cli("ls", "--json")
    assert r.code == 0, r.err
    return [a for a in r.json() if a.get("kind") == "pack"]


def _blob_path(reg, name, rel):
    art = reg.get(name, "artifact")
    return reg.blobs.path_for(art.files[rel])


def _flip_byte(path, offset):
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- pack / unpack / PEFT --------------------------------------------------------------------
def test_default_tensor_scope_keeps_every_module_global_scope_warns(reg, tiny_base, cli, tmp_path):
    """A briefly trained LoRA has B far smaller than A: the global top-k keeps only A entries,
    zeroing every module's update; the per-tensor default keeps them all."""
    _make_lora(reg, tiny_base, tmp_path, name="smallb", b_scale=0.01)
    r = cli("pack", "smallb", "--density", "10%", "--json")
    assert r.code == 0, r.err
    assert r.json()["scope"] == "tensor" and r.json()["null_modules"] == [] and r.json()["method"] == "delta-fit"
    r = cli("pack", "smallb", "--density", "10%", "--method", "compeft", "--json", "--name", "smallb-compeft")
    assert r.code == 0 and r.json()["null_modules"] == [], r.err
    r = cli("pack", "smallb", "--density", "10%", "--method", "compeft", "--scope", "global", "--name",
            "smallb-global")
    assert r.code == 0, r.err
    assert "warning: the pack zeroes the whole update of 4 module(s)" in r.err and "--scope tensor" in r.err
    assert len(reg.get("smallb-global", "artifact").config["null_modules"]) == 4


def test_pack_registers_and_unpacks_to_plain_peft(reg, tiny_base, lora, cli, tmp_path):
    from peft import PeftModel

    from adapterhub_c.runtime.adapters import load_adapter_artifact
    from adapterhub_c.workflows.packs import PACK_FILE

    r = cli("pack", "lora1", "--density", "10%", "--alpha", "2", "--method", "compeft", "--scope", "global", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["name"] == "lora1-k10" and rep["density"] == 0.1 and rep["alpha"] == 2.0
    assert rep["encoding"] == "golomb" and rep["scope"] == "global" and not rep["recovery"]
    assert rep["source_digest"] == lora.files["adapter_model.safetensors"]
    assert rep["ratio_vs_fp16"] == pytest.approx(rep["fp16_bytes"] / rep["pack_bytes"])
    assert rep["ratio_vs_fp16"] > 1 and rep["bits_per_param"] < 1 and rep["quality"] is None and rep["alpha_curve_png"] is None

    art = reg.get("lora1-k10", "artifact")
    assert art.kind == "pack" and set(art.files) == {PACK_FILE} and art.variant_id is None
    assert art.config["base"] == BASE and art.config["source"] == "lora1"
    with reg.session() as s:
        assert [(role, p.name) for role, p in reg.parents(s, art)] == [("packed-from", "lora1")]

    # the decoded adapter is exactly ternary: one scale, 10% of the entries, signs of the source
    src = load_adapter_artifact(reg, lora).lora.tensors
    dec = load_adapter_artifact(reg, art).lora.tensors
    assert set(dec) == set(src)
    flat = torch.cat([dec[k].reshape(-1) for k in sorted(dec)])
    sflat = torch.cat([src[k].reshape(-1) for k in sorted(src)])
    nz = flat != 0
    assert int(nz.sum()) == round(0.1 * flat.numel())
    scale = 2.0 * float(sflat.double().std())
    assert torch.allclose(flat[nz].abs(), torch.full_like(flat[nz], scale), rtol=1e-6)
    assert torch.equal(torch.sign(flat[nz]), torch.sign(sflat[nz]))
    assert sflat[nz].abs().min() >= sflat[~nz].abs().max()  # top-k by magnitude

    out = tmp_path / "unpacked"
    r = cli("unpack", "lora1-k10", "--out", str(out), "--json")
    assert r.code == 0, r.err
    assert set(r.json()["files"]) == {"adapter_config.json", "adapter_model.safetensors", "adapterhub_c.json"}
    assert json.loads((out / "adapterhub_c.json").read_text())["unpacked_from"] == "lora1-k10"
    back = LoraAdapter.from_folder(out)
    assert all(torch.equal(back.tensors[k], dec[k]) for k in dec)
    peft_model = PeftModel.from_pretrained(_tiny_model(reg, tiny_base), str(out))
    key = next(k for k in dec if k.endswith("q_proj.lora_A.weight"))
    param = dict(peft_model.named_parameters())[key.replace("lora_A.weight", "lora_A.default.weight")]
    assert torch.equal(param.detach(), dec[key])

    # unpack refuses to overwrite a non-empty folder
    r = cli("unpack", "lora1-k10", "--out", str(out))
    assert r.code == 2 and "not an empty folder" in r.err


def test_eval_with_pack_equals_eval_with_unpacked_folder(reg, tiny_base, lora, cli, tmp_path):
    from adapterhub_c.registry.artifacts import register_artifact

    assert cli("pack", "lora1", "--density", "0.2", "--alpha", "4", "--encoding", "bitmask",
               "--name", "p20").code == 0
    assert cli("unpack", "p20", "--out", str(tmp_path / "u")).code == 0
    register_artifact(reg, kind="lora", name="u20", base_id=tiny_base.id, folder=tmp_path / "u")
    args = ("--data", "builtin:pydoc", "--split", "validation", "--max-tokens", "400", "--json")
    packed = cli("eval", BASE, "--adapter", "p20", *args)
    unpacked = cli("eval", BASE, "--adapter", "u20", *args)
    source = cli("eval", BASE, "--adapter", "lora1", *args)
    assert packed.code == unpacked.code == source.code == 0, packed.err + unpacked.err
    assert packed.json()["perplexity"] == unpacked.json()["perplexity"]
    assert packed.json()["perplexity"] != source.json()["perplexity"]  # the pack is not the source


def test_recovered_lora_pack_keeps_recovery(reg, tiny_base, cli, tmp_path):
    from adapterhub_c.packing import RECOVERY_PREFIX, read_pack
    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.runtime.adapters import load_adapter_artifact
    from adapterhub_c.training.recovery import FILE_NAME, read_recovery_file
    from adapterhub_c.workflows.packs import PACK_FILE

    src_art = _make_lora(reg, tiny_base, tmp_path, name="conv", recovery=True)
    r = cli("pack", "conv", "--density", "0.1", "--alpha", "3", "--method", "compeft", "--scope", "global", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["recovery"] and rep["source_kind"] == "recovered-lora"
    assert rep["recovery_config"]["act"] == "gelu" and rep["recovery_config"]["rank"] == 4

    src = load_adapter_artifact(reg, src_art)
    art = reg.get(rep["name"], "artifact")
    pack = read_pack(reg.materialize(art) / PACK_FILE, expected_base=BASE)
    assert sum(n.startswith(RECOVERY_PREFIX) for n in pack.tensors) == len(src.recovery_state)
    dec = load_adapter_artifact(reg, art)
    assert set(dec.recovery_state) == set(src.recovery_state)
    assert (dec.recovery_config.act, dec.recovery_config.scale) == (src.recovery_config.act,
                                                                    src.recovery_config.scale)
    # one global top-k and std over LoRA factors and recovery tensors together
    vals = torch.cat([t.reshape(-1) for t in [*dec.lora.tensors.values(), *dec.recovery_state.values()]])
    assert len(set(vals[vals != 0].abs().tolist())) == 1
    assert (vals != 0).sum() == round(0.1 * vals.numel())

    out = tmp_path / "unpacked"
    assert cli("unpack", rep["name"], "--out", str(out)).code == 0
    state, cfg = read_recovery_file(out / FILE_NAME)
    assert all(torch.equal(state[k], dec.recovery_state[k]) for k in state) and set(state) == set(dec.recovery_state)
    assert cfg.scale == src.recovery_config.scale
    assert not any("recovery" in k for k in LoraAdapter.from_folder(out).tensors)

    # the pack evaluates like its unpacked folder (recovery attached), unlike the LoRA part alone
    register_artifact(reg, kind="recovered-lora", name="conv-u", base_id=tiny_base.id, folder=out)
    (out / FILE_NAME).unlink()
    register_artifact(reg, kind="lora", name="conv-lora-only", base_id=tiny_base.id, folder=out)
    args = ("--data", "builtin:pydoc", "--max-tokens", "300", "--json")
    ppl = {n: cli("eval", BASE, "--adapter", n, *args).json()["perplexity"]
           for n in (rep["name"], "conv-u", "conv-lora-only")}
    assert ppl[rep["name"]] == ppl["conv-u"] != ppl["conv-lora-only"]


# ---- alpha search ----------------------------------------------------------------------------
def test_alpha_auto_picks_the_grid_argmin_and_draws_the_curve(reg, tiny_base, lora, cli):
    from adapterhub_c.packing.alpha import ALPHA_GRID
    from adapterhub_c.registry.models import Run
    from adapterhub_c.workflows.packs import CURVE_FILE, PACK_FILE

    r = cli("pack", "lora1", "--density", "0.2", "--alpha", "auto", "--eval-data", "builtin:pydoc",
            "--max-tokens", "300", "--method", "compeft", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    search = rep["alpha_search"]
    curve = search["curve"]
    assert [p["alpha"] for p in curve] == list(ALPHA_GRID) and search["metric"] == "perplexity"
    ppls = [p["perplexity"] for p in curve]
    assert len(set(ppls)) > 1 and all(math.isfinite(p) for p in ppls)
    best = min(curve, key=lambda p: p["perplexity"])["alpha"]
    assert rep["alpha"] == search["best"] == best
    assert rep["quality"]["pack"]["perplexity"] == min(ppls)
    assert rep["quality"]["unpacked"]["perplexity"] == search["unpacked"]["perplexity"]

    art = reg.get(rep["name"], "artifact")
    assert set(art.files) == {PACK_FILE, CURVE_FILE}
    assert art.config["alpha_search"]["curve"] == curve and art.config["alpha"] == best
    png = rep["alpha_curve_png"]
    assert png.endswith(CURVE_FILE)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with reg.session() as s:
        run = s.get(Run, art.run_id)
        assert run.command == "pack" and run.status == "succeeded"
        assert run.output["alpha_search"]["curve"]["2"]["perplexity"] == curve[2]["perplexity"]

    # swapping weights into one model gives what a fresh model with that alpha gives
    r2 = cli("pack", "lora1", "--density", "0.2", "--alpha", "2", "--eval-data", "builtin:pydoc",
             "--max-tokens", "300", "--method", "compeft", "--json")
    assert r2.code == 0, r2.err
    assert r2.json()["quality"]["pack"]["perplexity"] == curve[ALPHA_GRID.index(2.0)]["perplexity"]
    assert r2.json()["quality"]["unpacked"] == search["unpacked"]


def test_alpha_auto_with_delta_fit_searches_its_gains(reg, tiny_base, lora, cli):
    from adapterhub_c.packing.deltafit import GAIN_GRID

    r = cli("pack", "lora1", "--density", "0.2", "--alpha", "auto", "--eval-data", "builtin:pydoc",
            "--max-tokens", "300", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    curve = rep["alpha_search"]["curve"]
    assert rep["method"] == "delta-fit" and [p["alpha"] for p in curve] == list(GAIN_GRID)
    assert rep["alpha"] == min(curve, key=lambda p: p["perplexity"])["alpha"]


def test_alpha_auto_on_a_task_uses_exact_match_then_completion_perplexity(reg, tiny_base, lora, cli):
    r = cli("pack", "lora1", "--density", "0.3", "--alpha", "auto", "--eval-data", "builtin:task/uppercase",
            "--max-examples", "2", "--max-tokens", "200", "--json")
    assert r.code == 0, r.err
    search = r.json()["alpha_search"]
    assert search["metric"] == "exact_match" and search["max_examples"] == 2 and search["max_tokens"] is None
    assert all(set(p) == {"alpha", "exact_match", "completion_ppl"} for p in search["curve"])
    key = min(search["curve"], key=lambda p: (-p["exact_match"], p["completion_ppl"]))
    assert search["best"] == key["alpha"]


def test_alpha_metric_perplexity_on_a_task_is_completion_perplexity():
    from adapterhub_c.packing.alpha import resolve_metric

    assert resolve_metric("perplexity", is_task=True) == "completion_ppl"
    assert resolve_metric("perplexity", is_task=False) == "perplexity"
    with pytest.raises(UsageError, match="completion_ppl needs a task"):
        resolve_metric("completion_ppl", is_task=False)


# ---- inspect ---------------------------------------------------------------------------------
def test_inspect_by_name_and_by_path(reg, tiny_base, lora, cli):
    from adapterhub_c.packing import entropy_bound

    assert cli("pack", "lora1", "--density", "0.05", "--alpha", "5", "--method", "compeft", "--scope", "tensor",
               "--name", "p5").code == 0
    r = cli("pack", "inspect", "p5", "--json")
    assert r.code == 0, r.err
    st = r.json()
    assert st["name"] == "p5" and st["scope"] == "tensor" and st["density"] == 0.05
    src = LoraAdapter.from_folder(reg.materialize(reg.get("lora1", "artifact"))).tensors
    assert set(st["tensors"]) == set(src)
    for name, row in st["tensors"].items():
        assert row["numel"] == src[name].numel() and row["density"] == row["nnz"] / row["numel"]
        assert row["entropy_bits_per_param"] == pytest.approx(entropy_bound(row["density"]))
        assert row["bits_per_param"] == row["encoded_bits"] / row["numel"]
        assert row["scale"] == pytest.approx(5 * float(src[name].double().std()), rel=1e-6)
    t = st["totals"]
    assert t["numel"] == sum(v.numel() for v in src.values())
    assert t["ratio_vs_fp16"] == pytest.approx(16 / t["bits_per_param"])
    assert t["file_bytes"] > 0 and t["file_ratio_vs_fp16"] > 1

    by_path = cli("pack", "inspect", st["path"], "--json")
    assert by_path.code == 0 and by_path.json()["tensors"] == st["tensors"]
    table = cli("pack", "inspect", "p5")
    assert table.code == 0 and "totals" in table.out


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("density", ["0", "1.5", "-0.1", "abc", "150%"])
def test_bad_density_is_refused_and_nothing_registered(reg, tiny_base, lora, cli, density):
    r = cli("pack", "lora1", "--density", density)
    assert r.code == 2 and "density" in r.err
    assert _packs(cli) == []


@pytest.mark.parametrize("args, message", [
    (("--alpha", "auto"), "--eval-data"),
    (("--alpha", "-1"), "alpha"),
    (("--alpha", "x"), "alpha"),
    (("--name", "lora1"), "already exists"),
    (("--name", ""), "must not be empty"),
    (("--alpha", "auto", "--eval-data", "builtin:nope"), "unknown dataset"),
    (("--alpha", "auto", "--eval-data", "builtin:pydoc", "--alpha-metric", "exact_match"), "task"),
    (("--alpha", "auto", "--eval-data", "builtin:pydoc", "--method", "stc"), "ignores alpha"),
    (("--scope", "global"), "needs scope tensor"),  # the default method, delta-fit, fits per module
])
def test_bad_options_are_refused(reg, tiny_base, lora, cli, args, message):
    r = cli("pack", "lora1", "--density", "0.1", *args)
    assert r.code == 2 and message in r.err, r.err
    assert _packs(cli) == []


def test_pack_of_a_pack_and_of_unknown_name(reg, tiny_base, lora, cli):
    assert cli("pack", "lora1", "--density", "0.1", "--name", "p").code == 0
    r = cli("pack", "p", "--density", "0.1")
    assert r.code == 2 and "already a pack" in r.err
    r = cli("pack", "lora2", "--density", "0.1")
    assert r.code == 2 and "lora1" in r.err  # suggestion
    r = cli("unpack", "lora1")
    assert r.code == 2 and "not a pack" in r.err


def test_tampered_blobs_are_integrity_errors(reg, tiny_base, lora, cli, tmp_path):
    from adapterhub_c.workflows.packs import PACK_FILE

    assert cli("pack", "lora1", "--density", "0.1", "--name", "p").code == 0
    _flip_byte(_blob_path(reg, "p", PACK_FILE), 200)
    for args in (("unpack", "p", "--out", str(tmp_path / "x")),
                 ("eval", BASE, "--adapter", "p", "--data", "builtin:pydoc", "--max-tokens", "50"),
                 ("pack", "inspect", "p")):
        r = cli(*args)
        assert r.code == 1 and "corrupt" in r.err, (args, r.err)
    assert not (tmp_path / "x").exists()

    # a corrupt source: the pack fails and nothing is registered
    _flip_byte(_blob_path(reg, "lora1", "adapter_model.safetensors"), 100)
    r = cli("pack", "lora1", "--density", "0.1")
    assert r.code == 1 and "corrupt" in r.err
    assert [a["name"] for a in _packs(cli)] == ["p"]


def _rewrite(path, dest, **meta_changes):
    """Copy a pack file with changed metadata and a recomputed (valid) digest."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from adapterhub_c.packing import tensors_digest

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    meta.update(meta_changes)
    meta.pop("pack_digest")
    tensors = st_load(data)
    meta["pack_digest"] = tensors_digest(tensors, meta)
    dest.write_bytes(st_save(tensors, metadata=meta))
    return dest


def test_bad_pack_files_through_inspect(reg, tiny_base, lora, cli, tmp_path):
    from adapterhub_c.workflows.packs import PACK_FILE

    assert cli("pack", "lora1", "--density", "0.1", "--name", "p").code == 0
    good = _blob_path(reg, "p", PACK_FILE)
    assert cli("pack", "inspect", str(good), "--json").code == 0

    flipped = tmp_path / "flipped.pack"
    flipped.write_bytes(good.read_bytes())
    _flip_byte(flipped, flipped.stat().st_size - 10)
    r = cli("pack", "inspect", str(flipped))
    assert r.code == 1 and "digest mismatch" in r.err

    truncated = tmp_path / "truncated.pack"
    truncated.write_bytes(good.read_bytes()[:-100])
    r = cli("pack", "inspect", str(truncated))
    assert r.code == 1 and "truncated" in r.err

    future = _rewrite(good, tmp_path / "v4.pack", format_version="4")
    r = cli("pack", "inspect", str(future))
    assert r.code == 2 and "format version '4' is not supported" in r.err

    r = cli("pack", "inspect", str(tmp_path / "missing.pack"))
    assert r.code == 2


def test_pack_for_another_base_is_refused(reg, tiny_base, lora, cli, tmp_path):
    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.workflows.packs import PACK_FILE

    assert cli("pack", "lora1", "--density", "0.1", "--name", "p").code == 0
    art = reg.get("p", "artifact")
    folder = tmp_path / "other"
    folder.mkdir()
    _rewrite(_blob_path(reg, "p", PACK_FILE), folder / PACK_FILE, base="HuggingFaceTB/SmolLM2-135M")
    register_artifact(reg, kind="pack", name="alien", base_id=tiny_base.id, folder=folder, config=art.config)
    for args in (("unpack", "alien", "--out", str(tmp_path / "x")),
                 ("eval", BASE, "--adapter", "alien", "--data", "builtin:pydoc", "--max-tokens", "50"),
                 ("pack", "inspect", "alien")):
        r = cli(*args)
        assert r.code == 2 and "made for base 'HuggingFaceTB/SmolLM2-135M'" in r.err, (args, r.err)
