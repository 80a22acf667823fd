"""`adapt merge` / `adapt compose` on the tiny base: registry, lineage, YAML replay, packs, popcount election."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sqlalchemy import select

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter
from adapterhub_c.errors import IntegrityError
from adapterhub_c.merging import merge_adapters
from adapterhub_c.merging.rules import elected_signs
from adapterhub_c.merging.spec import make_spec
from adapterhub_c.packing.format import pack_adapter, unpack_to_adapter, write_pack
from adapterhub_c.registry.artifacts import register_artifact
from adapterhub_c.registry.models import Artifact, Run
from adapterhub_c.workflows.merges import (
    MERGE_CONFIG_FILE,
    load_inputs,
    merge_artifacts,
    popcount_elections,
    replay_merge,
    run_merge,
)

BASE = "builtin:tiny-llama"
SHAPES = {  # module -> (out, in) in the tiny Llama
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.1.self_attn.q_proj": (64, 64),
    "model.layers.1.mlp.down_proj": (64, 128),
}
PACK_FILE = "pack.safetensors"  # the name adapterhub_c.workflows.packs uses


def make_lora(seed: int, r: int = 4, alpha: float = 8.0, scale_B: float = 0.05, **config) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in SHAPES.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * scale_B
    cfg = dict(peft_type="LORA", r=r, lora_alpha=alpha, base_model_name_or_path=BASE,
               target_modules=sorted({m.rsplit(".", 1)[-1] for m in SHAPES}), task_type="CAUSAL_LM")
    cfg.update(config)
    return LoraAdapter(cfg, tensors)


def register_lora(reg, base, name: str, adapter: LoraAdapter, tmp_path, kind: str = "lora", variant_id=None):
    folder = adapter.to_folder(tmp_path / f"src-{name}")
    return register_artifact(reg, kind=kind, name=name, base_id=base.id, folder=folder, variant_id=variant_id)


def register_pack(reg, base, name: str, adapter: LoraAdapter, tmp_path, density: float = 0.3, **kw):
    """A ComPEFT pack artefact; returns (artefact, the pack's decoded LoRA)."""
    pack = pack_adapter(adapter, density=density, base=BASE, source_digest="test", **kw)
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    write_pack(pack, folder / PACK_FILE)
    art = register_artifact(reg, kind="pack", name=name, base_id=base.id, folder=folder)
    return art, unpack_to_adapter(pack)


def equal_scale_alpha(adapter: LoraAdapter, target: float = 0.02) -> float:
    """The ComPEFT alpha that gives this adapter (global scope) the magnitude ``target``."""
    flat = np.concatenate([adapter.tensors[k].reshape(-1).numpy() for k in sorted(adapter.tensors)])
    return target / float(np.std(flat, dtype=np.float64, ddof=1))


def stored_adapter(reg, name: str) -> tuple[LoraAdapter, object]:
    art = reg.get(name, "artifact")
    folder = reg.materialize(art)
    return LoraAdapter.from_folder(folder), folder


def deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {m: layer.scale * (layer.B.double() @ layer.A.double()) for m, layer in adapter.layers().items()}


def count(reg, kind: str) -> int:
    with reg.session() as s:
        return len(s.scalars(select(Artifact).where(Artifact.kind == kind)).all())


@pytest.fixture
def loras(reg, tiny_base, tmp_path):
    a, b, c = make_lora(1), make_lora(2, alpha=16), make_lora(3, r=4, use_rslora=True)
    for name, ad in (("lora-a", a), ("lora-b", b), ("lora-c", c)):
        register_lora(reg, tiny_base, name, ad, tmp_path)
    return {"lora-a": a, "lora-b": b, "lora-c": c}


# ---- merge through the CLI ----------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [
    ("task-arithmetic", ["--weights", "1,-0.5,0.75"]),
    ("ties", ["--density", "0.5"]),
    ("dare-linear", ["--density", "0.7", "--seed", "3"]),
    ("dare-ties", ["--density", "0.7", "--majority", "frequency"]),
])
def test_cli_merge_registers_with_lineage_and_replayable_yaml(cli, reg, loras, method, extra):
    r = cli("merge", "lora-a", "lora-b", "lora-c", "--method", method, *extra, "--device", "cpu",
            "--name", f"m-{method}", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["artifact"] == f"m-{method}" and rep["kind"] == "merged" and rep["method"] == method
    merged, folder = stored_adapter(reg, f"m-{method}")
    with reg.session() as s:
        art = reg.resolve(s, f"m-{method}", "artifact")
        parents = reg.parents(s, art)
        assert sorted((role, p.name) for role, p in parents) == [
            ("merge-input", "lora-a"), ("merge-input", "lora-b"), ("merge-input", "lora-c")]
        assert art.run_id and s.get(Run, art.run_id).status == "succeeded"
        assert art.config["config_file"] == MERGE_CONFIG_FILE and art.variant_id is None
    # the stored YAML replays to the same tensors
    yaml_text = (folder / MERGE_CONFIG_FILE).read_text()
    assert f"method: {method}" in yaml_text
    replayed = replay_merge(reg, yaml_text, device="cpu")
    assert set(replayed.adapter.tensors) == set(merged.tensors)
    for k, v in merged.tensors.items():
        assert torch.equal(replayed.adapter.tensors[k], v), k
    # and it is the library merge of the inputs
    weights = [1.0, -0.5, 0.75] if method == "task-arithmetic" else None
    spec = make_spec(3, method=method, weights=weights, density=rep["density"],
                     majority=rep["majority"] or "total", seed=3 if method == "dare-linear" else 0)
    direct = merge_adapters(list(loras.values()), spec.method, weights=spec.weights, density=spec.density,
                            majority=spec.majority, seed=spec.seed)
    for m, d in deltas(direct.adapter).items():
        torch.testing.assert_close(deltas(merged)[m], d, rtol=1e-5, atol=1e-7)
    if method == "task-arithmetic":  # exact: Σ w_i·ΔW_i of the true deltas
        true = [deltas(a) for a in loras.values()]
        for m in SHAPES:
            expect = true[0][m] - 0.5 * true[1][m] + 0.75 * true[2][m]
            torch.testing.assert_close(deltas(merged)[m], expect, rtol=1e-5, atol=1e-6)


def test_cli_svd_option_is_recorded_and_replayed(cli, reg, loras):
    """--svd exact gives the Eckart–Young truncation; the choice goes into the report, the
    YAML and the replay; without it the randomized routine is within 1e-4 of optimal."""
    out = {}
    for svd in ("exact", "randomized"):
        args = ["--svd", svd] if svd == "exact" else []
        r = cli("merge", "lora-a", "lora-b", "lora-c", "--method", "ties", "--density", "0.5", "--rank", "3",
                *args, "--device", "cpu", "--name", f"t-{svd}", "--json")
        assert r.code == 0, r.err
        assert r.json()["svd"] == svd
        merged, folder = stored_adapter(reg, f"t-{svd}")
        yaml_text = (folder / MERGE_CONFIG_FILE).read_text()
        assert f"svd: {svd}" in yaml_text
        replayed = replay_merge(reg, yaml_text, device="cpu")
        for k, v in merged.tensors.items():
            assert torch.equal(replayed.adapter.tensors[k], v), k
        out[svd] = deltas(merged)
    full = deltas(merge_adapters(list(loras.values()), "ties", density=0.5, rank=64).adapter)
    for m, M in full.items():
        optimal = torch.linalg.svdvals(M)[3:].pow(2).sum().sqrt()
        assert torch.linalg.matrix_norm(M - out["exact"][m]) <= optimal * (1 + 1e-9) + 1e-12
        assert torch.linalg.matrix_norm(M - out["randomized"][m]) <= optimal * (1 + 1e-4) + 1e-9
    assert cli("merge", "lora-a", "lora-b", "--method", "ties", "--density", "0.5", "--svd", "qr").code == 2


def test_merged_artifact_loads_in_plain_peft(cli, reg, loras):
    from peft import PeftModel

    from adapterhub_c.models.tiny import build_tiny_llama

    assert cli("merge", "lora-a", "lora-b", "--method", "ties", "--density", "0.4", "--device", "cpu",
               "--name", "m").code == 0
    merged, folder = stored_adapter(reg, "m")
    model, _ = build_tiny_llama()
    peft_model = PeftModel.from_pretrained(model, str(folder))
    for m, d in deltas(merged).items():
        layer = peft_model.base_model.model.get_submodule(m)
        got = layer.scaling["default"] * (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())
        torch.testing.assert_close(got, d, rtol=1e-6, atol=1e-9)


def test_variant_id_kept_only_when_shared(cli, reg, tiny_base, tmp_path):
    from adapterhub_c.registry.models import Variant

    with reg.session() as s:
        v = Variant(base_id=tiny_base.id, name="v-test", recipe="{}", recipe_digest="x" * 64, files={})
        s.add(v)
        s.flush()
        vid = v.id
    register_lora(reg, tiny_base, "va", make_lora(1), tmp_path, kind="recovered-lora", variant_id=vid)
    register_lora(reg, tiny_base, "vb", make_lora(2), tmp_path, kind="recovered-lora", variant_id=vid)
    register_lora(reg, tiny_base, "plain", make_lora(3), tmp_path)
    assert cli("merge", "va", "vb", "--method", "task-arithmetic", "--device", "cpu", "--name", "same").code == 0
    assert cli("merge", "va", "plain", "--method", "task-arithmetic", "--device", "cpu", "--name", "mixed").code == 0
    assert reg.get("same", "artifact").variant_id == vid
    assert reg.get("mixed", "artifact").variant_id is None


# ---- packs --------------------------------------------------------------------------------
@pytest.mark.parametrize("method,space,extra", [
    ("task-arithmetic", "delta", {}),
    ("ties", "delta", {"density": 0.5}),
    ("ties", "factors", {"density": 0.5, "majority": "frequency"}),
    ("dare-ties", "factors", {"density": 0.6}),
])
def test_pack_inputs_equal_their_decoded_loras(reg, tiny_base, tmp_path, method, space, extra):
    from adapterhub_c.workflows.merges import merge_artifacts

    decoded = []
    for i, seed in enumerate((11, 12, 13)):
        _, dense = register_pack(reg, tiny_base, f"p{i}", make_lora(seed), tmp_path, density=0.25)
        register_lora(reg, tiny_base, f"u{i}", dense, tmp_path)
        decoded.append(dense)
    kw = dict(method=method, space=space, device="cpu", weights=[1.0, 0.5, -0.25], **extra)
    _, rp = merge_artifacts(reg, ["p0", "p1", "p2"], name="from-packs", **kw)
    _, ru = merge_artifacts(reg, ["u0", "u1", "u2"], name="from-loras", **kw)
    a, _ = stored_adapter(reg, "from-packs")
    b, _ = stored_adapter(reg, "from-loras")
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    if method == "ties" and space == "factors":
        assert rp["election"] == "popcount" and ru["election"] == "dense"
    else:
        assert rp["election"] == "dense" and rp["election_reason"]


@pytest.mark.parametrize("n,majority,convention", [
    (2, "frequency", "peft"), (3, "frequency", "peft"), (4, "frequency", "mergekit"),
    (2, "total", "peft"), (4, "total", "peft"), (3, "total", "mergekit"),
])
def test_popcount_election_equals_dense_path(reg, tiny_base, tmp_path, n, majority, convention):
    equal = majority == "total"
    names = []
    for i in range(n):
        lora = make_lora(40 + i)
        kw = {"alpha": equal_scale_alpha(lora)} if equal else {}
        register_pack(reg, tiny_base, f"q{i}", lora, tmp_path, density=0.3, **kw)
        names.append(f"q{i}")
    arts = [reg.get(x, "artifact") for x in names]
    inputs = load_inputs(reg, arts, torch.device("cpu"))
    if equal:
        scales = {p.scale for x in inputs for p in x.planes.values()}
        assert len(scales) == 1
    # mergekit votes on weighted vectors: equal |w| keeps the total vote exact
    weights = [1.0, -1.0, 1.0, 1.0][:n] if convention == "mergekit" else [1.0, 0.5, 2.0, -0.7][:n]
    spec = make_spec(n, method="ties", weights=weights, space="factors", density=0.8, majority=majority,
                     convention=convention)
    el = popcount_elections(inputs, spec)
    assert el.method == "popcount", el.reason
    # the elected signs are the dense rule's, entry for entry
    for m in SHAPES:
        for f, factor in enumerate("AB"):
            key = f"{PREFIX}{m}.lora_{factor}.weight"
            tau = torch.stack([x.adapter.tensors[key].float() for x in inputs])
            from adapterhub_c.merging.factors import factor_weights
            from adapterhub_c.merging.inputs import module_inputs

            mod = [mi for mi in module_inputs([x.adapter for x in inputs], names) if mi.name == m]
            w = factor_weights(spec.weights, mod, torch.float32, "cpu")[f][:, 0]
            w = w.view(-1, 1, 1)
            assert torch.equal(el.signs[m][f], elected_signs(tau, w, majority, convention)), (m, factor)
    pop, _ = run_merge(inputs, spec, election="popcount")
    dense, _ = run_merge(inputs, spec, election="dense")
    for k in pop.adapter.tensors:
        assert torch.equal(pop.adapter.tensors[k], dense.adapter.tensors[k]), k


def test_popcount_refused_where_not_exact(cli, reg, tiny_base, tmp_path):
    for i in range(2):
        register_pack(reg, tiny_base, f"r{i}", make_lora(60 + i), tmp_path, density=0.3)
    arts = [reg.get(f"r{i}", "artifact") for i in range(2)]
    inputs = load_inputs(reg, arts, torch.device("cpu"))
    spec = make_spec(2, method="ties", space="factors", density=0.5, majority="total")
    el = popcount_elections(inputs, spec)
    assert el.method == "dense" and "unequal" in el.reason  # two packs, two different scales
    r = cli("merge", "r0", "r1", "--method", "ties", "--space", "factors", "--density", "0.5",
            "--election", "popcount", "--device", "cpu")
    assert r.code == 2 and "not exact" in r.err
    assert count(reg, "merged") == 0
    r = cli("merge", "r0", "r1", "--method", "ties", "--space", "factors", "--density", "0.5",
            "--majority", "frequency", "--device", "cpu", "--json")
    assert r.code == 0 and r.json()["election"] == "popcount"


def test_popcount_refused_under_mergekit_where_its_trim_cuts_ties(reg, tiny_base, tmp_path):
    for i in range(2):
        register_pack(reg, tiny_base, f"t{i}", make_lora(70 + i), tmp_path, density=0.3)
    inputs = load_inputs(reg, [reg.get(f"t{i}", "artifact") for i in range(2)], torch.device("cpu"))
    kw = {"method": "ties", "weights": [1.0, 1.0], "space": "factors", "majority": "frequency",
          "convention": "mergekit"}
    el = popcount_elections(inputs, make_spec(2, density=0.1, **kw))  # k below the packs' non-zero counts
    assert el.method == "dense" and "mergekit trim" in el.reason
    assert popcount_elections(inputs, make_spec(2, density=0.8, **kw)).method == "popcount"


def test_pack_whose_source_digest_differs_from_the_registry_is_refused(cli, reg, tiny_base, tmp_path):
    """Merge reads packs by the verified route: the file's source digest must be the row's."""
    register_pack(reg, tiny_base, "good", make_lora(70), tmp_path)
    for name, recorded in (("same", "test"), ("swapped", "another-source")):
        folder = tmp_path / f"src-{name}"
        folder.mkdir()
        write_pack(pack_adapter(make_lora(71), density=0.3, base=BASE, source_digest="test"), folder / PACK_FILE)
        register_artifact(reg, kind="pack", name=name, base_id=tiny_base.id, folder=folder,
                          config={"source_digest": recorded})
    with pytest.raises(IntegrityError, match="source digest"):
        merge_artifacts(reg, ["good", "swapped"], method="task-arithmetic", device="cpu")
    r = cli("merge", "good", "swapped", "--method", "task-arithmetic", "--device", "cpu")
    assert r.code == 1 and "source digest" in r.err, r.err
    assert count(reg, "merged") == 0
    art, _ = merge_artifacts(reg, ["good", "same"], method="task-arithmetic", device="cpu")  # the digests agree
    assert art.kind == "merged" and count(reg, "merged") == 1


# ---- bad input: exit 2, nothing registered ------------------------------------------------
def test_bad_merge_inputs_exit_2_and_register_nothing(cli, reg, tiny_base, loras, tmp_path):
    from adapterhub_c.workflows.bases import register_base_folder

    other, _ = register_base_folder(reg, "other-base", reg.materialize(tiny_base), None, None, None, None)
    register_lora(reg, other, "foreign", make_lora(5), tmp_path)
    register_lora(reg, tiny_base, "rank8", make_lora(6, r=8), tmp_path)
    with reg.session() as s:
        runs_before = len(s.scalars(select(Run)).all())
    cases = [
        (["lora-a", "foreign", "--method", "task-arithmetic"], "different bases"),
        (["lora-a", "rank8", "--method", "ties", "--density", "0.5", "--space", "factors"], "equal ranks"),
        (["lora-a", "lora-b", "--method", "task-arithmetic", "--weights", "1,2,3"], "3 weights for 2"),
        (["lora-a", "lora-b", "--method", "ties", "--density", "0"], "density"),
        (["lora-a", "lora-b", "--method", "dare-linear", "--density", "1.5"], "density"),
        (["lora-a", "lora-b", "--method", "ties"], "density"),
        (["lora-a", "--method", "task-arithmetic"], "at least 2"),
        (["lora-a", "nope", "--method", "task-arithmetic"], "nope"),
        (["lora-a", "lora-b", "--method", "task-arithmetic", "--weights", "1,x"], "weights"),
        (["lora-a", "lora-b", "--method", "task-arithmetic", "--name", "lora-a"], "already exists"),
    ]
    for args, msg in cases:
        r = cli("merge", *args, "--device", "cpu")
        assert r.code == 2, (args, r.err)
        assert msg in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
    assert count(reg, "merged") == 0
    with reg.session() as s:
        assert len(s.scalars(select(Run)).all()) == runs_before
    # rank8 merges fine in delta space
    assert cli("merge", "lora-a", "rank8", "--method", "ties", "--density", "0.5", "--device", "cpu").code == 0


# ---- compose ------------------------------------------------------------------------------
def write_examples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_compose_records_optimizer_and_curve(cli, reg, loras, tmp_path):
    ex = write_examples(tmp_path / "ex.jsonl", [{"prompt": f"{w} =>", "completion": f" {w[::-1]}"}
                                                for w in ("abc", "hello", "tiny", "llama")])
    r = cli("compose", "lora-a", "lora-b", "lora-c", "--examples", str(ex), "--budget", "6", "--device", "cpu",
            "--name", "comp", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["optimizer"] == "NGOpt" and rep["optimizer_used"][0] == "NGOpt" and len(rep["optimizer_used"]) >= 2
    assert [c["step"] for c in rep["curve"]] == list(range(1, 7)) and len(rep["weights"]) == 3
    assert rep["n_examples"] == 4 and math.isfinite(rep["loss"])
    bests = [c["best"] for c in rep["curve"]]
    assert bests == sorted(bests, reverse=True) and rep["objective"] == pytest.approx(bests[-1])
    art = reg.get("comp", "artifact")
    assert art.kind == "composed" and art.config["optimizer_used"] == rep["optimizer_used"]
    assert len(art.config["curve"]) == 6
    with reg.session() as s:
        art = reg.resolve(s, "comp", "artifact")
        assert sorted(p.name for role, p in reg.parents(s, art) if role == "compose-input") == [
            "lora-a", "lora-b", "lora-c"]
        assert s.get(Run, art.run_id).output["optimizer_used"] == rep["optimizer_used"]
    # the stored adapter is Σ w_i·(√s_i A_i), Σ w_i·(√s_i B_i)
    composed, folder = stored_adapter(reg, "comp")
    assert json.loads((folder / "compose_config.json").read_text())["weights"] == rep["weights"]
    w = rep["weights"]
    for m in SHAPES:
        key = f"{PREFIX}{m}.lora_A.weight"
        expect = sum(wi * math.sqrt(a.layers()[m].scale) * a.tensors[key] for wi, a in zip(w, loras.values(), strict=False))
        torch.testing.assert_close(composed.tensors[key], expect, rtol=1e-5, atol=1e-6)
    # a built-in task's train split, N shots
    r = cli("compose", "lora-a", "lora-b", "--examples", "builtin:task/reverse-words", "--shots", "3",
            "--budget", "3", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert r.json()["n_examples"] == 3 and len(r.json()["curve"]) == 3


def test_bad_compose_inputs_exit_2(cli, reg, loras, tiny_base, tmp_path):
    register_lora(reg, tiny_base, "rank8", make_lora(6, r=8), tmp_path)
    good = write_examples(tmp_path / "good.jsonl", [{"prompt": "a =>", "completion": " b"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = write_examples(tmp_path / "blank.jsonl", [{"prompt": "a =>", "completion": ""}])
    texts = write_examples(tmp_path / "texts.jsonl", [{"text": "just text"}])
    cases = [
        (["lora-a", "lora-b", "--examples", str(empty)], "no usable example"),
        (["lora-a", "lora-b", "--examples", str(blank)], "no usable example"),
        (["lora-a", "lora-b", "--examples", str(texts)], "prompt/completion"),
        (["lora-a", "lora-b", "--examples", str(tmp_path / "missing.jsonl")], "not found"),
        (["lora-a", "rank8", "--examples", str(good)], "equal ranks"),
        (["lora-a", "lora-b", "--examples", str(good), "--bounds", "1,-1"], "bounds"),
        (["lora-a", "lora-b", "--examples", str(good), "--optimizer", "NoSuchOpt"], "NoSuchOpt"),
        (["lora-a", "lora-b", "--examples", "builtin:pydoc"], "builtin:task"),
    ]
    for args, msg in cases:
        r = cli("compose", *args, "--budget", "2", "--device", "cpu")
        assert r.code == 2, (args, r.err)
        assert msg in r.err, (args, r.err)
    assert count(reg, "composed") == 0
