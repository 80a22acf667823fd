"""Hostile and careless input (issue 20 items 5, 6, 8, 12): names are paths, secrets in
URLs, bad CLI values, and the LoraHub-equivalent compose penalty. Fast and seeded."""
from __future__ import annotations

import numpy as np
import pytest

from adapterhub_c.errors import UsageError

BASE = "builtin:tiny-llama"


def _lora(reg, base, tmp_path, name="lora1"):
    from tests.test_pack_ops import _make_lora

    return _make_lora(reg, base, tmp_path, name=name)


# ---- item 5: one name rule ---------------------------------------------------------------
BAD_NAMES = ["", "../evil", "..", ".", "/abs", "/", "a b", "a\x00b", "a\nb", "x" * 97, "a/b/c",
             "a/..", "owner/", "/x", "a\\b", "na\u202eme", "a:b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_check_new_name_refuses_hostile_names(reg, bad):
    from adapterhub_c.registry.artifacts import check_new_name

    with pytest.raises(UsageError):
        check_new_name(reg, bad)


def test_check_new_name_accepts_hub_like_names(reg):
    from adapterhub_c.registry.artifacts import check_new_name

    for good in ["lora1", "my-pack.v2_k10", "owner/name", "x" * 96, "o/" + "y" * 96]:
        check_new_name(reg, good)


def test_cli_refuses_bad_and_empty_names(reg, tiny_base, tmp_path, cli):
    _lora(reg, tiny_base, tmp_path)
    for bad in ["../evil", "", "/tmp/abs", "a b"]:
        r = cli("pack", "lora1", "--density", "10%", "--name", bad)
        assert r.code == 2, (bad, r.out, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path.parent / "evil").exists()


def test_variant_and_batch_names_follow_the_rule(reg, tiny_base):
    from adapterhub_c.batch.ops import run_batch
    from adapterhub_c.workflows.variants import create_variant

    for bad in ["../v", "", "a/b", "a b"]:
        with pytest.raises(UsageError):
            create_variant(reg, BASE, quant="int8", name=bad)
        with pytest.raises(UsageError):
            run_batch(reg, variant="nope", sources=["x/y"], name=bad)


def test_unpack_default_path_stays_in_cwd(reg, tiny_base, tmp_path, cli, monkeypatch):
    """Old rows may hold odd names: the default ./<name> uses the last part of a namespaced
    name and refuses one that would leave the working directory."""
    from adapterhub_c.registry.models import Artifact

    _lora(reg, tiny_base, tmp_path)
    assert cli("pack", "lora1", "--density", "10%", "--name", "p1").code == 0
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)

    def rename(new):
        with reg.session() as s:
            row = s.query(Artifact).filter(Artifact.kind == "pack").one()
            row.name = new

    rename("..")  # an old row, stored before the name rule
    r = cli("unpack", "..")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    rename("../evil")  # its last part, inside cwd
    r = cli("unpack", "../evil")
    assert r.code == 0, r.err
    assert (work / "evil" / "adapter_config.json").is_file() and not (tmp_path / "work" / "evil").exists()
    rename("owner/p1")
    r = cli("unpack", "owner/p1")
    assert r.code == 0, r.err
    assert (work / "p1" / "adapter_config.json").is_file() and not (work / "owner").exists()


# ---- item 12: the LoraHub-equivalent penalty ----------------------------------------------
def test_compose_default_l1_gives_lorahubs_objective_at_five_examples():
    """Per-example losses for 5 examples in one batch of 5 (one completion token each, so our
    per-token mean is the per-example mean): with the default l1 our objective equals
    LoraHub's (sum of per-batch mean losses / number of examples + 0.05·mean|w|) times the
    number of examples, so both rank every candidate alike."""
    import torch

    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.merging.compose import compose_adapters
    from adapterhub_c.options.merge import ComposeOptions

    l1 = ComposeOptions.defaults()["l1"]  # what compose_artifacts (and adapt compose) use
    assert l1 == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3))
    n_examples, batch_size = 5, 5

    def per_example(w):
        return (a @ w - 1.0) ** 2 + 0.5

    def ours(w):  # mean over all completion tokens
        return float(np.mean(per_example(w)))

    def lorahub(w):
        losses = per_example(w)
        batch_means = [losses[i:i + batch_size].mean() for i in range(0, n_examples, batch_size)]
        return float(sum(batch_means) / n_examples + 0.05 * np.mean(np.abs(w)))

    g = torch.Generator().manual_seed(0)
    adapters = [LoraAdapter({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
                            {"base_model.model.q.lora_A.weight": torch.randn(2, 4, generator=g),
                             "base_model.model.q.lora_B.weight": torch.randn(4, 2, generator=g)})
                for _ in range(3)]
    res = compose_adapters(adapters, loss_fn=ours, budget=12, seed=0)
    assert len(res.curve) == 12
    for step in res.curve:
        w = np.asarray(step["weights"])
        assert step["objective"] == pytest.approx(n_examples * lorahub(w), rel=1e-12)
    assert res.objective == pytest.approx(n_examples * min(lorahub(np.asarray(s["weights"])) for s in res.curve))


# ---- item 8: bad CLI input is one line, exit 2 --------------------------------------------
def _one_line_usage(r):
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Error:" not in lines[0] and "Traceback" not in r.err


@pytest.mark.parametrize("device", ["quantum", "cuda:x", "cpu0", ""])
def test_bad_device_is_a_usage_error(device):
    from adapterhub_c.models.device import resolve_device

    with pytest.raises(UsageError, match="--device"):
        resolve_device(device)
    assert str(resolve_device("cpu")) == "cpu"


def test_cli_bad_values_are_one_line_exit_2(reg, tiny_base, tmp_path, cli):
    _lora(reg, tiny_base, tmp_path)
    assert cli("pack", "lora1", "--density", "10%", "--name", "p1").code == 0
    _one_line_usage(cli("train", BASE, "--data", "builtin:pydoc", "--device", "quantum"))
    _one_line_usage(cli("train", BASE, "--data", "builtin:pydoc", "--steps", "0"))
    _one_line_usage(cli("eval", BASE, "--data", "builtin:pydoc", "--max-tokens", "-1"))
    _one_line_usage(cli("ls", "runs", "--limit", "-1"))
    _one_line_usage(cli("merge", "lora1", "lora1"))
    _one_line_usage(cli("unpack", "p1", "--out", "/proc/self/x"))


def test_bad_db_and_home_are_one_line_exit_2(cli, tmp_path):
    _one_line_usage(cli("--db", "bogus://x", "ls"))
    _one_line_usage(cli("--home", "/proc/1/nope", "ls"))


# ---- item 6: secrets in URLs and on the command line --------------------------------------
def test_redact_url_strips_userinfo():
    from adapterhub_c.fsutil import redact_url

    assert redact_url("http://user:TOKEN@host:8080/x") == "http://host:8080/x"
    assert redact_url("failed at https://:hf_abc@hub.example/api and http://u@h") == \
        "failed at https://hub.example/api and http://h"
    assert redact_url("http://host/a@b") == "http://host/a@b"


def test_endpoint_credentials_never_stored_or_printed(monkeypatch):
    """What is stored (public_endpoint, used for runs.parameters and artefact config) and the
    error from an endpoint with credentials that cannot be reached name it without them."""
    from adapterhub_c.errors import AdaptError
    from adapterhub_c.hub import client

    monkeypatch.setenv("HF_ENDPOINT", "http://user:SECRET123@127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert client.public_endpoint() == "http://127.0.0.1:9"
    with pytest.raises(AdaptError) as e:
        client.download_repo("org/x", tries=1, base_delay=0.0, cache_dir=None)
    assert "SECRET123" not in str(e.value) and "user:" not in str(e.value), str(e.value)


def test_token_file_and_token_warning(reg, cli, tmp_path, monkeypatch):
    import adapterhub_c.api as api

    seen = []
    monkeypatch.setattr(api, "search", lambda base, **kw: seen.append(kw["token"]) or [])
    tok = tmp_path / "tok"
    tok.write_text("hf_filetoken\n")
    r = cli("search", "--base", "x/y", "--token-file", str(tok), "--json")
    assert r.code == 0, r.err
    assert seen[-1] == "hf_filetoken" and "warning" not in r.err
    r = cli("search", "--base", "x/y", "--token", "hf_cli", "--json")
    assert r.code == 0 and seen[-1] == "hf_cli"
    assert "visible in ps; prefer HF_TOKEN or --token-file" in r.err
    _one_line_usage(cli("search", "--base", "x/y", "--token-file", str(tmp_path / "missing")))
    _one_line_usage(cli("search", "--base", "x/y", "--token", "a", "--token-file", str(tok)))
