"""Test helper: run the local Hub server on a random loopback port and point clients at it.

    from hubutil import running_hub
    with running_hub(tmp_path / "hub") as hub:        # a thread in this process
        endpoint, token = hub
        hub.faults.fail_next(2, status=429)            # thread mode only
    with running_hub(root, mode="process", faults=[{"op": "slow_body", "delay": 0.2}]) as hub:
        hub.kill()                                     # SIGKILL the server process

Faults are test-side ASGI middleware (tests/hubfaults.py) given to the server through
``create_app(..., middleware=[...])``; production code has no fault hooks.

Clients should pass ``endpoint=`` and a ``cache_dir`` (or HF_HOME) under tmp_path, and run
with HF_HUB_DISABLE_XET=1 (tests/conftest.py sets it before huggingface_hub is imported).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from hubfaults import FaultInjector, fault_middleware
from starlette.middleware import Middleware

TOKEN = "hf_test_local_token_0123456789"

_SERVER_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
from hubfaults import FaultInjector, fault_middleware
from adapterhub_c.hubserver.server import serve

faults = FaultInjector()
for spec in json.loads(os.environ.get("ADAPTERHUB_TEST_FAULTS") or "[]"):
    spec = dict(spec)
    getattr(faults, spec.pop("op"))(**spec)

def ready(endpoint):
    print(endpoint, flush=True)

serve(sys.argv[1], token=os.environ.get("ADAPTERHUB_TEST_HUB_TOKEN") or None, ready=ready,
      log_level="critical", middleware=[fault_middleware(faults)])
"""


class HubHandle(tuple):
    """Unpacks as ``(endpoint, token)``; also carries the root, the server and helpers."""

    def __new__(cls, endpoint: str, token: str | None, root: Path, server=None, proc=None,
                faults: FaultInjector | None = None):
        self = super().__new__(cls, (endpoint, token))
        self.root, self.server, self.proc, self._faults = root, server, proc, faults
        return self

    @property
    def endpoint(self) -> str:
        return self[0]

    @property
    def token(self) -> str | None:
        return self[1]

    @property
    def faults(self) -> FaultInjector:
        if self._faults is None:
            raise RuntimeError("faults can be armed directly only in thread mode; "
                               "pass faults=[...] to running_hub in process mode")
        return self._faults

    @property
    def store(self):
        from adapterhub_c.hubserver.store import RepoStore

        return self.server.store if self.server is not None else RepoStore(self.root)

    def kill(self) -> None:
        """SIGKILL the server process (process mode)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _arm(faults: list[dict] | None) -> FaultInjector:
    injector = FaultInjector()
    for spec in faults or []:
        spec = dict(spec)
        getattr(injector, spec.pop("op"))(**spec)
    return injector


@contextlib.contextmanager
def running_hub(root: str | Path, token: str | None = TOKEN, mode: str = "thread",
                faults: list[dict] | None = None, observe: list[Middleware] = ()) -> Iterator[HubHandle]:
    """Start a server on 127.0.0.1:<random port> serving ``root``; stop it on exit.

    ``observe`` (thread mode): middleware put around the whole app, edge checks included
    (e.g. ``hubfaults.ProbeMiddleware``); faults act inside the edge checks.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if mode == "thread":
        from adapterhub_c.hubserver.server import BackgroundServer

        injector = _arm(faults)
        srv = BackgroundServer(root, token=token, middleware=[fault_middleware(injector)])
        for m in observe:
            srv.app.add_middleware(m.cls, *m.args, **m.kwargs)
        with srv:
            yield HubHandle(srv.endpoint, token, root, server=srv, faults=injector)
        return
    env = dict(os.environ, ADAPTERHUB_TEST_FAULTS=json.dumps(faults or []),
               ADAPTERHUB_TEST_HUB_TOKEN=token or "")
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(root), str(Path(__file__).parent)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        handle = HubHandle(_endpoint_from(proc), token, root, proc=proc)
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
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _endpoint_from(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The endpoint the server process prints once its socket listens (waits on the pipe, not a clock)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"hub server did not start: {proc.stderr.read()[-2000:]}")
    return line


def _wait_until_serving(endpoint: str, timeout: float = 30) -> None:
    """One request: the socket already listens, so it waits in the backlog until uvicorn answers."""
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=timeout):
        return
