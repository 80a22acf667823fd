"""Hub integration through the CLI: pull / base add / search / push / hub serve, against the local server.

Every test runs the real ``huggingface_hub`` client over HTTP against ``adapt hub serve``'s
server on a random loopback port (a thread here; a subprocess in the serve test).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_c.fsutil import atomic_write_json
from adapterhub_c.hub.cards import model_card, parse_front_matter
from adapterhub_c.hub.client import download_repo, push_folder

sys.path.insert(0, str(Path(__file__).parent))
from hubutil import TOKEN  # noqa: E402

TINY = "builtin:tiny-llama"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A PEFT LoRA of the tiny Llama with rank/alpha patterns and rsLoRA, naming builtin:tiny-llama."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"v_proj": 6}, use_rslora=True, init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(model, cfg).save_pretrained(out)
    _edit_config(out, base_model_name_or_path=TINY)
    (out / "README.md").write_text(model_card(TINY, "tiny-lora"))
    return out


_counter = iter(range(10**6))


def _repo(stem: str) -> str:
    """A repo id not used before in this module's hub."""
    return f"alice/{stem}-{next(_counter)}"


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _publish(hub, folder: Path, stem: str) -> tuple[str, str]:
    repo = _repo(stem)
    res = push_folder(folder, repo, token=hub.token, endpoint=hub.endpoint)
    return repo, res.commit_sha


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _nothing_registered(cli, bases=(TINY,)) -> None:
    assert cli("ls", "artifacts", "--json").json() == []
    assert sorted(b["name"] for b in cli("ls", "bases", "--json").json()) == sorted(bases)


# ---- pull -------------------------------------------------------------------------------------
def test_pull_registers_lora_with_lineage_and_twice_is_a_noop(cli, tiny_base, hf, lora_dir, home):
    repo, sha = _publish(hf, lora_dir, "tiny-lora")
    r = cli("pull", repo, "--json")
    assert r.code == 0, r.err
    row = r.json()
    assert row["created"] and row["kind"] == "lora" and row["name"] == repo
    assert row["source"] == f"{repo}@{sha}" and row["base"] == TINY and not row["base_reference_only"]
    shown = cli("show", repo, "--json").json()
    assert shown["source_sha"] == sha
    assert set(shown["files"]) == {"README.md", CONFIG, WEIGHTS}
    assert [(p["role"], p["name"]) for p in shown["parents"]] == [("adapter-of", TINY)]
    assert cli("lineage", TINY, "--json").json()["children"][0]["name"] == repo
    # rsLoRA and the rank/alpha patterns carried verbatim, tensors bit for bit
    from adapterhub_c.registry import Registry

    reg = Registry(home=home)
    art = reg.get(repo, "artifact")
    folder = reg.materialize(art)
    assert (folder / CONFIG).read_bytes() == (lora_dir / CONFIG).read_bytes()
    assert (folder / WEIGHTS).read_bytes() == (lora_dir / WEIGHTS).read_bytes()
    assert art.config["peft"]["use_rslora"] is True and art.config["peft"]["rank_pattern"] == {"v_proj": 2}
    runs = cli("ls", "runs", "--json").json()
    pulls = [x for x in runs if x["command"] == "pull"]
    assert len(pulls) == 1 and pulls[0]["status"] == "succeeded"
    # the same repo@sha again: the same row, nothing new
    again = cli("pull", f"{repo}@{sha}", "--json")
    assert again.code == 0 and not again.json()["created"] and again.json()["id"] == row["id"]
    assert len(cli("ls", "artifacts", "--json").json()) == 1
    assert len(cli("ls", "runs", "--json").json()) == len(runs)
    plain = cli("pull", repo)
    assert plain.code == 0 and "already in the registry" in plain.out


def test_pull_registers_base_references(cli, hf, lora_dir, tmp_path):
    smol = _copy(lora_dir, tmp_path / "smol")
    _edit_config(smol, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    repo, _ = _publish(hf, smol, "smol-lora")
    r = cli("pull", repo, "--json")
    assert r.code == 0, r.err
    # the built-in's hub id: a reference under the built-in's name, completed by `base add` later
    assert r.json()["base"] == "builtin:smollm2-135m" and r.json()["base_reference_only"]
    bases = {b["name"]: b for b in cli("ls", "bases", "--json").json()}
    assert bases["builtin:smollm2-135m"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    other = _copy(lora_dir, tmp_path / "other")
    _edit_config(other, base_model_name_or_path="someone/unknown-base", revision="v1")
    # the base exists on the Hub (at v1), without weights here (a base the Hub lacks is refused:
    # test_hostile_pull.py::test_what_pulls_loads)
    hf.store.create_repo("someone/unknown-base")
    refs = hf.store.refs("someone/unknown-base")
    atomic_write_json(hf.root / "repos" / "someone" / "unknown-base" / "refs.json", {**refs, "v1": refs["main"]})
    repo2, _ = _publish(hf, other, "other-lora")
    r2 = cli("pull", repo2, "--name", "mine", "--json")
    assert r2.code == 0 and r2.json()["name"] == "mine" and r2.json()["base"] == "someone/unknown-base"
    bases = {b["name"]: b for b in cli("ls", "bases", "--json").json()}
    assert bases["someone/unknown-base"]["reference_only"] and bases["someone/unknown-base"]["revision"] == "v1"
    # a second adapter of the same base attaches to the same reference row
    repo3, _ = _publish(hf, other, "other-lora-b")
    assert cli("pull", repo3).code == 0
    assert len(cli("ls", "bases", "--json").json()) == 2
    # --name taken by something else
    _one_line_error(cli("pull", repo, "--name", "mine"), 2, "already exists")


def test_pull_at_revision(cli, tiny_base, hf, lora_dir, tmp_path):
    repo, sha1 = _publish(hf, lora_dir, "revs")
    v2 = _copy(lora_dir, tmp_path / "v2")
    (v2 / "notes.txt").write_text("second version")
    sha2 = push_folder(v2, repo, token=hf.token, endpoint=hf.endpoint).commit_sha
    assert sha2 != sha1
    old = cli("pull", f"{repo}@{sha1}", "--json")
    assert old.code == 0 and old.json()["source"] == f"{repo}@{sha1}" and old.json()["name"] == f"{repo}@{sha1}"
    same = cli("pull", repo, "--revision", sha1, "--json")
    assert same.code == 0 and not same.json()["created"]
    new = cli("pull", repo, "--json")
    assert new.code == 0 and new.json()["created"] and new.json()["source"] == f"{repo}@{sha2}"
    assert "notes.txt" in cli("show", new.json()["name"], "--json").json()["files"]
    _one_line_error(cli("pull", f"{repo}@{sha1}", "--revision", "main"), 2, "--revision")
    _one_line_error(cli("pull", repo, "--revision", "nope"), 2, "revision 'nope' not found")
    _one_line_error(cli("pull", "alice/does-not-exist-anywhere"), 2, "not found")
    assert len(cli("ls", "artifacts", "--json").json()) == 2


def test_pull_include_exclude(cli, tiny_base, hf, lora_dir, tmp_path):
    extra = _copy(lora_dir, tmp_path / "extra")
    (extra / "notes.txt").write_text("hello")
    (extra / "logs").mkdir()
    (extra / "logs" / "train.json").write_text("{}")
    repo, _ = _publish(hf, extra, "globs")
    _one_line_error(cli("pull", repo, "--exclude", CONFIG), 2, "no adapter_config.json", "--exclude")
    _nothing_registered(cli)
    r = cli("pull", repo, "--exclude", "*.txt", "--exclude", "logs/*", "--json")
    assert r.code == 0, r.err
    assert set(cli("show", r.json()["name"], "--json").json()["files"]) == {"README.md", CONFIG, WEIGHTS}
    assert cli("rm", r.json()["name"], "--yes").code == 0
    r = cli("pull", repo, "--include", "adapter_*", "--json")
    assert r.code == 0, r.err
    assert set(cli("show", r.json()["name"], "--json").json()["files"]) == {CONFIG, WEIGHTS}


def test_dora_and_non_lora_refused(cli, tiny_base, hf, lora_dir, tmp_path):
    dora = _copy(lora_dir, tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    repo, _ = _publish(hf, dora, "dora")
    _one_line_error(cli("pull", repo), 2, "DoRA")
    prompt = _copy(lora_dir, tmp_path / "prompt")
    (prompt / CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8,
                                             "base_model_name_or_path": TINY}))
    repo2, _ = _publish(hf, prompt, "prompt")
    _one_line_error(cli("pull", repo2), 2, "PROMPT_TUNING", "only LoRA")
    nobase = _copy(lora_dir, tmp_path / "nobase")
    _edit_config(nobase, base_model_name_or_path=None)
    repo3, _ = _publish(hf, nobase, "nobase")
    _one_line_error(cli("pull", repo3), 2, "base_model_name_or_path")
    _nothing_registered(cli)
    failed = [x for x in cli("ls", "runs", "--json").json() if x["command"] == "pull"]
    assert failed and all(x["status"] == "failed" for x in failed)


def test_shapes_and_corrupt_weights_refused(cli, tiny_base, hf, lora_dir, tmp_path):
    wrong_r = _copy(lora_dir, tmp_path / "wrong_r")
    _edit_config(wrong_r, rank_pattern={})  # v_proj tensors are rank 2, the config now says 4
    repo, sha = _publish(hf, wrong_r, "wrong-r")
    _one_line_error(cli("pull", repo), 2, "not a valid LoRA", "v_proj.lora_A.weight", "rank 4",
                    f"{repo}@{sha[:12]}")
    # consistent with its own config, but for a wider model than the base it names
    wide = _copy(lora_dir, tmp_path / "wide")
    tensors = load_file(str(lora_dir / WEIGHTS))
    save_file({k: (torch.zeros(v.shape[0], 96) if "lora_A" in k else v) for k, v in tensors.items()},
              str(wide / WEIGHTS))
    repo2, _ = _publish(hf, wide, "wide")
    _one_line_error(cli("pull", repo2), 2, "in base 'builtin:tiny-llama'")
    corrupt = _copy(lora_dir, tmp_path / "corrupt")
    data = (lora_dir / WEIGHTS).read_bytes()
    (corrupt / WEIGHTS).write_bytes(data[: len(data) // 2])
    repo3, _ = _publish(hf, corrupt, "corrupt")
    _one_line_error(cli("pull", repo3), 2, "not a valid LoRA", "outside")
    _nothing_registered(cli)


class _Evil:
    """Unpickling this creates a folder: the proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_refused_unless_allowed_and_never_executed(cli, tiny_base, hf, lora_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(lora_dir / CONFIG, evil / CONFIG)
    (evil / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil(marker)}))
    repo, _ = _publish(hf, evil, "evil")
    _one_line_error(cli("pull", repo), 2, "only pickle weights", "allow")
    _one_line_error(cli("pull", repo, "--allow-pickle"), 2, "safe loader")
    assert not marker.exists()
    _nothing_registered(cli)
    # a genuine pickle, explicitly allowed: converted, stored as safetensors only
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(lora_dir / CONFIG, real / CONFIG)
    tensors = load_file(str(lora_dir / WEIGHTS))
    torch.save(tensors, real / "adapter_model.bin")
    repo2, _ = _publish(hf, real, "real-pickle")
    _one_line_error(cli("pull", repo2), 2, "only pickle weights")
    r = cli("pull", repo2, "--allow-pickle", "--json")
    assert r.code == 0, r.err
    from adapterhub_c.registry import Registry

    reg = Registry(home=os.environ["ADAPTERHUB_HOME"])
    art = reg.get(r.json()["name"], "artifact")
    assert set(art.files) == {CONFIG, WEIGHTS} and art.config["converted_from_pickle"] == "adapter_model.bin"
    got = load_file(str(reg.materialize(art) / WEIGHTS))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_unsafe_file_name_refused(cli, tiny_base, hf, lora_dir, tmp_path):
    repo = _repo("evil-path")
    hf.store.create_repo(repo)
    hf.store.commit(repo, message="evil", check_paths=False, add={
        CONFIG: (lora_dir / CONFIG).read_bytes(), WEIGHTS: (lora_dir / WEIGHTS).read_bytes(),
        "../../escape.txt": b"gotcha"})
    _one_line_error(cli("pull", repo), 2, "unsafe file names")
    assert not list(tmp_path.rglob("escape.txt"))
    _nothing_registered(cli)


def test_rate_limited_pull_is_retried(cli, tiny_base, hf, lora_dir):
    repo, sha = _publish(hf, lora_dir, "limited")
    hf.faults.fail_next(2, status=429, path_contains=f"/api/models/{repo}")
    try:
        r = cli("pull", repo, "--json")
    finally:
        hf.faults.clear()
    assert r.code == 0, r.err
    assert r.json()["source"] == f"{repo}@{sha}"


def test_offline_pull_from_cache(cli, tiny_base, hf, lora_dir, monkeypatch):
    repo, sha = _publish(hf, lora_dir, "offline")
    first = cli("pull", repo, "--json")
    assert first.code == 0
    assert cli("rm", repo, "--yes").code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    again = cli("pull", repo, "--json")
    assert again.code == 0, again.err
    assert again.json()["created"] and again.json()["source"] == f"{repo}@{sha}"
    assert cli("pull", repo, "--json").json()["id"] == again.json()["id"]
    _one_line_error(cli("pull", _repo("never-pulled")), 1, "offline", "not (fully) in the cache")
    assert len(cli("ls", "artifacts", "--json").json()) == 1


# ---- base add ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from adapterhub_c.models.tiny import build_tiny_llama

    model, tokenizer = build_tiny_llama()
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_base_add_from_hub_completes_reference(cli, hf, lora_dir, tiny_model_dir, tmp_path):
    base_repo, base_sha = _publish(hf, tiny_model_dir, "tiny-base")
    adapter = _copy(lora_dir, tmp_path / "adapter")
    _edit_config(adapter, base_model_name_or_path=base_repo)
    repo, _ = _publish(hf, adapter, "for-hub-base")
    pulled = cli("pull", repo, "--json").json()
    assert pulled["base"] == base_repo and pulled["base_reference_only"]
    ref_id = cli("show", base_repo, "--json").json()["id"]
    r = cli("base", "add", base_repo)
    assert r.code == 0 and "added" in r.out, r.err
    shown = cli("show", base_repo, "--json").json()
    assert shown["id"] == ref_id and not shown["reference_only"] and shown["commit_sha"] == base_sha
    assert shown["params"] > 0 and "model.safetensors" in shown["files"]
    assert "already registered" in cli("base", "add", f"{base_repo}@{base_sha}").out
    # the base is now loadable, and adapters pulled later are shape-checked against it
    r = cli("eval", repo, "--data", "builtin:task/uppercase", "--max-examples", "1", "--max-tokens", "64",
            "--json")
    assert r.code == 0, r.err
    wide = _copy(adapter, tmp_path / "wide")
    tensors = load_file(str(lora_dir / WEIGHTS))
    save_file({k: (torch.zeros(v.shape[0], 96) if "lora_A" in k else v) for k, v in tensors.items()},
              str(wide / WEIGHTS))
    repo2, _ = _publish(hf, wide, "wide-hub")
    _one_line_error(cli("pull", repo2), 2, f"in base {base_repo!r}")


def test_base_add_pickle_and_with_base(cli, hf, lora_dir, tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled-base"
    pickled.mkdir()
    for p in tiny_model_dir.iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, pickled / p.name)
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), pickled / "pytorch_model.bin")
    base_repo, _ = _publish(hf, pickled, "pickled-base")
    _one_line_error(cli("base", "add", base_repo), 2, "only pickle weights")
    assert cli("ls", "bases", "--json").json() == []
    adapter = _copy(lora_dir, tmp_path / "adapter")
    _edit_config(adapter, base_model_name_or_path=base_repo)
    repo, _ = _publish(hf, adapter, "with-base")
    _one_line_error(cli("pull", repo, "--with-base"), 2, "only pickle weights")
    _nothing_registered(cli, bases=())
    r = cli("pull", repo, "--with-base", "--allow-pickle", "--json")
    assert r.code == 0, r.err
    assert r.json()["base"] == base_repo and not r.json()["base_reference_only"]
    base = cli("show", base_repo, "--json").json()
    assert set(base["files"]) >= {"model.safetensors", "config.json"}
    assert not any(f.endswith(".bin") for f in base["files"])
    _one_line_error(cli("base", "add", "alice/no-such-base"), 2, "not found")


# ---- search ------------------------------------------------------------------------------------
def test_search_finds_adapters_of_that_base_and_marks_pulled(cli, tiny_base, hf, lora_dir, tmp_path):
    base = "org/search-base-" + str(next(_counter))
    a = _copy(lora_dir, tmp_path / "a")
    (a / "README.md").write_text(model_card(base, "a"))
    repo_a, _ = _publish(hf, a, "search-a")
    repo_b, _ = _publish(hf, a, "search-b")
    other = _copy(lora_dir, tmp_path / "other")
    (other / "README.md").write_text(model_card(base + "-other", "other"))
    repo_c, _ = _publish(hf, other, "search-c")
    assert cli("pull", repo_a).code == 0
    r = cli("search", "--base", base, "--json")
    assert r.code == 0, r.err
    found = {m["id"]: m for m in r.json()}
    assert set(found) == {repo_a, repo_b}
    assert found[repo_a]["pulled"] and found[repo_a]["pulled_as"] == [repo_a] and found[repo_a]["pulled_latest"]
    assert not found[repo_b]["pulled"]
    assert len(cli("search", "--base", base, "--limit", "1", "--json").json()) == 1
    table = cli("search", "--base", base)
    assert table.code == 0 and repo_a in table.out
    _one_line_error(cli("search", "--base", base, "--limit", "0"), 2, "--limit")


# ---- push --------------------------------------------------------------------------------------
def _register_lora(reg, base, folder: Path, name: str, kind: str = "lora", extra: dict | None = None):
    from adapterhub_c.registry.artifacts import register_artifact

    stage = folder.parent / f"{name}-stage"
    shutil.copytree(folder, stage)
    (stage / "README.md").unlink(missing_ok=True)
    for rel, data in (extra or {}).items():
        (stage / rel).write_bytes(data)
    return register_artifact(reg, kind=kind, name=name, base_id=base.id, folder=stage, source="test",
                             parents=[(base, "adapter-of")])


def test_push_loads_in_plain_peft_and_round_trips(cli, reg, tiny_base, hf, lora_dir, tmp_path):
    from peft import PeftModel

    from adapterhub_c.registry.models import Evaluation
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.stack import load_stack, resolve_stack

    art = _register_lora(reg, tiny_base, lora_dir, "my-lora")
    with reg.session() as s:
        s.add(Evaluation(base_id=tiny_base.id, artifact_id=art.id, dataset="builtin:pydoc", split="test",
                         metric="perplexity", value=12.345678))
        s.add(Evaluation(base_id=tiny_base.id, dataset="builtin:pydoc", split="test", metric="perplexity",
                         value=99.5))
    repo = _repo("pushed")
    dry = cli("push", "my-lora", repo, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    listed = {f["path"] for f in dry.json()["files"]}
    assert listed == {CONFIG, WEIGHTS, "README.md", "adapterhub_c.json"}
    assert not hf.store.exists(repo)
    assert "would push" in cli("push", "my-lora", repo, "--dry-run").out
    r = cli("push", "my-lora", repo, "--token", hf.token, "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["uploaded"] and len(out["commit_sha"]) == 40 and out["url"].endswith(repo)
    assert {f["path"] for f in out["files"]} == listed
    assert out["files"] == dry.json()["files"]  # the dry run listed exactly what was pushed
    commits = len(hf.store.history(repo))
    again = cli("push", "my-lora", repo, "--token", hf.token, "--json")
    assert again.code == 0 and not again.json()["uploaded"] and again.json()["commit_sha"] == out["commit_sha"]
    assert len(hf.store.history(repo)) == commits
    pushes = reg.get("my-lora", "artifact").config["pushes"]
    assert pushes == [{"repo_id": repo, "commit_sha": out["commit_sha"], "url": out["url"], "format": "peft",
                       "endpoint": hf.endpoint}]
    assert [x["status"] for x in cli("ls", "runs", "--json").json() if x["command"] == "push"] == ["succeeded"] * 2

    snap = download_repo(repo, endpoint=hf.endpoint).path
    meta = parse_front_matter((snap / "README.md").read_text())
    assert meta["library_name"] == "peft" and meta["base_model"] == TINY
    assert meta["base_model_relation"] == "adapter"
    assert {"lora", "adapterhub-c", f"base_model:adapter:{TINY}"} <= set(meta["tags"])
    card = (snap / "README.md").read_text()
    assert "## Variant recipe" in card and "adapter-of: `builtin:tiny-llama`" in card
    assert "12.3457" in card and "99.5" in card
    info = json.loads((snap / "adapterhub_c.json").read_text())
    assert info["kind"] == "lora" and info["base"]["name"] == TINY and info["variant"] is None
    assert info["metrics"][0]["value"] == pytest.approx(12.345678) and info["baselines"][0]["value"] == 99.5
    assert info["lineage"][0]["name"] == TINY and "pushes" not in info["config"]

    # plain PEFT on the snapshot gives the same outputs as our own attach
    base_model, _ = load_base_model(reg, tiny_base)
    peft_model = PeftModel.from_pretrained(base_model, str(snap)).eval()
    ours, _ = load_stack(reg, resolve_stack(reg, "my-lora"))
    ids = torch.tensor([[1, 5, 9, 12, 40, 77]])
    with torch.no_grad():
        a, b = peft_model(ids).logits, ours(ids).logits
        plain, _ = load_base_model(reg, tiny_base)
        assert not torch.allclose(a, plain(ids).logits, atol=1e-4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # push → pull: the pulled tensors equal the pushed ones bit for bit
    pulled = cli("pull", repo, "--name", "round-trip", "--json")
    assert pulled.code == 0, pulled.err
    back = reg.materialize(reg.get("round-trip", "artifact"))
    assert (back / WEIGHTS).read_bytes() == (lora_dir / WEIGHTS).read_bytes()
    assert search_ids(cli, TINY) >= {repo}


def search_ids(cli, base: str) -> set[str]:
    r = cli("search", "--base", base, "--json")
    assert r.code == 0, r.err
    return {m["id"] for m in r.json()}


def test_push_every_adapter_kind(cli, reg, tiny_base, hf, lora_dir, tmp_path):
    recovery = save_bytes({"rec.weight": torch.arange(6.0).reshape(2, 3)})
    _register_lora(reg, tiny_base, lora_dir, "rec", kind="recovered-lora", extra={"recovery.safetensors": recovery})
    _register_lora(reg, tiny_base, lora_dir, "merged", kind="merged",
                   extra={"merge.yaml": b"method: ties\ninputs: [a, b]\n"})
    for name, extra in (("rec", "recovery.safetensors"), ("merged", "merge.yaml")):
        r = cli("push", name, _repo(name), "--token", hf.token, "--json")
        assert r.code == 0, r.err
        paths = {f["path"] for f in r.json()["files"]}
        assert paths == {CONFIG, WEIGHTS, extra, "README.md", "adapterhub_c.json"}
        tags = parse_front_matter(download_repo(r.json()["repo_id"], endpoint=hf.endpoint)
                                  .path.joinpath("README.md").read_text())["tags"]
        assert reg.get(name, "artifact").kind in tags
    snap = download_repo(json.loads(r.out)["repo_id"], endpoint=hf.endpoint).path
    assert (snap / "merge.yaml").read_bytes() == b"method: ties\ninputs: [a, b]\n"
    _one_line_error(cli("push", "rec", _repo("x"), "--format", "pack"), 2, "needs a pack artefact")
    _one_line_error(cli("push", "nope", _repo("x")), 2, "unknown adapter or variant 'nope'")
    _one_line_error(cli("push", "rec", "not-a-repo-id"), 2, "invalid repo id")


def save_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def test_push_pack_artefact(cli, reg, tiny_base, hf, lora_dir, tmp_path):
    pytest.importorskip("adapterhub_c.workflows.packs", reason="pack ops not merged yet")
    from adapterhub_c.workflows.packs import pack_artifact

    _register_lora(reg, tiny_base, lora_dir, "to-pack")
    pack, _ = pack_artifact(reg, "to-pack", density=0.5)
    for fmt, want_peft, want_pack in (("peft", True, False), ("pack", False, True), ("both", True, True)):
        r = cli("push", pack.name, _repo(f"pack-{fmt}"), "--format", fmt, "--token", hf.token, "--json")
        assert r.code == 0, r.err
        paths = {f["path"] for f in r.json()["files"]}
        assert (WEIGHTS in paths) == want_peft
        assert bool(set(pack.files) & paths) == want_pack
        if want_peft:
            from peft import PeftModel

            from adapterhub_c.runtime.bases import load_base_model

            snap = download_repo(r.json()["repo_id"], endpoint=hf.endpoint).path
            PeftModel.from_pretrained(load_base_model(reg, tiny_base)[0], str(snap))


def test_wrong_token_on_push_is_one_line_without_the_token(cli, reg, tiny_base, hf, lora_dir, tmp_path):
    _register_lora(reg, tiny_base, lora_dir, "tok-lora")
    bad = "hf_wrong_token_zyxwvu987654"
    (tmp_path / "bad-token").write_text(bad + "\n")
    r = cli("push", "tok-lora", _repo("badtok"), "--token-file", str(tmp_path / "bad-token"))
    _one_line_error(r, 1, "refused the token")
    r = cli("push", "tok-lora", _repo("badtok"), "--token", bad)  # the same, after the ps warning
    assert r.code == 1 and r.err.splitlines()[0].startswith("warning: --token is visible in ps")
    assert len(r.err.strip().splitlines()) == 2 and "refused the token" in r.err.splitlines()[1]
    assert bad not in r.err + r.out and hf.token not in r.err + r.out
    r = cli("push", "tok-lora", _repo("notok"))  # no token at all: writes are refused too
    _one_line_error(r, 1, "refused the token")
    failed = [x for x in cli("ls", "runs", "--json").json() if x["command"] == "push"]
    assert failed and all(x["status"] == "failed" and bad not in json.dumps(x) for x in failed)


def test_tokens_never_stored_or_printed(cli, reg, tiny_base, hf, lora_dir, home, tmp_path, monkeypatch):
    token = hf.token
    repo, _ = _publish(hf, lora_dir, "secret")
    outputs = []
    for args in (("pull", repo, "--token", token, "--json"),
                 ("push", repo, _repo("secret-push"), "--token", token, "--json"),
                 ("push", repo, _repo("secret-dry"), "--token", token, "--dry-run"),
                 ("search", "--base", TINY, "--token", token),
                 ("push", repo, _repo("secret-bad"), "--token", token + "x")):
        r = cli(*args)
        outputs.append(r.out + r.err)
    monkeypatch.setenv("HF_TOKEN", token)
    r = cli("push", repo, _repo("secret-env"), "--json")
    assert r.code == 0, r.err
    outputs.append(r.out + r.err)
    for text in outputs:
        assert token not in text
    runs = cli("ls", "runs", "--json")
    assert runs.code == 0 and token not in runs.out
    assert any(x["command"] == "push" and x["status"] == "failed" for x in runs.json())
    needle = token.encode()
    scanned = 0
    for p in home.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert needle not in p.read_bytes(), p
            scanned += 1
    assert scanned and (home / "registry.db").is_file()


# ---- hub serve ------------------------------------------------------------------------------------
def test_adapt_hub_serve_end_to_end(cli, reg, tiny_base, lora_dir, tmp_path, monkeypatch):
    """`adapt hub serve` in its own process on a random loopback port; push, search, pull through it."""
    root = tmp_path / "served"
    env = dict(os.environ, ADAPTERHUB_HUB_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", "from adapterhub_c.cli.main import main; main()",
                             "hub", "serve", "--root", str(root), "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {root} at http://127.0.0.1:"), (line, proc.poll())
        endpoint = line.split(" at ", 1)[1].split()[0]
        assert "writes need the token" in line and TOKEN not in line
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        _register_lora(reg, tiny_base, lora_dir, "served-lora")
        _one_line_error(cli("push", "served-lora", "me/served"), 1, "refused the token")
        r = cli("push", "served-lora", "me/served", "--token", TOKEN, "--json")
        assert r.code == 0, r.err
        assert "me/served" in search_ids(cli, TINY)
        pulled = cli("pull", "me/served", "--name", "served-back", "--json")
        assert pulled.code == 0 and pulled.json()["source"] == f"me/served@{r.json()['commit_sha']}"
        back = reg.materialize(reg.get("served-back", "artifact"))
        assert (back / WEIGHTS).read_bytes() == (lora_dir / WEIGHTS).read_bytes()
        assert (root / "repos").is_dir()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert TOKEN not in out + err


def test_hub_serve_body_limits_are_options(cli, tmp_path):
    """`--max-body-bytes` reaches the server: a larger JSON body is answered 413."""
    import httpx2

    proc = subprocess.Popen([sys.executable, "-c", "from adapterhub_c.cli.main import main; main()",
                             "hub", "serve", "--root", str(tmp_path / "served"), "--max-body-bytes", "4096"],
                            env=dict(os.environ, ADAPTERHUB_HUB_TOKEN=TOKEN, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().split(" at ", 1)[1].split()[0]
        small = httpx2.post(f"{endpoint}/api/validate-yaml", json={"content": "a: 1"}, timeout=10)
        big = httpx2.post(f"{endpoint}/api/validate-yaml", json={"content": "a" * 10_000}, timeout=10)
        assert small.status_code == 200 and big.status_code == 413, (small.status_code, big.status_code)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    r = cli("hub", "serve", "--root", str(tmp_path / "x"), "--max-body-bytes", "10")
    assert r.code == 2 and "at least 1024" in r.err


def test_hub_serve_bad_root(cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("hub", "serve", "--root", str(f))
    assert r.code == 2 and "file" in r.err
