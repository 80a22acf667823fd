"""`adapt ui` over HTTP (no browser): JSON twins, 404 with the closest names, escaping, the token,
a registry that cannot be opened, pagination. The registry is generated in-process with
``populate`` of benchmarks/ui.py (rows written directly: fast)."""
from __future__ import annotations

import http.cookiejar
import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from adapterhub_c import api
from adapterhub_c.errors import UsageError
from adapterhub_c.registry import Registry
from adapterhub_c.registry.models import Artifact, BaseModel
from adapterhub_c.ui.server import background_ui, check_bind

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ui.py"
HOSTILE = "<script>alert('x')</script>"
TOKEN = "tok-5f1c9e0d7a2b4c38"


def _bench():
    spec = importlib.util.spec_from_file_location("ui_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    reg = Registry(home=tmp_path_factory.mktemp("ui_pages_home"))
    made = _bench().populate(reg, 120)
    with reg.session() as s:
        base = s.query(BaseModel).one()
        s.add(Artifact(kind="lora", name=HOSTILE, base_id=base.id, source="org/x@main", files={}, size_bytes=3,
                       config={"card": f"<b>bold</b> {HOSTILE}", "tags": ["<i>tag</i>"]}))
    yield {"reg": reg, **made}
    reg.close()


@pytest.fixture(scope="module")
def url(world):
    server = background_ui(world["reg"])
    server.start()
    yield server.endpoint + "/"
    server.stop()


def get(url: str, headers: dict | None = None, opener=None) -> tuple[int, str, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with (opener or urllib.request.build_opener()).open(req) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_every_page_has_a_json_twin_equal_to_the_api(world, url):
    reg, base = world["reg"], world["base"].replace("/", "%2F")
    twins = ["", "tree", f"tree/{base}", "object/a00003-merged", "compare?names=a00000-lora%0Aa00001-recovered-lora",
             "runs?status=failed", "search?q=a001"]
    api_paths = ["api/summary", "api/tree", f"api/tree/{base}", "api/object/a00003-merged",
                 "api/compare?names=a00000-lora%0Aa00001-recovered-lora", "api/runs?status=failed", "api/search?q=a001"]
    for page, twin in zip(twins, api_paths, strict=True):
        code, html, headers = get(url + page)
        assert code == 200 and headers["Content-Type"].startswith("text/html"), page
        code, body, _ = get(url + page + ("&" if "?" in page else "?") + "format=json")
        code2, body2, _ = get(url + twin)
        assert code == code2 == 200 and json.loads(body) == json.loads(body2), page
    assert json.loads(get(url + "api/runs?status=failed")[1]) == api.list_runs(status="failed", registry=reg)
    found, want = json.loads(get(url + "api/search?q=a001")[1]), api.find("a001", registry=reg)
    assert {k: found[k] for k in want} == want and found["results"]
    shown = json.loads(get(url + "api/object/a00003-merged")[1])["object"]
    row = api.show("a00003-merged", registry=reg)  # what `adapt show --json` prints
    assert {k: shown[k] for k in row if k != "evaluations"} == {k: v for k, v in row.items() if k != "evaluations"}
    assert [{k: e[k] for k in row["evaluations"][0]} for e in shown["evaluations"]] == row["evaluations"]


def test_unknown_names_answer_404_with_the_closest(url):
    code, html, _ = get(url + "object/a00003-merge")
    assert code == 404 and 'href="/object/a00003-merged"' in html
    code, body, _ = get(url + "api/object/a00003-merge")
    assert code == 404 and "a00003-merged" in json.loads(body)["closest"]
    code, html, _ = get(url + "tree/org%2Fbas")
    assert code == 404 and "org/base" in html
    assert get(url + "no/such/page")[0] == 404
    assert get(url + "file?ref=a00003-merged&path=adapter_model.safetensors")[0] == 404  # pictures only
    code, body, _ = get(url + "runs?page=0&format=json")
    assert code == 400 and "page" in json.loads(body)["error"]


def test_names_and_configs_are_escaped(url):
    from urllib.parse import quote

    code, html, headers = get(url + "object/" + quote(HOSTILE, safe=""))
    assert code == 200
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    assert "<b>bold</b>" not in html and "<i>tag</i>" not in html
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    code, html, _ = get(url + "search?q=script")
    assert code == 200 and "&lt;script&gt;" in html and "<script>alert" not in html
    code, html, _ = get(url + "tree/org%2Fbase?page=3")
    assert "<script>alert" not in html


def test_pages_are_paginated(world, url):
    code, body, _ = get(url + "api/tree/org%2Fbase?per_page=20")
    tree = json.loads(body)
    assert tree["per_page"] == 20 and tree["pages"] > 1
    assert len(tree["adapters"]) == 20 and all(len(v["children"]) <= 20 for v in tree["variants"])
    code, body, _ = get(url + f"api/tree/org%2Fbase?per_page=20&page={tree['pages']}")
    assert code == 200
    runs = json.loads(get(url + "api/runs?per_page=25&page=2")[1])
    assert len(runs["runs"]) == 25 and runs["total"] == 120 and runs["pages"] == 5
    found = json.loads(get(url + "api/search?q=a0&per_page=50&page=3")[1])
    assert found["total"] == 120 and len(found["results"]) == 20
    code, html, _ = get(url + "runs?per_page=25")
    assert 'rel="next" href="/runs?per_page=25&amp;page=2"' in html
    base = json.loads(get(url + "api/object/org%2Fbase")[1])["object"]
    assert base["children_total"] > len(base["children"]) or base["children_total"] <= 200


def test_the_token_guards_every_page_and_never_shows(world):
    server = background_ui(world["reg"], token=TOKEN)
    server.start()
    try:
        root = server.endpoint + "/"
        for page in ("", "api/summary", "static/ui.css", "object/a00003-merged"):
            code, body, _ = get(root + page)
            assert code == 401 and TOKEN not in body, page
        assert get(root + "api/summary", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert get(root + "api/summary", {"Authorization": "Bearer wrong"})[0] == 401
        code, _, headers = get(root + f"runs?status=failed&token={TOKEN}", opener=urllib.request.build_opener(_NoRedirect))
        assert code == 303 and TOKEN not in headers["location"] and headers["location"] == "/runs?status=failed"
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        code, body, _ = get(root + f"?token={TOKEN}", opener=opener)
        assert code == 200 and TOKEN not in body
        for page in ("tree/org%2Fbase", "runs", "search?q=a", "compare?names=a00000-lora"):
            code, body, _ = get(root + page, opener=opener)
            assert code == 200 and TOKEN not in body, page
    finally:
        server.stop()


def test_anything_but_loopback_needs_a_token():
    with pytest.raises(UsageError, match="needs a token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", TOKEN)
    check_bind("::1", None)


def _adapt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapterhub_c.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_registry_that_cannot_be_opened_fails_before_serving(tmp_path):
    r = _adapt("--home", str(tmp_path), "--db", f"sqlite:///{tmp_path}/no/such/dir/registry.db", "ui", "--port", "0")
    assert r.returncode != 0 and "adapt ui:" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    r = _adapt("--home", str(tmp_path), "--db", "postgresql+psycopg://adapt:hunter2@127.0.0.1:1/x", "ui", "--port", "0")
    assert r.returncode != 0 and "adapt ui:" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "hunter2" not in r.stderr


def test_the_command_prints_the_url_and_keeps_the_token_out_of_its_output(world, tmp_path):
    home = world["reg"].home
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub_c.cli.main", "--home", str(home), "ui", "--port", "0",
                             "--token", TOKEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("adapt ui: http://127.0.0.1:") and "token" in line
        root = line.split()[2].rstrip(";")
        assert get(root)[0] == 401
        assert get(root + f"?token={TOKEN}", opener=urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())))[0] == 200
        assert get(root + "object/nope")[0] == 401
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert TOKEN not in line + out + err


def test_ui_command_names_the_registry_without_a_password():
    assert api.ui_command() == "adapt ui"
    assert api.ui_command(home="/tmp/a b") == "adapt --home '/tmp/a b' ui"
    assert api.ui_command(db="sqlite:////tmp/r.db") == "adapt --db sqlite:////tmp/r.db ui"
    assert "hunter2" not in api.ui_command(db="postgresql+psycopg://adapt:hunter2@db/reg")


def test_demo_ends_with_the_ui_command(cli, home, monkeypatch):
    """The demo's last line (its steps replaced by one empty table: they are test_demo's business)."""
    monkeypatch.setattr(api, "demo", lambda **kw: iter([("step", [{"x": 1}])]))
    r = cli("--home", str(home), "demo", "--base", "builtin:tiny-llama")
    assert r.code == 0, r.err
    assert r.out.strip().splitlines()[-1] == f"browse what it made: adapt --home {home} ui"
