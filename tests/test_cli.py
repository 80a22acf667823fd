"""Every foundation command, on the tiny base, through the real entry point."""
from __future__ import annotations

import pytest

from adapterhub_c.evals.evaluate import evaluate_model
from adapterhub_c.evals.metrics import greedy_generate
from adapterhub_c.registry.artifacts import register_artifact
from adapterhub_c.runtime.stack import load_stack, resolve_stack
from adapterhub_c.workflows.evals import run_generate


def test_version_and_init(cli, home):
    r = cli("--version")
    assert r.code == 0 and "0.1.0" in r.out
    r = cli("init")
    assert r.code == 0 and str(home) in r.out and (home / "registry.db").exists()


def test_base_add_is_idempotent(cli):
    assert cli("base", "add", "builtin:tiny-llama").code == 0
    r = cli("base", "add", "builtin:tiny-llama")
    assert r.code == 0 and "already registered" in r.out
    bases = cli("ls", "bases", "--json").json()
    assert [b["name"] for b in bases] == ["builtin:tiny-llama"]
    runs = cli("ls", "runs", "--json").json()
    assert [r["command"] for r in runs] == ["base add"]


def test_unknown_names_exit_2_with_suggestions(cli):
    cli("base", "add", "builtin:tiny-llama")
    r = cli("show", "builtin:tiny-lama")
    assert r.code == 2 and "did you mean: builtin:tiny-llama" in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("base", "add", "builtin:nope")
    assert r.code == 2
    r = cli("eval", "builtin:tiny-llama", "--data", "builtin:pydocs")
    assert r.code == 2 and "builtin:pydoc" in r.err


def test_ls_show_lineage_json(cli, reg, tiny_base, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    parent = register_artifact(reg, kind="lora", name="parent", base_id=tiny_base.id, folder=tmp_path / "a",
                               parents=[(tiny_base, "adapter-of")])
    register_artifact(reg, kind="pack", name="child", base_id=tiny_base.id, folder=tmp_path / "a",
                      parents=[(parent, "packed-from")])
    for what in ("bases", "variants", "artifacts", "runs"):
        r = cli("ls", what, "--json")
        assert r.code == 0
        r.json()
        assert cli("ls", what).code == 0
    shown = cli("show", "parent", "--json").json()
    assert shown["type"] == "artifact" and shown["children"][0]["name"] == "child"
    assert cli("show", shown["id"][:8], "--json").json()["name"] == "parent"
    assert cli("show", "builtin:tiny-llama").code == 0
    tree = cli("lineage", "child", "--json").json()
    assert tree["parents"][0]["name"] == "parent"
    assert tree["parents"][0]["parents"][0]["name"] == "builtin:tiny-llama"
    r = cli("lineage", "parent")
    assert r.code == 0 and "child" in r.out


def test_rm_refuses_while_derived_then_cascades(cli, reg, tiny_base, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    parent = register_artifact(reg, kind="lora", name="parent", base_id=tiny_base.id, folder=tmp_path / "a")
    register_artifact(reg, kind="pack", name="child", base_id=tiny_base.id, folder=tmp_path / "a",
                      parents=[(parent, "packed-from")])
    r = cli("rm", "parent", "--yes")
    assert r.code == 2 and "--cascade" in r.err
    assert {a["name"] for a in cli("ls", "--json").json()} == {"parent", "child"}
    assert cli("rm", "child", "--yes").code == 0
    assert {a["name"] for a in cli("ls", "--json").json()} == {"parent"}
    assert cli("rm", "parent", "--yes", "--cascade").code == 0
    assert cli("ls", "--json").json() == []
    r = cli("rm", "builtin:tiny-llama", "--yes")
    assert r.code == 0
    assert cli("ls", "bases", "--json").json() == []


def _tiny_model(reg):
    return load_stack(reg, resolve_stack(reg, "builtin:tiny-llama"), "cpu")


def test_eval_records_evaluations(cli, reg, tiny_base):
    model, tokenizer = _tiny_model(reg)
    r = cli("eval", "builtin:tiny-llama", "--data", "builtin:pydoc", "--max-tokens", "600", "--json")
    assert r.code == 0, r.err
    row = r.json()
    assert 1 < row["perplexity"] < 1000
    # the figures are the library's, for the same stack and budget
    lib = evaluate_model(model, tokenizer, "builtin:pydoc", "test", max_tokens=600)
    assert row["target"] == "builtin:tiny-llama" and row["data"] == "builtin:pydoc" and row["split"] == "test"
    assert row["perplexity"] == pytest.approx(lib["perplexity"], rel=1e-6)
    r = cli("eval", "builtin:tiny-llama", "--data", "builtin:task/add-numbers", "--max-examples", "3",
            "--max-tokens", "300", "--json")
    assert r.code == 0, r.err
    assert 0 <= r.json()["exact_match"] <= 1 and r.json()["completion_ppl"] > 1 and "perplexity" not in r.json()
    task = r.json()
    lib_task = evaluate_model(model, tokenizer, "builtin:task/add-numbers", "test", max_tokens=300, max_examples=3)
    assert lib_task["_details"]["exact_match"]["examples"] == 3
    assert task["exact_match"] == lib_task["exact_match"]
    assert task["completion_ppl"] == pytest.approx(lib_task["completion_ppl"], rel=1e-6)
    evs = cli("show", "builtin:tiny-llama", "--json").json()["evaluations"]
    assert {(e["dataset"], e["metric"]) for e in evs} == {
        ("builtin:pydoc", "perplexity"), ("builtin:task/add-numbers", "completion_ppl"),
        ("builtin:task/add-numbers", "exact_match")}
    # and the recorded values are the printed ones, on the base alone
    recorded = {(e["dataset"], e["metric"]): e["value"] for e in evs}
    assert recorded == pytest.approx({("builtin:pydoc", "perplexity"): row["perplexity"],
                                      ("builtin:task/add-numbers", "completion_ppl"): task["completion_ppl"],
                                      ("builtin:task/add-numbers", "exact_match"): task["exact_match"]})
    assert all(e["split"] == "test" and e["variant"] is None and e["with_adapter"] is None for e in evs)


def test_eval_bad_data_file(cli, tiny_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    r = cli("eval", "builtin:tiny-llama", "--data", str(bad))
    assert r.code == 2 and "bad.jsonl:2" in r.err
    r = cli("eval", "builtin:tiny-llama", "--data", str(tmp_path / "missing.txt"))
    assert r.code == 2 and "not found" in r.err


def test_generate(cli, reg, tiny_base):
    r = cli("generate", "builtin:tiny-llama", "Hello", "--max-new-tokens", "5")
    assert r.code == 0, r.err
    model, tokenizer = _tiny_model(reg)
    expected = greedy_generate(model, tokenizer, "Hello", 5, stop_at_newline=False)
    assert expected.strip() and r.out.rstrip("\n") == expected.rstrip("\n")  # the greedy continuation
    r = cli("generate", "builtin:tiny-llama", "Hello", "--chat", "--max-new-tokens", "3")
    assert r.code == 0, r.err
    chat = run_generate(reg, "builtin:tiny-llama", "Hello", max_new_tokens=3, chat=True)
    assert chat.strip() and r.out.rstrip("\n") == chat.rstrip("\n")
    r = cli("generate", "builtin:tiny-llama", "Hello", "--max-new-tokens", "100000")
    assert r.code == 2 and "context" in r.err


def test_generate_refuses_bad_arguments_before_loading_a_model(cli, tiny_base, monkeypatch):
    from adapterhub_c.workflows import evals

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(evals, "load_stack", no_load)
    for bad in ("0", "-3"):
        r = cli("generate", "builtin:tiny-llama", "Hello", "--max-new-tokens", bad)
        assert r.code == 2 and "--max-new-tokens must be a positive integer" in r.err, r.err


def test_corrupt_registry_exit_1(cli, home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "registry.db").write_bytes(b"garbage" * 1000)
    r = cli("ls", "--json")
    assert r.code == 1 and "cannot open registry" in r.err and "Traceback" not in r.err


def test_serve_passes_the_body_limits_on(cli, monkeypatch):
    from adapterhub_c import api

    seen = {}
    monkeypatch.setattr(api, "serve", lambda target, **kw: seen.update(kw, target=target))
    r = cli("serve", "some-variant", "--max-body-bytes", "1000", "--body-timeout", "2.5")
    assert r.code == 0, r.err
    assert (seen["target"], seen["max_body_bytes"], seen["body_timeout_s"]) == ("some-variant", 1000, 2.5)
    r = cli("serve", "some-variant", "--max-body-bytes", "0")
    assert r.code == 2 and "--max-body-bytes" in r.err
