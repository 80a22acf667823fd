"""Issue 28 (hostile input, round three), hole 7: the smaller ones.

- input that looks like a URL is echoed without its ``user:password@`` (pull, base add, show, the
  hub client's messages): one helper, ``errors.redact_url``, behind ``hub.names.shown``;
- ``variant create --name V2`` with V1's recipe says that it returned V1 (output and Result.warnings);
- ``adapt train`` on a fresh registry adds the built-in base it names on first use.
"""
from __future__ import annotations

import pytest

from adapterhub_c import api
from adapterhub_c.errors import AdaptError, NotFoundError
from adapterhub_c.hub import client
from adapterhub_c.hub.names import BadName, check_repo_id

TINY = "builtin:tiny-llama"
SECRET = "s3cret-p@ss"
URLS = [f"http://user:{SECRET}@host/org/name", f"https://user:{SECRET}@hf.example/org/name@main",
        f"http://user:{SECRET}@host:8080/" + "x" * 200]


def _leaks(text: str) -> bool:
    return any(piece in text for piece in (SECRET, "s3cret", "p@ss", "user:"))


@pytest.mark.parametrize("url", URLS)
def test_credentials_in_echoed_urls_are_stripped(cli, url, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be asked of a real server
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for args in (["pull", url], ["base", "add", url], ["show", url], ["generate", url, "hi"],
                 ["pull", url, "--json"]):
        r = cli(*args)
        assert r.code == 2 and r.err.startswith("error: "), (args, r.code, r.err)
        assert not _leaks(r.out + r.err), (args, r.err)
    assert "is a URL" in cli("pull", url).err
    with pytest.raises(AdaptError) as err:  # the library's own messages, not only the CLI's
        client.download_repo(url, endpoint="http://127.0.0.1:9", tries=1)
    assert not _leaks(str(err.value))
    with pytest.raises(BadName) as bad:
        check_repo_id(url)
    assert not _leaks(str(bad.value))
    assert not _leaks(str(NotFoundError("base", url)))


def test_variant_create_with_another_name_says_it_returned_the_existing(cli, reg, tiny_base):
    args = ["variant", "create", TINY, "--prune", "magnitude", "--sparsity", "0.5", "--eval-tokens", "0"]
    assert cli(*args, "--name", "v1").code == 0
    r = cli(*args, "--name", "v2")
    assert r.code == 0 and "already exists (same recipe): v1" in r.out
    assert "warning: --name 'v2' ignored: variant 'v1' already has this recipe" in r.err
    again = api.create_variant(TINY, name="v2", prune="magnitude", sparsity=0.5, eval_tokens=0, registry=reg)
    assert again.name == "v1" and not again.created
    assert any("'v2' ignored" in w for w in again.warnings)
    same = api.create_variant(TINY, name="v1", prune="magnitude", sparsity=0.5, eval_tokens=0, registry=reg)
    assert same.warnings == ()  # the name asked for is the one returned: nothing to say
    assert [v["name"] for v in cli("variant", "ls", "--json").json()] == ["v1"]


def test_train_on_a_fresh_registry_adds_the_builtin_base(cli):
    assert cli("ls", "bases", "--json").json() == []
    r = cli("train", TINY, "--data", "builtin:task/reverse-words", "--rank", "2", "--targets", "q_proj",
            "--steps", "1", "--seq-len", "32", "--batch-size", "1", "--max-eval-tokens", "64",
            "--max-eval-examples", "1", "--name", "first", "--json")
    assert r.code == 0, r.err[-800:]
    assert [b["name"] for b in cli("ls", "bases", "--json").json()] == [TINY]
    assert not cli("show", TINY, "--json").json()["reference_only"]
    # a name that is not a built-in is still unknown: nothing added
    r = cli("train", "builtin:no-such-model", "--data", "builtin:task/reverse-words")
    assert r.code == 2 and "unknown" in r.err
    assert [b["name"] for b in cli("ls", "bases", "--json").json()] == [TINY]
