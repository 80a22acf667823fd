"""Test helper: run the local Hub server on a random loopback port and point clients at it.

    from hubutil import running_hub
    with running_hub(tmp_path / "hub") as hub:        # a thread in this process
        endpoint, token = hub
        hub.faults.fail_next(2, status=429)            # thread mode only
    with running_hub(root, mode="process", faults=[{"op": "slow_body", "delay": 0.2}]) as hub:
        hub.kill()                                     # SIGKILL the server process

Clients should pass ``endpoint=`` and a ``cache_dir`` (or HF_HOME) under tmp_path, and run
with HF_HUB_DISABLE_XET=1 (tests/conftest.py sets it before huggingface_hub is imported).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

TOKEN = "hf_test_local_token_0123456789"

_SERVER_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from adapterhub_c.hub.server import serve

root, ready_file = sys.argv[1], Path(sys.argv[2])
faults = json.loads(os.environ.get("ADAPTERHUB_TEST_FAULTS") or "[]")

def configure(app):
    for spec in faults:
        spec = dict(spec)
        getattr(app.state.faults, spec.pop("op"))(**spec)

def ready(endpoint):
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(endpoint)
    os.replace(tmp, ready_file)

serve(root, token=os.environ.get("ADAPTERHUB_TEST_HUB_TOKEN") or None, ready=ready,
      configure=configure, log_level="critical")
"""


class HubHandle(tuple):
    """Unpacks as ``(endpoint, token)``; also carries the root, the server and helpers."""

    def __new__(cls, endpoint: str, token: str | None, root: Path, server=None, proc=None):
        self = super().__new__(cls, (endpoint, token))
        self.root, self.server, self.proc = root, server, proc
        return self

    @property
    def endpoint(self) -> str:
        return self[0]

    @property
    def token(self) -> str | None:
        return self[1]

    @property
    def faults(self):
        if self.server is None:
            raise RuntimeError("faults can be armed directly only in thread mode; "
                               "pass faults=[...] to running_hub in process mode")
        return self.server.faults

    @property
    def store(self):
        from adapterhub_c.hub.store import RepoStore

        return self.server.store if self.server is not None else RepoStore(self.root)

    def kill(self) -> None:
        """SIGKILL the server process (process mode)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running_hub(root: str | Path, token: str | None = TOKEN, mode: str = "thread",
                faults: list[dict] | None = None) -> Iterator[HubHandle]:
    """Start a server on 127.0.0.1:<random port> serving ``root``; stop it on exit."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if mode == "thread":
        from adapterhub_c.hub.server import BackgroundServer

        srv = BackgroundServer(root, token=token)
        for spec in faults or []:
            spec = dict(spec)
            getattr(srv.faults, spec.pop("op"))(**spec)
        with srv:
            yield HubHandle(srv.endpoint, token, root, server=srv)
        return
    ready = root.parent / f".{root.name}.{os.getpid()}.{time.monotonic_ns()}.endpoint"
    env = dict(os.environ, ADAPTERHUB_TEST_FAULTS=json.dumps(faults or []),
               ADAPTERHUB_TEST_HUB_TOKEN=token or "")
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(root), str(ready)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"hub server exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("hub server did not start in 60 s")
            time.sleep(0.05)
        handle = HubHandle(ready.read_text(), token, root, proc=proc)
        _wait_until_serving(handle.endpoint)
        yield handle
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        ready.unlink(missing_ok=True)


def _wait_until_serving(endpoint: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=2):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
