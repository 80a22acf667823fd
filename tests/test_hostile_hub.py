"""Hostile input against the local Hub server: DoS bodies and cards, malformed requests, odd names.

Every answer must be 2xx/4xx (never 5xx, never a dropped connection) and the server must keep
answering. Traffic goes only to a loopback server started by the test; seeded and bounded.
"""
from __future__ import annotations

import json
import random
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download

sys.path.insert(0, str(Path(__file__).parent))
from fuzzing import AUTH, CARD, HEADER, hostile_request, raw_request, request_bytes
from fuzzing import file_op as _file_op
from fuzzing import ndjson as _ndjson
from hubfaults import Probe, ProbeMiddleware
from hubutil import TOKEN, running_hub
from starlette.middleware import Middleware

from adapterhub_c.hubserver import cardcache as cards_mod
from adapterhub_c.hubserver.http import DEFAULT_MAX_BODY_BYTES
from adapterhub_c.hubserver.server import BackgroundServer


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("hostile")) as h:
        h.store.create_repo("alice/target")
        h.store.commit("alice/target", message="seed", add={
            "README.md": CARD.encode(), "config.json": b'{"a": 1}',
            "weights.safetensors": bytes(range(256)) * 16})
        yield h


def _commit(endpoint: str, repo_id: str, body: bytes) -> httpx2.Response:
    return httpx2.post(f"{endpoint}/api/models/{repo_id}/commit/main", content=body, timeout=30,
                       headers={**AUTH, "Content-Type": "application/x-ndjson"})


def _alias_bomb(depth: int) -> str:
    lines = ["---", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n---\n# bomb\n"


def _raw(endpoint: str, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str]]:
    """Send raw bytes, return (status, headers); fails the test if the server drops us."""
    status, headers = raw_request(endpoint, request, timeout)
    assert status is not None, f"connection dropped without an answer: {request[:120]!r}"
    return status, headers


_request = request_bytes
_hostile = hostile_request


# ---- hole 1: denial of service --------------------------------------------------------------
def test_alias_bomb_front_matter_is_not_expanded(hub):
    bomb = _alias_bomb(5)  # 9**6 leaves once expanded: megabytes from a 400-byte README
    hub.store.create_repo("alice/bomb")
    hub.store.commit("alice/bomb", message="bomb", add={"README.md": bomb.encode()})
    r = httpx2.get(f"{hub.endpoint}/api/models/alice/bomb", timeout=30)
    assert r.status_code == 200 and len(r.content) < 20_000
    assert r.json()["cardData"] == {}
    r = httpx2.get(f"{hub.endpoint}/api/models", params={"search": "bomb", "cardData": "true"},
                   timeout=30)
    assert r.status_code == 200 and len(r.content) < 20_000
    r = httpx2.post(f"{hub.endpoint}/api/validate-yaml", json={"content": bomb}, timeout=30)
    assert r.status_code == 400 and "alias" in r.text.lower()


def test_card_is_parsed_once_per_commit(hub, monkeypatch):
    calls = []
    real = cards_mod.parse_front_matter

    def counting(text):
        if "cache-probe" in text:
            calls.append(1)
        return real(text)

    monkeypatch.setattr(cards_mod, "parse_front_matter", counting)
    hub.store.create_repo("alice/cached")
    card = "---\ntags:\n- cache-probe\n---\n"
    hub.store.commit("alice/cached", message="card", add={"README.md": card.encode()})
    for _ in range(3):
        assert "cache-probe" in httpx2.get(f"{hub.endpoint}/api/models/alice/cached").json()["tags"]
    httpx2.get(f"{hub.endpoint}/api/models", params={"search": "cached", "cardData": "true"})
    assert len(calls) == 1
    hub.store.commit("alice/cached", message="card 2",
                     add={"README.md": (card + "changed\n").encode()})
    httpx2.get(f"{hub.endpoint}/api/models/alice/cached")
    httpx2.get(f"{hub.endpoint}/api/models/alice/cached")
    assert len(calls) == 2


def _blocks_loop(endpoint: str, entered: threading.Event, send) -> None:
    """While ``send`` is stuck in a handler's parsing, other requests must still be answered."""
    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    assert entered.wait(10), "the request never reached the parser"
    r = httpx2.get(f"{endpoint}/api/models", params={"limit": 1}, timeout=3)
    assert r.status_code == 200


def test_body_parsing_runs_off_the_event_loop(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = cards_mod.parse_front_matter

    def slow_parse(text):
        if "BLOCK" in text:
            entered.set()
            release.wait(10)
        return real(text)

    monkeypatch.setattr(cards_mod, "parse_front_matter", slow_parse)
    with running_hub(tmp_path / "h") as hub:
        hub.store.create_repo("alice/slow")
        real_commit = hub.store.commit

        def slow_commit(repo_id, **kw):
            if kw.get("message") == "BLOCK":
                entered.set()
                release.wait(10)
            return real_commit(repo_id, **kw)

        hub.store.commit = slow_commit
        try:
            _blocks_loop(hub.endpoint, entered, lambda: httpx2.post(
                f"{hub.endpoint}/api/validate-yaml", json={"content": "---\na: BLOCK\n---\n"},
                timeout=20))
            release.set()
            entered.clear()
            release.clear()
            body = _ndjson({"key": "header", "value": {"summary": "BLOCK"}}, _file_op("a.txt"))
            _blocks_loop(hub.endpoint, entered, lambda: _commit(hub.endpoint, "alice/slow", body))
        finally:
            release.set()


def test_body_size_limits(tmp_path, hub):
    # defaults: a 30 MB body to an unauthenticated JSON endpoint is refused unread
    junk = b"{" + b" " * (30 << 20)
    r = httpx2.post(f"{hub.endpoint}/api/validate-yaml", content=junk, timeout=30,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers.get("X-Error-Message")
    # configured limits, declared (Content-Length) and streamed (chunked)
    srv = BackgroundServer(tmp_path / "small", token=TOKEN, max_body_bytes=64 << 10,
                           max_upload_bytes=256 << 10)
    with srv:
        ep = srv.endpoint
        srv.store.create_repo("alice/small")
        big = json.dumps({"content": "a" * (100 << 10)}).encode()
        for content in (big, iter([big[:50_000], big[50_000:]])):
            r = httpx2.post(f"{ep}/api/validate-yaml", content=content, timeout=30,
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.headers["X-Error-Code"] == "PayloadTooLarge"
        r = httpx2.post(f"{ep}/api/models/alice/small/paths-info/main", timeout=30,
                        data={"paths": ["a" * 100] * 1000})
        assert r.status_code == 413
        ok = _ndjson(HEADER, _file_op("ok.bin", b"x" * (100 << 10)))
        assert _commit(ep, "alice/small", ok).status_code == 200
        too_big = _ndjson(HEADER, _file_op("big.bin", b"x" * (300 << 10)))
        assert _commit(ep, "alice/small", too_big).status_code == 413
        assert httpx2.get(f"{ep}/api/models").status_code == 200
        assert set(srv.store.resolve("alice/small", None).files) == {"ok.bin"}


def _read_answer(s: socket.socket) -> bytes:
    """One whole HTTP answer (head and Content-Length body) from ``s``; fails if the server closes first."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = s.recv(65536)
        assert chunk, f"connection closed without an answer: {answer[:200]!r}"
        answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-answer: {head[:200]!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_oversized_body_still_being_sent_gets_its_413_not_a_reset(tmp_path):
    # A client that keeps uploading after the server has decided (as httpx does) must still
    # read the 413: a server that answers and closes with unread bytes in its socket sends a
    # TCP reset, and the reset destroys the answer the client has not read yet. The order is
    # made certain by events, not pauses: the body is sent only once the server has decided
    # (it has started reading the body to drop it), and the answer is read once sent. That no
    # reset can come is asserted directly: the server read every byte it was sent, and the
    # same connection then carries a second request.
    probe = Probe()
    size = DEFAULT_MAX_BODY_BYTES + (1 << 20)
    with running_hub(tmp_path / "h", observe=[Middleware(ProbeMiddleware, probe=probe)]) as hub:
        host, port = hub.endpoint.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {size}\r\n\r\n".encode())
            assert probe.reading.wait(30), "the server never started on the body"
            assert probe.bytes_read == 0 and not probe.answered.is_set()  # decided before any byte came
            piece, sent = b" " * (1 << 20), 0
            while sent < size:
                s.sendall(piece[:size - sent])
                sent += min(len(piece), size - sent)
            assert probe.answered.wait(30), "the server never answered"
            answer = _read_answer(s)
            assert answer.startswith(b"HTTP/1.1 413") and b"PayloadTooLarge" in answer
            assert b"connection: close" not in answer.lower()
            assert probe.bytes_read == size  # nothing left unread in the server's socket: no reset
            s.sendall(b"GET /api/models?limit=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_answer(s).startswith(b"HTTP/1.1 200")


# ---- hole 2: 500s and dropped connections -----------------------------------------------------
def test_non_latin1_file_names_download(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("alice/unicode")
    api.upload_file(path_or_fileobj=b"konnichiwa", path_in_repo="日本/データ.txt",
                    repo_id="alice/unicode")
    url = f"{hub.endpoint}/alice/unicode/resolve/main/{quote('日本/データ.txt')}"
    head = httpx2.head(url)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == 10
    assert quote("データ.txt") in head.headers["Content-Disposition"]
    assert httpx2.get(url).content == b"konnichiwa"
    got = hf_hub_download("alice/unicode", "日本/データ.txt", endpoint=hub.endpoint,
                          cache_dir=tmp_path / "c", token=False)
    assert Path(got).read_bytes() == b"konnichiwa"
    missing = httpx2.head(f"{hub.endpoint}/alice/unicode/resolve/main/{quote('無い.txt')}")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


@pytest.mark.parametrize("target", [
    "/alice/target/resolve/main/a%0Db.txt",
    "/alice/target/resolve/main/a%00b.txt",
    "/alice/target/resolve/main/%0D%0AX-Evil:%201",
    "/alice/target/resolve/ma%0Din/README.md",
    "/alice/target/resolve/%00/README.md",
    "/api/models/alice/target/revision/x%0D%0AX-Evil:%201",
    "/api/models/alice/target/tree/ma%00in",
    "/api/models/alice/tar%0Dget",
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_control_characters_answer_4xx(hub, target, method):
    status, headers = _raw(hub.endpoint, _request(method, target))
    assert 400 <= status < 500 and "x-error-message" in headers, (status, headers)
    assert "x-evil" not in headers


MALFORMED = [
    ("POST", "/api/repos/create", b"[]"),
    ("POST", "/api/repos/create", b'"x"'),
    ("POST", "/api/repos/create", b"not json"),
    ("POST", "/api/repos/create", b"\xff\xfe"),
    ("POST", "/api/repos/create", b""),
    ("POST", "/api/repos/create", b'{"name": 5}'),
    ("POST", "/api/repos/create", b'{"name": ["a"]}'),
    ("POST", "/api/repos/create", b'{"name": "ok", "organization": {}}'),
    ("POST", "/api/repos/create", b'{"name": "ok2", "private": "yes"}'),
    ("POST", "/api/repos/create", b'{"name": "ok3", "visibility": 3}'),
    ("POST", "/api/repos/create", b"[" * 100_000),
    ("DELETE", "/api/repos/delete", b"[]"),
    ("DELETE", "/api/repos/delete", b'{"name": 1}'),
    ("PUT", "/api/models/alice/target/settings", b"[]"),
    ("PUT", "/api/models/alice/target/settings", b'{"private": "no"}'),
    ("POST", "/api/models/alice/target/preupload/main", b"[]"),
    ("POST", "/api/models/alice/target/preupload/main", b'{"files": "x"}'),
    ("POST", "/api/models/alice/target/preupload/main", b'{"files": [1]}'),
    ("POST", "/api/models/alice/target/preupload/main", b'{"files": [{"path": 5}]}'),
    ("POST", "/api/models/alice/target/preupload/main", b'{"files": {"path": "a"}}'),
    ("POST", "/api/models/alice/target/preupload/main", b"{"),
    ("POST", "/api/models/alice/target/paths-info/main", b"[]"),
    ("POST", "/api/models/alice/target/paths-info/main", b'{"paths": "README.md"}'),
    ("POST", "/api/models/alice/target/paths-info/main", b'{"paths": [1]}'),
    ("POST", "/api/models/alice/target/paths-info/main", b'{"paths": [["a"]]}'),
    ("POST", "/api/models/alice/target/paths-info/main", b"\xff"),
    ("POST", "/api/validate-yaml", b"[]"),
    ("POST", "/api/validate-yaml", b'{"content": 5}'),
]
COMMITS = [
    _ndjson({"key": "header", "value": [1]}),
    _ndjson({"key": "header", "value": None}, _file_op("a.txt")),
    _ndjson(HEADER, {"key": "file", "value": "a.txt"}),
    _ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": 5}}),
    _ndjson(HEADER, {"key": "file", "value": {"content": "eA=="}}),
    _ndjson(HEADER, {"key": "lfsFile", "value": {"path": "a.bin", "oid": 5}}),
    _ndjson(HEADER, {"key": "deletedFolder", "value": {"path": 5}}),
    _ndjson(HEADER, {"key": "deletedFile", "value": ["README.md"]}),
    _ndjson({"key": "header", "value": {"summary": 5}}, _file_op("a.txt")),
    _ndjson({"key": "header", "value": {"summary": "x", "parentCommit": 5}}, _file_op("a.txt")),
    _ndjson({"key": "header", "value": {"summary": "x", "description": []}}, _file_op("a.txt")),
    _ndjson(HEADER) + b"\xff\xfe\n",
    _ndjson(HEADER) + b"[" * 100_000 + b"\n",
]


def test_malformed_bodies_answer_400(hub):
    before = hub.store.resolve("alice/target", None).id
    cases = [(m, p, b, "application/json") for m, p, b in MALFORMED]
    cases += [("POST", "/api/models/alice/target/commit/main", b, "application/x-ndjson")
              for b in COMMITS]
    cases.append(("POST", "/api/models/alice/target/paths-info/main", b"paths=\xff\xfe",
                  "application/x-www-form-urlencoded"))
    for method, path, body, ctype in cases:
        r = httpx2.request(method, f"{hub.endpoint}{path}", content=body, timeout=10,
                           headers={**AUTH, "Content-Type": ctype})
        assert r.status_code == 400, (path, body[:60], r.status_code, r.text[:200])
        assert r.headers["X-Error-Code"] == "BadRequest" and r.headers["X-Error-Message"]
    assert hub.store.resolve("alice/target", None).id == before
    assert not any(hub.store.exists(f"local/{n}") for n in ("ok", "ok2", "ok3"))


def test_huge_range_header(hub):
    url = f"{hub.endpoint}/alice/target/resolve/main/weights.safetensors"
    digits = "9" * 5000
    assert httpx2.get(url, headers={"Range": f"bytes={digits}-"}).status_code == 416
    assert httpx2.get(url, headers={"Range": f"bytes={digits}-{digits}"}).status_code == 416
    whole = httpx2.get(url, headers={"Range": f"bytes=0-{digits}"})
    assert whole.status_code == 206 and len(whole.content) == 4096
    assert httpx2.get(url, headers={"Range": f"bytes=-{digits}"}).status_code == 206


def test_overlong_names_refused_at_upload(hub):
    hub.store.create_repo("alice/long")
    for bad in ("a" * 5000, "日" * 86, "d/" + "a" * 256, "a\rb.txt", "a\x00b", "/".join("a" * 600)):
        r = _commit(hub.endpoint, "alice/long", _ndjson(HEADER, _file_op(bad)))
        assert r.status_code == 400 and r.headers["X-Error-Code"] == "BadRequest", bad[:20]
        r = httpx2.post(f"{hub.endpoint}/api/models/alice/long/preupload/main", headers=AUTH,
                        json={"files": [{"path": bad, "sample": "", "size": 1}]})
        assert r.status_code == 400, bad[:20]
    assert _commit(hub.endpoint, "alice/long", _ndjson(HEADER, _file_op("d/" + "a" * 255))
                   ).status_code == 200
    assert hub.store.resolve("alice/long", None).files.keys() == {"d/" + "a" * 255}
    for name in ("a" * 97, "a--b", "-a", "a.", "a.git", "日本"):
        r = httpx2.post(f"{hub.endpoint}/api/repos/create", headers=AUTH, json={"name": name})
        assert r.status_code == 400 and r.headers["X-Error-Code"] == "BadRequest", name
    r = httpx2.get(f"{hub.endpoint}/api/models/alice/long/revision/{'r' * 5000}")
    assert r.status_code == 400 and len(r.headers["X-Error-Message"]) <= 500


# ---- the campaign, seeded and bounded ---------------------------------------------------------
def test_seeded_hostile_requests_never_5xx(tmp_path):
    # Each request must be answered by the server, and leave nothing running in it once
    # answered (no handler stuck waiting for input that never comes, nothing piling up).
    rng = random.Random(20)
    probe = Probe()
    with running_hub(tmp_path / "campaign", observe=[Middleware(ProbeMiddleware, probe=probe)]) as hub:
        hub.store.create_repo("alice/target")
        hub.store.commit("alice/target", message="seed", add={
            "README.md": CARD.encode(), "weights.safetensors": bytes(range(256)) * 16})
        statuses = []
        for _ in range(100):
            request = _hostile(rng)
            status, _headers = _raw(hub.endpoint, request, timeout=5)
            assert 200 <= status < 500, (status, request[:160])
            assert probe.wait_idle(), ("a request is still running after its answer", request[:160])
            statuses.append(status)
        assert probe.started > 0
        assert any(s >= 400 for s in statuses) and any(s < 300 for s in statuses)
        assert httpx2.get(f"{hub.endpoint}/api/models").status_code == 200


# ---- round three, hole 5: one card breaks listings for everyone --------------------------------
# front matter YAML allows and JSON does not; each also inside tags / base_model
JSON_UNSAFE_CARDS = {
    "nan": "---\nlicense: mit\naccuracy: .nan\n---\n",
    "inf": "---\nlibrary_name: peft\nloss: -.inf\n---\n",
    "binary": "---\nblob: !!binary aGVsbG8=\n---\n",
    "nan tag": "---\ntags:\n- lora\n- .nan\n---\n",
    "binary base_model": "---\nbase_model: !!binary /w==\n---\n",
    "inf base_model list": "---\nbase_model:\n- org/base\n- .inf\n---\n",
    "nan key": "---\n.nan: 1\n---\n",
    "lone surrogate": '---\ntags: ["\\ud800"]\n---\n',
    "huge hex int": "---\nsteps: 0x" + "f" * 4000 + "\n---\n",
    "set": "---\ntags: !!set {a, b}\n---\n",
}


def test_json_unsafe_card_never_breaks_another_answer(tmp_path):
    with running_hub(tmp_path / "cards") as hub:
        store = hub.store
        store.create_repo("alice/good")
        store.commit("alice/good", message="card", add={"README.md": CARD.encode()})
        for i, card in enumerate(JSON_UNSAFE_CARDS.values()):  # planted past the upload check
            store.create_repo(f"mallory/card-{i}")
            store.commit(f"mallory/card-{i}", message="card", add={"README.md": card.encode()})
        for i, case in enumerate(JSON_UNSAFE_CARDS):
            r = httpx2.get(f"{hub.endpoint}/api/models/mallory/card-{i}", timeout=30)
            assert r.status_code == 200 and r.json()["cardData"] == {}, (case, r.status_code, r.text[:200])
        for params in ({"full": "true"}, {"cardData": "true"}, {}):
            r = httpx2.get(f"{hub.endpoint}/api/models", params=params, timeout=30)
            assert r.status_code == 200, (params, r.text[:200])
            assert len(r.json()) == len(JSON_UNSAFE_CARDS) + 1
        api = HfApi(endpoint=hub.endpoint, token=False)
        models = {m.id: m for m in api.list_models(full=True, cardData=True)}
        assert models["alice/good"].card_data is not None and "lora" in models["alice/good"].tags
        assert api.model_info("alice/good").card_data is not None


@pytest.mark.parametrize("case", sorted(JSON_UNSAFE_CARDS))
def test_json_unsafe_card_is_refused_at_upload(hub, case):
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    repo = f"alice/refused-{sorted(JSON_UNSAFE_CARDS).index(case)}"
    api.create_repo(repo, exist_ok=True)
    before = hub.store.resolve(repo, None).id
    card = JSON_UNSAFE_CARDS[case].encode()
    # the raw commit (a client that skips huggingface_hub's validate-yaml call first)
    r = _commit(hub.endpoint, repo, _ndjson(HEADER, _file_op("README.md", card)))
    assert r.status_code == 400 and "README.md" in r.headers["X-Error-Message"], (r.status_code, r.text[:200])
    with pytest.raises((HfHubHTTPError, ValueError), match="README.md"):  # validate-yaml answers 400 first
        api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo)
    assert hub.store.resolve(repo, None).id == before
    r = httpx2.post(f"{hub.endpoint}/api/validate-yaml", json={"content": JSON_UNSAFE_CARDS[case]}, timeout=30)
    assert r.status_code == 400
    # a card with dates (YAML timestamps) is fine: they are answered as ISO strings
    api.upload_file(path_or_fileobj=b"---\ntags: [lora]\nreleased: 2024-05-01\n---\n# ok\n",
                    path_in_repo="README.md", repo_id=repo)
    assert api.model_info(repo).card_data["released"] == "2024-05-01"
