"""The Hub client (pull / push / search / validate) against the real local server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_c.errors import AdaptError, IntegrityError, UsageError
from adapterhub_c.hub.client import download_repo, model_card, push_folder, search_adapters, validate_lora_folder

sys.path.insert(0, str(Path(__file__).parent))
from hubutil import running_hub  # noqa: E402

BASE = "local/tiny-llama"
FAST = {"tries": 3, "base_delay": 0.01}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A real PEFT LoRA (r=4 on q_proj, v_proj, non-zero B) of the tiny Llama, plus a card."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    (out / "README.md").write_text(model_card(BASE, "tiny-lora", metrics={"ppl": 12.5}))
    return out


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_push_download_roundtrip_loads_in_peft(hub, lora_dir, cache):
    endpoint, token = hub
    res = push_folder(lora_dir, "alice/tiny-lora", token=token, endpoint=endpoint)
    assert res.uploaded and len(res.commit_sha) == 40 and res.url.endswith("alice/tiny-lora")
    events = []
    got = download_repo("alice/tiny-lora", endpoint=endpoint, cache_dir=cache,
                        progress=lambda d, c, t: events.append((d, c, t)))
    assert got.commit_sha == res.commit_sha
    assert set(got.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert events, "progress callback was never called"
    a = load_file(str(lora_dir / "adapter_model.safetensors"))
    b = load_file(str(got.path / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    adapter = validate_lora_folder(got.path)
    assert sorted(adapter.layers()) and all(layer.rank == 4 for layer in adapter.layers().values())

    from peft import PeftModel

    from adapterhub_c.models.tiny import build_tiny_llama

    base, _ = build_tiny_llama()
    model = PeftModel.from_pretrained(base, str(got.path))
    ids = torch.tensor([[1, 5, 9, 12]])
    plain, _ = build_tiny_llama()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)
    # a branch name and the commit sha both resolve to the same snapshot
    again = download_repo("alice/tiny-lora", revision=res.commit_sha, endpoint=endpoint,
                          cache_dir=cache)
    assert again.path == got.path


def test_push_unchanged_makes_no_commit(hub, lora_dir, tmp_path):
    endpoint, token = hub
    first = push_folder(lora_dir, "alice/unchanged", token=token, endpoint=endpoint)
    second = push_folder(lora_dir, "alice/unchanged", token=token, endpoint=endpoint)
    assert second.commit_sha == first.commit_sha and not second.uploaded
    commits = hub.store.history("alice/unchanged")
    assert len(commits) == 2  # initial commit + one upload
    changed = _copy(lora_dir, tmp_path / "changed")
    (changed / "notes.txt").write_text("v2")
    third = push_folder(changed, "alice/unchanged", token=token, endpoint=endpoint)
    assert third.uploaded and third.commit_sha != first.commit_sha
    assert set(hub.store.resolve("alice/unchanged", None).files) >= {"notes.txt"}


def test_search_finds_only_adapters_of_that_base(hub, lora_dir, tmp_path):
    endpoint, token = hub
    push_folder(lora_dir, "alice/search-a", token=token, endpoint=endpoint)
    other = _copy(lora_dir, tmp_path / "other")
    (other / "README.md").write_text(model_card("local/other-base", "other"))
    push_folder(other, "bob/search-b", token=token, endpoint=endpoint)
    found = {m["id"] for m in search_adapters(BASE, endpoint=endpoint)}
    assert "alice/search-a" in found and "bob/search-b" not in found
    assert {m["id"] for m in search_adapters("local/other-base", endpoint=endpoint)} == {"bob/search-b"}
    assert search_adapters("local/nobody", endpoint=endpoint) == []


def test_repo_and_revision_not_found(hub, cache):
    endpoint, _ = hub
    with pytest.raises(UsageError, match="not found"):
        download_repo("alice/does-not-exist", endpoint=endpoint, cache_dir=cache, **FAST)
    hub.store.create_repo("alice/empty-ish")
    with pytest.raises(UsageError, match="revision 'nope' not found"):
        download_repo("alice/empty-ish", revision="nope", endpoint=endpoint, cache_dir=cache, **FAST)


def test_validate_rejects_bad_folders(lora_dir, tmp_path):
    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(UsageError, match="adapter_config.json"):
        validate_lora_folder(missing)

    prompt = _copy(lora_dir, tmp_path / "prompt")
    (prompt / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "task_type": "CAUSAL_LM"}))
    with pytest.raises(UsageError, match="PROMPT_TUNING"):
        validate_lora_folder(prompt)

    dora = _copy(lora_dir, tmp_path / "dora")
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UsageError, match="DoRA"):
        validate_lora_folder(dora)

    corrupt = _copy(lora_dir, tmp_path / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="outside"):
        validate_lora_folder(corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(IntegrityError, match="corrupt"):
        validate_lora_folder(corrupt)

    wrong_r = _copy(lora_dir, tmp_path / "wrong_r")
    (wrong_r / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(IntegrityError, match=r"lora_A\.weight has shape \[4, 64\]"):
        validate_lora_folder(wrong_r)

    pattern = _copy(lora_dir, tmp_path / "pattern")  # rank_pattern makes r=8 right again
    (pattern / "adapter_config.json").write_text(json.dumps(
        {**cfg, "r": 8, "rank_pattern": {"q_proj": 4, "v_proj": 4}, "use_rslora": True,
         "alpha_pattern": {"q_proj": 16}}))
    assert validate_lora_folder(pattern).config["use_rslora"] is True

    regex = _copy(lora_dir, tmp_path / "regex")
    (regex / "adapter_config.json").write_text(json.dumps(
        {**cfg, "target_modules": r".*\.self_attn\.(q|v)_proj"}))
    validate_lora_folder(regex)
    (regex / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["k_proj"]}))
    with pytest.raises(IntegrityError, match="target_modules"):
        validate_lora_folder(regex)

    unpaired = _copy(lora_dir, tmp_path / "unpaired")
    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    del tensors[key]
    save_file(tensors, str(unpaired / "adapter_model.safetensors"))
    with pytest.raises(IntegrityError, match="no matching lora_B"):
        validate_lora_folder(unpaired)


def test_pickle_only_repo_refused_unless_allowed(hub, lora_dir, cache):
    endpoint, _ = hub
    hub.store.create_repo("alice/pickled")
    hub.store.commit("alice/pickled", message="pickle", add={
        "adapter_config.json": (lora_dir / "adapter_config.json").read_bytes(),
        "adapter_model.bin": b"not really a pickle"})
    with pytest.raises(UsageError, match="only pickle weights"):
        download_repo("alice/pickled", endpoint=endpoint, cache_dir=cache, **FAST)
    got = download_repo("alice/pickled", endpoint=endpoint, cache_dir=cache, allow_pickle=True)
    assert "adapter_model.bin" in got.files
    # with safetensors present, pickles are simply not fetched
    hub.store.commit("alice/pickled", message="st", add={
        "adapter_model.safetensors": (lora_dir / "adapter_model.safetensors").read_bytes()})
    got = download_repo("alice/pickled", endpoint=endpoint, cache_dir=cache / "2")
    assert "adapter_model.bin" not in got.files and not (got.path / "adapter_model.bin").exists()


def test_dotdot_file_name_refused(hub, lora_dir, cache):
    endpoint, _ = hub
    hub.store.create_repo("alice/evil")
    hub.store.commit("alice/evil", message="evil", check_paths=False, add={
        "adapter_config.json": (lora_dir / "adapter_config.json").read_bytes(),
        "../../escape.txt": b"gotcha"})
    with pytest.raises(UsageError, match="unsafe file names"):
        download_repo("alice/evil", endpoint=endpoint, cache_dir=cache, **FAST)
    assert not (cache.parent / "escape.txt").exists()


def test_429_retried_then_succeeds_and_persistent_429_fails(hub, lora_dir, cache):
    endpoint, token = hub
    push_folder(lora_dir, "alice/ratelimited", token=token, endpoint=endpoint)
    hub.faults.fail_next(2, status=429, path_contains="/api/models/alice/ratelimited")
    got = download_repo("alice/ratelimited", endpoint=endpoint, cache_dir=cache, **FAST)
    assert (got.path / "adapter_model.safetensors").is_file()
    hub.faults.fail_next(-1, status=429, path_contains="/api/models/alice/ratelimited")
    try:
        with pytest.raises(AdaptError, match=r"rate limited \(HTTP 429\).*after 3 tries"):
            download_repo("alice/ratelimited", endpoint=endpoint, cache_dir=cache / "2", **FAST)
        hub.faults.clear()
        hub.faults.fail_next(1, status=503, path_contains="/api/models/alice/ratelimited")
        assert download_repo("alice/ratelimited", endpoint=endpoint, cache_dir=cache / "3",
                             **FAST).commit_sha == got.commit_sha
    finally:
        hub.faults.clear()


def test_wrong_token_on_push_is_a_clear_error(hub, lora_dir):
    endpoint, token = hub
    bad = "hf_wrong_token_abcdef"
    for repo in ("alice/new-repo-bad-token", "alice/tiny-lora-again"):
        if repo.endswith("again"):
            push_folder(lora_dir, repo, token=token, endpoint=endpoint)
        with pytest.raises(AdaptError, match="refused the token") as err:
            push_folder(lora_dir, repo, token=bad, endpoint=endpoint, **FAST)
        assert bad not in str(err.value) and token not in str(err.value)
        assert err.value.__cause__ is None


def test_server_killed_mid_download_then_rerun_succeeds(tmp_path, lora_dir):
    root, cache = tmp_path / "hubroot", tmp_path / "cache"
    big = _copy(lora_dir, tmp_path / "big")
    (big / "extra.safetensors").write_bytes(os.urandom(256 * 1024))
    with running_hub(root) as h:
        pushed = push_folder(big, "alice/killed", token=h.token, endpoint=h.endpoint)
    slow = [{"op": "slow_body", "delay": 0.05, "chunk_size": 4096, "times": -1}]
    errors: list[BaseException] = []
    with running_hub(root, mode="process", faults=slow) as h:
        def pull():
            try:
                download_repo("alice/killed", endpoint=h.endpoint, cache_dir=cache,
                              tries=2, base_delay=0.01)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
        t = threading.Thread(target=pull)
        t.start()
        deadline = time.monotonic() + 30
        while not list(cache.rglob("*.incomplete")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(cache.rglob("*.incomplete")), "download never started"
        h.kill()
        t.join(timeout=60)
    assert errors and isinstance(errors[0], AdaptError), errors
    assert "after 2 tries" in str(errors[0])
    with running_hub(root) as h:
        got = download_repo("alice/killed", endpoint=h.endpoint, cache_dir=cache)
    assert got.commit_sha == pushed.commit_sha
    assert (got.path / "extra.safetensors").read_bytes() == (big / "extra.safetensors").read_bytes()


_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from adapterhub_c.errors import AdaptError
    from adapterhub_c.hub.client import download_repo
    try:
        got = download_repo(sys.argv[1], endpoint="http://127.0.0.1:9")
        print(json.dumps({"ok": True, "path": str(got.path), "sha": got.commit_sha,
                          "files": got.files}))
    except AdaptError as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e)}))
""")


def test_offline_pull_uses_cache_or_fails_cleanly(hub, lora_dir, tmp_path):
    endpoint, token = hub
    hf_home = tmp_path / "hf-home"
    pushed = push_folder(lora_dir, "alice/offline", token=token, endpoint=endpoint)
    online = download_repo("alice/offline", endpoint=endpoint, cache_dir=hf_home / "hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1")
    env.pop("HF_HUB_CACHE", None)

    def run(repo):
        out = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, repo], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cached = run("alice/offline")
    assert cached["ok"] and cached["sha"] == pushed.commit_sha
    assert Path(cached["path"]) == online.path and "adapter_model.safetensors" in cached["files"]
    missing = run("alice/never-pulled")
    assert not missing["ok"] and missing["type"] == "AdaptError"
    assert "offline" in missing["msg"] and "not (fully) in the cache" in missing["msg"]


def test_model_card_front_matter():
    from adapterhub_c.hub.cards import card_tags, parse_front_matter

    text = model_card(BASE, "my-lora", recipe={"quant": "nf4", "prune": 0.5},
                      lineage=[{"role": "inherited-from", "parent": "alice/src"}],
                      metrics={"ppl": 9.87654321}, extra_tags=("variant",))
    meta = parse_front_matter(text)
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE
    assert meta["base_model_relation"] == "adapter"
    assert {"lora", "adapterhub-c", f"base_model:adapter:{BASE}", "variant"} <= set(meta["tags"])
    assert f"base_model:adapter:{BASE}" in card_tags(meta)
    for section in ("## Variant recipe", "## Lineage", "## Measured metrics", "nf4",
                    "inherited-from", "9.87654"):
        assert section in text
