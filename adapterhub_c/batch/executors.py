"""Where batch workers run: local processes (``spawn``) or Ray tasks.

Both executors start N copies of the same worker loop (``worker.run_worker``); the queue
in the registry hands out the items, so an executor only starts workers, reports the
ones that died abnormally (their items go back to the queue at once instead of after a
lease timeout), and stops them. Worker ids start with a token the executor chose, so
the items of a dead worker can be found without knowing its pid or host.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from typing import Any

from adapterhub_c.batch.worker import WorkerSpec, run_worker
from adapterhub_c.errors import UsageError
from adapterhub_c.options.batch import EXECUTORS


def _token(i: int) -> str:
    return f"w{i}-{uuid.uuid4().hex[:8]}"


def _local_entry(spec: WorkerSpec, token: str) -> None:
    import signal

    # The parent handles Ctrl-C and stops workers; a worker only releases its item then.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_worker(spec, token)


class LocalExecutor:
    """N worker processes on this machine (multiprocessing, spawn context)."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        self.tokens: list[str] = []
        self._procs: dict[str, Any] = {}
        self._reported: set[str] = set()

    def start(self, spec: WorkerSpec) -> None:
        ctx = mp.get_context("spawn")
        for i in range(self.workers):
            token = _token(i)
            proc = ctx.Process(target=_local_entry, args=(spec, token), name=f"adapt-batch-{token}")
            proc.start()
            self._procs[token] = proc
            self.tokens.append(token)

    def pids(self) -> dict[str, int]:
        """{worker token: pid} of the started workers."""
        return {t: p.pid for t, p in self._procs.items()}

    def dead(self) -> list[tuple[str, str]]:
        """Workers that exited abnormally since the last call: [(token, why)]."""
        out = []
        for token, proc in self._procs.items():
            if token in self._reported or proc.is_alive() or proc.exitcode is None:
                continue
            self._reported.add(token)
            if proc.exitcode != 0:
                why = (f"killed by signal {-proc.exitcode}" if proc.exitcode < 0
                       else f"exited with code {proc.exitcode}")
                out.append((token, f"worker lost: {why}"))
        return out

    def alive(self) -> int:
        return sum(p.is_alive() for p in self._procs.values())

    def stop(self, timeout: float = 10) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs.values():
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)


def _ray_entry(spec: WorkerSpec, token: str) -> dict:
    return run_worker(spec, token)


class RayExecutor:
    """N Ray tasks running the worker loop, on a local Ray instance or a cluster.

    ``address`` None starts a local instance (stopped again at the end); "auto" or
    "ray://host:10001" / "host:6379" joins a running cluster. Every node must reach the
    registry URL (PostgreSQL for several machines) and the home folder (blobs: a shared
    file system) under the same paths.
    """

    name = "ray"

    def __init__(self, workers: int, address: str | None = None, cpus_per_worker: float = 1.0):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'adapterhub-c[distributed]'") from None
        self.workers, self.address, self.cpus = workers, address, cpus_per_worker
        self.tokens: list[str] = []
        self._pending: dict[Any, str] = {}
        self._started_ray = False

    def start(self, spec: WorkerSpec) -> None:
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(ignore_reinit_error=True, include_dashboard=False,
                                          log_to_driver=False, logging_level="ERROR")
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = max(1, int(self.workers * self.cpus))
            ray.init(**kwargs)
            self._started_ray = True
        remote = ray.remote(num_cpus=self.cpus, max_retries=0)(_ray_entry)
        for i in range(self.workers):
            token = _token(i)
            self._pending[remote.remote(spec, token)] = token
            self.tokens.append(token)

    def dead(self) -> list[tuple[str, str]]:
        import ray

        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        out = []
        for ref in ready:
            token = self._pending.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a crashed task: its items go back to the queue
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                out.append((token, f"worker lost: {type(e).__name__}: {first}"[:500]))
        return out

    def alive(self) -> int:
        return len(self._pending)

    def stop(self, timeout: float = 10) -> None:
        import ray

        for ref in list(self._pending):
            ray.cancel(ref, force=True)
        self._pending.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def make_executor(kind: str, workers: int, address: str | None = None):
    """A LocalExecutor or RayExecutor (UsageError for anything else)."""
    if workers < 1:
        raise UsageError("--workers must be >= 1")
    if kind == "local":
        if address:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)} (got {kind!r})")


def default_threads(workers: int) -> int:
    """Torch threads per local worker so that N workers share the cores without oversubscribing."""
    return max(1, (os.cpu_count() or 1) // workers)
