"""The local Hub server, driven by the real huggingface_hub client and by raw HTTP."""
from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

sys.path.insert(0, str(Path(__file__).parent))

CARD = ("---\nlibrary_name: peft\nbase_model: org/base\nbase_model_relation: adapter\n"
        "tags:\n- lora\n---\n# an adapter\n")


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=hub.token)


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "README.md").write_text(CARD)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "weights.safetensors").write_bytes(bytes(range(256)) * 400)
    return d


def test_create_upload_download_roundtrip(hub, api, folder, tmp_path):
    url = api.create_repo("alice/round")
    assert str(url).endswith("/alice/round")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/round")
    assert err.value.response.status_code == 409
    assert str(api.create_repo("alice/round", exist_ok=True)).endswith("/alice/round")

    info = api.upload_folder(folder_path=folder, repo_id="alice/round", commit_message="first")
    model = api.model_info("alice/round", files_metadata=True)
    assert model.sha == info.oid and not model.private
    sizes = {s.rfilename: s.size for s in model.siblings}
    assert sizes == {"README.md": len(CARD), "config.json": 8, "sub/weights.safetensors": 102400}
    weights = next(s for s in model.siblings if s.rfilename.endswith(".safetensors"))
    digest = hashlib.sha256((folder / "sub/weights.safetensors").read_bytes()).hexdigest()
    assert weights.lfs.sha256 == digest
    assert "base_model:adapter:org/base" in model.tags and model.card_data.base_model == "org/base"

    tree = list(api.list_repo_tree("alice/round", recursive=True))
    assert {t.path for t in tree} == {"README.md", "config.json", "sub", "sub/weights.safetensors"}
    top = list(api.list_repo_tree("alice/round"))
    assert {t.path for t in top} == {"README.md", "config.json", "sub"}
    assert [t.path for t in api.get_paths_info("alice/round", ["config.json", "nope"])] == ["config.json"]
    assert [c.title for c in api.list_repo_commits("alice/round")] == ["first", "initial commit"]

    cache = tmp_path / "cache"
    path = Path(snapshot_download("alice/round", endpoint=hub.endpoint, cache_dir=cache, token=False))
    assert path.name == info.oid
    for p in ("README.md", "config.json", "sub/weights.safetensors"):
        assert (path / p).read_bytes() == (folder / p).read_bytes()
    one = hf_hub_download("alice/round", "config.json", endpoint=hub.endpoint,
                          cache_dir=tmp_path / "c2", token=False)
    assert Path(one).read_text() == '{"a": 1}'


def test_resolve_headers_range_and_error_codes(hub, api, folder):
    api.create_repo("alice/headers")
    sha = api.upload_folder(folder_path=folder, repo_id="alice/headers").oid
    data = (folder / "sub/weights.safetensors").read_bytes()
    url = f"{hub.endpoint}/alice/headers/resolve/main/sub/weights.safetensors"
    with httpx2.Client() as c:
        head = c.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["X-Repo-Commit"] == sha
        assert head.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert int(head.headers["Content-Length"]) == len(data)
        part = c.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]
        assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        assert c.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
        assert c.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        for path, status, code in [
            ("alice/nope/resolve/main/x", 401, "RepoNotFound"),
            ("alice/headers/resolve/nope/x", 404, "RevisionNotFound"),
            ("alice/headers/resolve/main/missing.txt", 404, "EntryNotFound"),
        ]:
            r = c.head(f"{hub.endpoint}/{path}")
            assert (r.status_code, r.headers["X-Error-Code"]) == (status, code), path
        r = c.head(f"{hub.endpoint}/alice/nope/resolve/main/x",
                   headers={"Authorization": f"Bearer {hub.token}"})
        assert r.status_code == 404  # authenticated: a plain "not found"
        assert c.get(f"{hub.endpoint}/alice/headers/resolve/main/missing.txt"
                     ).headers["X-Repo-Commit"] == sha


def test_revisions_branch_sha_prefix(hub, api, folder, tmp_path):
    api.create_repo("alice/revs")
    first = api.upload_folder(folder_path=folder, repo_id="alice/revs").oid
    (folder / "config.json").write_text('{"a": 2}')
    second = api.upload_folder(folder_path=folder, repo_id="alice/revs").oid
    assert first != second
    assert api.model_info("alice/revs", revision="main").sha == second
    assert api.model_info("alice/revs", revision=first).sha == first
    assert api.model_info("alice/revs", revision=first[:10]).sha == first
    old = hf_hub_download("alice/revs", "config.json", revision=first, endpoint=hub.endpoint,
                          cache_dir=tmp_path / "c", token=False)
    assert Path(old).read_text() == '{"a": 1}'
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/revs", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/revs", "config.json", revision="f" * 40, endpoint=hub.endpoint,
                        cache_dir=tmp_path / "c", token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/revs", "missing.txt", endpoint=hub.endpoint,
                        cache_dir=tmp_path / "c", token=False)
    for missing in ("alice/none", "no-namespace"):
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(missing, endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("no-namespace", "config.json", endpoint=hub.endpoint,
                        cache_dir=tmp_path / "c", token=False)


def test_identical_commit_returns_parent(hub, api, folder):
    api.create_repo("alice/same")
    first = api.upload_folder(folder_path=folder, repo_id="alice/same").oid
    # the client skips unchanged files itself (preupload returns their oids) ...
    assert api.upload_folder(folder_path=folder, repo_id="alice/same").oid == first
    # ... and a raw commit re-sending identical bytes makes no new commit on the server
    body = _ndjson({"key": "header", "value": {"summary": "again"}},
                   {"key": "file", "value": {"path": "config.json", "encoding": "base64",
                                             "content": base64.b64encode(b'{"a": 1}').decode()}})
    r = _post_commit(hub, "alice/same", body)
    assert r.status_code == 200 and r.json()["commitOid"] == first
    assert len(hub.store.history("alice/same")) == 2


def test_auth_private_repos_and_whoami(hub, api, folder):
    anon = HfApi(endpoint=hub.endpoint, token=False)
    wrong = HfApi(endpoint=hub.endpoint, token="hf_wrong")
    assert api.whoami()["name"] == "local"
    with pytest.raises(HfHubHTTPError) as err:
        wrong.whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        anon.create_repo("alice/anon")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        wrong.create_repo("alice/anon")
    assert err.value.response.status_code == 401 and "hf_wrong" not in str(err.value)
    api.create_repo("alice/secret", private=True)
    api.upload_folder(folder_path=folder, repo_id="alice/secret")
    assert api.model_info("alice/secret").private
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        wrong.model_info("alice/secret")
    assert "alice/secret" not in {m.id for m in anon.list_models(search="secret")}
    assert "alice/secret" in {m.id for m in api.list_models(search="secret")}
    with pytest.raises(HfHubHTTPError) as err:
        wrong.upload_folder(folder_path=folder, repo_id="alice/secret")
    assert err.value.response.status_code in (401, 404)


def test_path_traversal_refused(hub, api):
    api.create_repo("alice/paths")
    for bad in ("../evil.txt", "a/../../evil.txt", "/etc/passwd", ".git/config", "a//b"):
        body = _ndjson({"key": "header", "value": {"summary": "x"}},
                       {"key": "file", "value": {"path": bad, "encoding": "base64",
                                                 "content": base64.b64encode(b"x").decode()}})
        r = _post_commit(hub, "alice/paths", body)
        assert r.status_code == 400, bad
    assert hub.store.resolve("alice/paths", None).files == {}
    r = httpx2.post(f"{hub.endpoint}/api/models/alice/paths/preupload/main",
                    json={"files": [{"path": "../x", "sample": "", "size": 1}]},
                    headers={"Authorization": f"Bearer {hub.token}"})
    assert r.status_code == 400


def test_list_models_filter_search_limit(hub, api, tmp_path):
    for i, base in enumerate(["org/base", "org/base", "org/other"]):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "README.md").write_text(CARD.replace("org/base", base))
        api.create_repo(f"carol/list-{i}")
        api.upload_folder(folder_path=d, repo_id=f"carol/list-{i}")
    ids = {m.id for m in api.list_models(filter="base_model:adapter:org/base", author="carol")}
    assert ids == {"carol/list-0", "carol/list-1"}
    assert {m.id for m in api.list_models(filter=["lora", "base_model:adapter:org/other"])} == {"carol/list-2"}
    assert {m.id for m in api.list_models(search="LIST-2")} == {"carol/list-2"}
    assert len(list(api.list_models(author="carol", limit=2))) == 2
    cards = list(api.list_models(filter="base_model:adapter:org/other", cardData=True))
    assert cards[0].card_data.base_model == "org/other"


def test_delete_repo_and_deleted_files(hub, api, folder):
    api.create_repo("alice/gone")
    api.upload_folder(folder_path=folder, repo_id="alice/gone")
    api.delete_file("config.json", repo_id="alice/gone")
    assert "config.json" not in {s.rfilename for s in api.model_info("alice/gone").siblings}
    api.delete_folder("sub", repo_id="alice/gone")
    assert {s.rfilename for s in api.model_info("alice/gone").siblings} == {"README.md"}
    api.delete_repo("alice/gone")
    assert not api.repo_exists("alice/gone")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("alice/gone")
    api.delete_repo("alice/gone", missing_ok=True)


def test_fault_injection_is_in_process_only(hub, api, folder, tmp_path):
    api.create_repo("alice/faults")
    api.upload_folder(folder_path=folder, repo_id="alice/faults")
    with httpx2.Client() as c:
        for path in ("/faults", "/api/faults", "/_faults"):
            assert c.post(f"{hub.endpoint}{path}", json={"op": "fail_next", "n": 5}).status_code in (404, 405)
        # faults are test-side middleware (tests/hubfaults.py): the production app carries none
        assert not hasattr(hub.server.app.state, "faults")
        assert not hasattr(hub.server, "faults")
        hub.faults.fail_next(1, status=429, path_contains="/api/models/alice/faults")
        assert c.get(f"{hub.endpoint}/api/models/alice/faults").status_code == 429
        assert c.get(f"{hub.endpoint}/api/models/alice/faults").status_code == 200
    # a connection dropped mid-body is resumed by the client with a Range request
    hub.faults.drop_body(times=1, after_bytes=5000)
    path = hf_hub_download("alice/faults", "sub/weights.safetensors", endpoint=hub.endpoint,
                           cache_dir=tmp_path / "c", token=False)
    assert Path(path).read_bytes() == (folder / "sub/weights.safetensors").read_bytes()
    assert hub.faults.hits.get("drop_body") == 1


def _ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def _post_commit(hub, repo_id: str, body: bytes):
    return httpx2.post(f"{hub.endpoint}/api/models/{repo_id}/commit/main", content=body,
                       headers={"Authorization": f"Bearer {hub.token}",
                                "Content-Type": "application/x-ndjson"})
