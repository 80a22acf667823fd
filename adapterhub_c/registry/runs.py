"""Recording runs: every command that changes the registry leaves a ``runs`` row.

The row is written with status ``running`` first (in its own transaction), and closed as
``succeeded``, ``failed`` (with the error) or ``interrupted`` (Ctrl-C). The work itself
registers its objects in separate transactions, only once their blobs are complete.
A process killed outright (``kill -9``, power loss) cannot close its row: the row keeps the
host and pid, and :func:`mark_dead_runs` (``adapt gc``) closes it as ``interrupted`` once
that process is gone.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Iterator

from sqlalchemy import select

from adapterhub_c.registry.blobs import pid_alive
from adapterhub_c.registry.models import Run, utcnow
from adapterhub_c.registry.store import Registry

HOST = socket.gethostname()

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
    """What the work sees of its run: its id and an ``output`` dict to fill (written when the run ends)."""

    def __init__(self, run_id: str, reg: Registry | None = None):
        self.id = run_id
        self.output: dict[str, Any] = {}
        self._reg = reg

    def record_now(self, **fields: Any) -> None:
        """Add ``fields`` to the output and write them to the row at once, for others to see while
        the run goes on (e.g. the checkpoint folder it owns, which ``gc`` must then leave alone)."""
        self.output.update(fields)
        with self._reg.session() as s:
            s.get(Run, self.id).output = sanitize(self.output)


@contextlib.contextmanager
def record_run(reg: Registry, command: str, params: dict[str, Any]) -> Iterator[RunHandle]:
    """Context manager that opens and closes a ``runs`` row around some work."""
    with reg.session() as s:
        run = Run(command=command, parameters=sanitize(params), status="running", pid=os.getpid(),
                  host=HOST)
        s.add(run)
        s.flush()
        run_id = run.id
    handle = RunHandle(run_id, reg)
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


def mark_dead_runs(reg: Registry, dry_run: bool = False) -> list[str]:
    """Close as ``interrupted`` every ``running`` row whose process, on this host, is gone.

    Rows of other hosts are left alone (their pids mean nothing here); rows written before
    runs had a host are taken as this host's. Returns the ids of the rows (to be) closed.
    """
    closed = []
    with reg.session() as s:
        for run in s.scalars(select(Run).where(Run.status == "running")):
            if run.pid is None or (run.host or HOST) != HOST or pid_alive(run.pid):
                continue
            closed.append(run.id)
            if not dry_run:
                run.status = "interrupted"
                run.error = f"process {run.pid} on {HOST} ended without closing its run (killed?); closed by gc"
                run.finished_at = utcnow()
    return closed
