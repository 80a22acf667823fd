"""Shared fixtures: an isolated registry home, the tiny base, and an in-process CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh ADAPTERHUB_HOME for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(h))
    monkeypatch.delenv("ADAPTERHUB_DB_URL", raising=False)
    return h


@pytest.fixture
def reg(home):
    from adapterhub_c.registry import Registry

    r = Registry(home=home)
    yield r
    r.close()


@pytest.fixture
def tiny_base(reg):
    """The registry with ``builtin:tiny-llama`` registered; returns the base row."""
    from adapterhub_c.workflows.bases import add_builtin_base

    base, _ = add_builtin_base(reg, "builtin:tiny-llama")
    return base


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        import json

        return json.loads(self.out)


@pytest.fixture
def cli(home, capsys):
    """Run ``adapt`` in-process: cli("ls", "--json") -> CliResult(code, out, err)."""
    from adapterhub_c.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub-compatible server for the module (tests/hubutil.py); modules with seeded repos override it."""
    from hubutil import running_hub

    with running_hub(tmp_path_factory.mktemp("hubroot")) as h:
        yield h


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """Point huggingface_hub at the local server with a fresh cache and no ambient token."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    for var in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return hub
