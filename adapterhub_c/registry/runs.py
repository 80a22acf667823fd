"""Recording runs: every command that changes the registry leaves a ``runs`` row.

The row is written with status ``running`` first (in its own transaction), and closed as
``succeeded``, ``failed`` (with the error) or ``interrupted`` (Ctrl-C). The work itself
registers its objects in separate transactions, only once their blobs are complete.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

from adapterhub_c.registry.models import Run, utcnow
from adapterhub_c.registry.store import Registry

SECRET_KEYS = {"token", "hf_token", "auth_token", "password", "secret", "api_key"}


def sanitize(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters safe to store: secrets dropped, values made JSON-friendly."""
    out = {}
    for k, v in params.items():
        if k.lower() in SECRET_KEYS:
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        elif isinstance(v, dict):
            out[k] = sanitize(v)
        else:
            out[k] = str(v)
    return out


class RunHandle:
    """What the work sees of its run: its id and an ``output`` dict to fill."""

    def __init__(self, run_id: str):
        self.id = run_id
        self.output: dict[str, Any] = {}


@contextlib.contextmanager
def record_run(reg: Registry, command: str, params: dict[str, Any]) -> Iterator[RunHandle]:
    """Context manager that opens and closes a ``runs`` row around some work."""
    with reg.session() as s:
        run = Run(command=command, parameters=sanitize(params), status="running", pid=os.getpid())
        s.add(run)
        s.flush()
        run_id = run.id
    handle = RunHandle(run_id)
    t0 = time.monotonic()
    status, error = "succeeded", None
    try:
        yield handle
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the user"
        raise
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised
        status, error = "failed", f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        with reg.session() as s:
            run = s.get(Run, run_id)
            run.status = status
            run.error = error
            run.finished_at = utcnow()
            run.duration_s = time.monotonic() - t0
            run.output = sanitize(handle.output)
