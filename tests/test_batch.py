"""Batch conversion: the work queue in the registry, local worker processes, killed workers.

Every test runs on SQLite; the ones marked with the ``db`` fixture also on PostgreSQL when
ADAPTERHUB_TEST_PG_URL names a server (an admin URL; each test gets a database of its
own), with 3 workers there. LoRAs are served by the local Hub server (tests/hubutil.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapterhub_c.registry.db import scratch_postgres_database

sys.path.insert(0, str(Path(__file__).parent))
from hubutil import TOKEN, running_hub  # noqa: E402

TINY = "builtin:tiny-llama"
PG_ENV = "ADAPTERHUB_TEST_PG_URL"
GOOD = [f"alice/tiny-lora-{i}" for i in range(8)]
OTHER_BASE = "bob/lora-of-another-base"
MISSING = "alice/does-not-exist"
STALL_ENV = "ADAPTERHUB_TEST_STALL_SOURCE"
# Convert options small enough for the tiny base: a few training steps, short evaluations.
FAST = ["--data", "builtin:task/reverse-words", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
        "--max-eval-tokens", "128", "--max-eval-examples", "2", "--no-reference-rows", "--threads", "1"]


# ---- a test-only step hook (imported by the workers through ADAPTERHUB_BATCH_STEP_HOOK) ---------
def stall_hook(source: str, step: str, attempt: int) -> None:
    """Stall the first attempt's convert step of the item named in $ADAPTERHUB_TEST_STALL_SOURCE."""
    if source == os.environ.get(STALL_ENV) and step == "convert" and attempt == 1:
        time.sleep(600)


def crashing_pipeline(ctx) -> list[str]:
    """Like sleepy_pipeline, but the worker SIGKILLs itself in the first attempt of 'crash-*' items."""
    if ctx.source.startswith("crash-") and ctx.claim.attempt == 1:
        with ctx.step("work"):
            os.kill(os.getpid(), signal.SIGKILL)
    return sleepy_pipeline(ctx)


def sleepy_pipeline(ctx) -> list[str]:
    """A model-free pipeline for queue tests: one step, a short sleep, a failure on 'bad-*'."""
    with ctx.step("work"):
        time.sleep(0.02)
    if ctx.source.startswith("bad-"):
        raise ValueError(f"broken item {ctx.source}")
    ctx.record("work", {"by": ctx.claim.worker_id})
    return []


# ---- fixtures ----------------------------------------------------------------------------------
def _pg_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, home):
    """(registry URL, workers): SQLite in the home folder, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{home / 'registry.db'}", 2
        return
    admin = _pg_admin_url()
    if not admin:
        pytest.skip(f"{PG_ENV} not set: no PostgreSQL server to test against (.ci/run starts one)")
    with scratch_postgres_database(admin, "adapt_batch") as url:
        yield url, 3


@pytest.fixture
def breg(db, home):
    from adapterhub_c.registry import Registry

    url, _ = db
    r = Registry(url=url, home=home)
    yield r
    r.close()


def _lora_folder(root: Path, seed: int, base: str) -> Path:
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = root / f"lora-{seed}"
    get_peft_model(model, cfg).save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub holding 8 tiny-base LoRAs and one LoRA of another base."""
    from adapterhub_c.hub.client import push_folder

    src = tmp_path_factory.mktemp("loras")
    with running_hub(tmp_path_factory.mktemp("hubroot")) as h:
        for i, repo in enumerate(GOOD):
            push_folder(_lora_folder(src, i, TINY), repo, token=TOKEN, endpoint=h.endpoint, tries=1)
        push_folder(_lora_folder(src, 99, "someone/other-model"), OTHER_BASE, token=TOKEN, endpoint=h.endpoint,
                    tries=1)
        yield h


@pytest.fixture
def hf(hub, tmp_path, monkeypatch):
    """Clients (workers included: they inherit the environment) talk to the local Hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", STALL_ENV, "ADAPTERHUB_BATCH_STEP_HOOK"):
        monkeypatch.delenv(var, raising=False)
    return hub


def _make_variant(reg):
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.variants import create_variant

    add_builtin_base(reg, TINY)
    v, _ = create_variant(reg, TINY, prune="magnitude", sparsity=0.5, eval_tokens=0, name="tiny-mag50")
    return v


@pytest.fixture
def variant(breg):
    return _make_variant(breg)


def _items_file(tmp_path: Path, sources: list[str]) -> Path:
    f = tmp_path / "items.txt"
    f.write_text("# adapters to convert\n" + "\n".join(sources) + "\n")
    return f


def _artifacts(reg, kind: str) -> list:
    from sqlalchemy import select

    from adapterhub_c.registry.models import Artifact

    with reg.session() as s:
        return list(s.scalars(select(Artifact).where(Artifact.kind == kind)))


def _runs(reg, command: str) -> list:
    from sqlalchemy import select

    from adapterhub_c.registry.models import Run

    with reg.session() as s:
        return list(s.scalars(select(Run).where(Run.command == command)))


def _check_consistent(reg, allow_running: bool = False) -> None:
    """Every artefact's blobs are complete; no item is left running; done items point at artefacts."""
    from sqlalchemy import select

    from adapterhub_c.registry.models import Artifact, BatchItem

    with reg.session() as s:
        arts = {a.id: a for a in s.scalars(select(Artifact))}
        items = list(s.scalars(select(BatchItem)))
    for a in arts.values():
        for digest in a.files.values():
            reg.blobs.verified_path(digest)
    assert allow_running or not [i for i in items if i.state == "running"]
    for i in items:
        if i.state == "done":
            assert i.artifact_ids and all(a in arts for a in i.artifact_ids)


# ---- the queue itself (no models) -------------------------------------------------------------
def test_queue_many_workers_claim_each_item_once(db, breg):
    from adapterhub_c.batch import queue
    from adapterhub_c.batch.executors import make_executor
    from adapterhub_c.batch.ops import batch_status, execute_batch

    url, workers = db
    sources = [f"item-{i}" for i in range(24)] + ["bad-1", "item-3"]
    batch, changes = queue.open_batch(breg, "q", "test", {"k": 1}, sources, max_attempts=2)
    assert changes == {"added": 25, "duplicates": 1, "requeued": 0}
    stats = execute_batch(breg, batch.id, make_executor("local", workers), lease_seconds=30,
                          pipeline="test_batch:sleepy_pipeline", threads=1)
    assert stats["done"] == 24 and stats["failed"] == 1 and not stats["lost_workers"]
    status = batch_status(breg, "q")
    assert status["counts"] == {"queued": 0, "running": 0, "done": 24, "failed": 2}
    done = [i for i in status["items"] if i["state"] == "done"]
    assert all(i["attempts"] == 1 for i in done)
    assert len({i["outputs"]["work"]["by"] for i in done}) >= 1
    failed = {i["source"]: i["error"] for i in status["items"] if i["state"] == "failed"}
    assert failed["bad-1"] == "ValueError: broken item bad-1"
    assert failed["item-3"] == "duplicate of item #4 (item-3)"
    # Re-opening with the same list adds nothing; the failed item (1 attempt of 2) is requeued.
    _, changes = queue.open_batch(breg, "q", "test", {"k": 1}, sources, max_attempts=2)
    assert changes == {"added": 0, "duplicates": 0, "requeued": 1}
    stats = execute_batch(breg, batch.id, make_executor("local", 1), lease_seconds=30,
                          pipeline="test_batch:sleepy_pipeline", threads=1)
    assert stats["done"] == 0 and stats["failed"] == 1
    _, changes = queue.open_batch(breg, "q", "test", {"k": 1}, sources, max_attempts=2)
    assert changes["requeued"] == 0  # out of attempts
    with pytest.raises(Exception, match="other options"):
        queue.open_batch(breg, "q", "test", {"k": 2}, sources, max_attempts=2)


def test_killed_worker_gives_its_item_back_at_once(db, breg):
    from adapterhub_c.batch import queue
    from adapterhub_c.batch.executors import make_executor
    from adapterhub_c.batch.ops import execute_batch

    batch, _ = queue.open_batch(breg, "crash", "test", {}, ["crash-1", "item-2"], max_attempts=3)
    stats = execute_batch(breg, batch.id, make_executor("local", 1), lease_seconds=600,
                          pipeline="test_batch:crashing_pipeline", threads=1)
    (lost,) = stats["lost_workers"]
    assert "killed by signal 9" in lost["reason"] and lost["items_returned"] == 1
    state = {i.source: (i.state, i.attempts) for i in queue.items(breg, batch.id)}
    assert state == {"crash-1": ("queued", 1), "item-2": ("queued", 0)}  # not left waiting for a 600 s lease
    stats = execute_batch(breg, batch.id, make_executor("local", 1), lease_seconds=600,
                          pipeline="test_batch:crashing_pipeline", threads=1)
    assert stats["done"] == 2 and not stats["lost_workers"]
    items = {i.source: i for i in queue.items(breg, batch.id)}
    assert items["crash-1"].attempts == 2 and "signal 9" in items["crash-1"].outputs["errors"][0]["error"]


class FakeClock:
    """The queue's and the worker's notion of now: it moves only when a test or a waiting worker moves it."""

    def __init__(self):
        import datetime as dt

        self.now = dt.datetime(2026, 1, 1, 12, 0, 0)
        self.slept: list[float] = []

    def utcnow(self):
        return self.now

    def advance(self, seconds: float) -> None:
        import datetime as dt

        self.now += dt.timedelta(seconds=seconds)

    def sleep(self, seconds: float) -> None:  # a waiting worker: time passes, nothing else runs
        self.slept.append(seconds)
        self.advance(seconds)


@pytest.fixture
def clock(monkeypatch):
    import types

    from adapterhub_c.batch import queue, worker

    fake = FakeClock()
    monkeypatch.setattr(queue, "utcnow", fake.utcnow)
    monkeypatch.setattr(worker, "utcnow", fake.utcnow)
    monkeypatch.setattr(worker, "time", types.SimpleNamespace(sleep=fake.sleep, monotonic=time.monotonic))
    return fake


def test_claims_are_exclusive_and_stale_workers_cannot_complete(db, breg, clock):
    from adapterhub_c.batch import queue
    from adapterhub_c.batch.worker import WorkerSpec, run_worker

    batch, _ = queue.open_batch(breg, "leases", "test", {}, ["a", "b"], max_attempts=3)
    first = queue.claim(breg, batch.id, "w-old@host:1", lease_s=30)
    second = queue.claim(breg, batch.id, "w-other@host:2", lease_s=300)
    assert (first.source, first.attempt) == ("a", 1) and second.source == "b"
    assert queue.claim(breg, batch.id, "w-third@host:3", lease_s=30) is None
    clock.advance(29)
    assert queue.reap_expired(breg, batch.id) == 0  # a lease is kept until it expires
    clock.advance(2)  # the first worker went silent: its lease expired, the second's did not
    assert queue.reap_expired(breg, batch.id) == 1
    again = queue.claim(breg, batch.id, "w-new@host:4", lease_s=30)
    assert (again.source, again.attempt) == ("a", 2)
    # The stale worker wakes up: it can neither renew, record nor complete.
    assert not queue.renew(breg, first, 30)
    assert not queue.record_output(breg, first, "x", 1)
    assert not queue.complete(breg, first, [])
    assert queue.complete(breg, again, []) and queue.complete(breg, second, [])
    assert not queue.complete(breg, again, [])  # completing twice is refused too
    assert queue.counts(breg, batch.id)["done"] == 2
    items = {i.source: i for i in queue.items(breg, batch.id)}
    assert items["a"].attempts == 2 and items["a"].outputs["errors"][0]["error"].startswith("worker lost")
    # An idle worker waits for a running item whose lease then expires, and finishes it.
    b2, _ = queue.open_batch(breg, "leases-2", "test", {}, ["c"], max_attempts=3)
    queue.claim(breg, b2.id, "w-dead@host:5", lease_s=1.0)
    spec = WorkerSpec(url=breg.url, home=str(breg.home), batch_id=b2.id, lease_s=30,
                      pipeline="test_batch:sleepy_pipeline")
    stats = run_worker(spec, "w-live", poll_s=0.1)
    assert stats == {"done": 1, "failed": 0, "lost": 0}
    assert clock.slept and sum(clock.slept) >= 1.0  # it waited (in the clock's time) for the lease to end
    (item,) = queue.items(breg, b2.id)
    assert item.attempts == 2 and item.outputs["errors"][0]["error"].startswith("worker lost")


def test_migration_applies_and_rolls_back(db, home):
    from alembic import command
    from sqlalchemy import inspect

    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.db import _alembic_config

    url, _ = db
    reg = Registry(url=url, home=home)
    assert {"batches", "batch_items"} <= set(inspect(reg.engine).get_table_names())
    cfg = _alembic_config()
    with reg.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert "batch_items" not in inspect(reg.engine).get_table_names()
    reg.close()
    reg = Registry(url=url, home=home)  # opening upgrades again
    assert "batch_items" in inspect(reg.engine).get_table_names()
    reg.close()


# ---- the convert pipeline over a local Hub ----------------------------------------------------
def test_batch_converts_reports_broken_items_and_reruns_without_redoing(db, breg, variant, hf, cli, tmp_path):
    url, workers = db
    sources = GOOD + [MISSING, OTHER_BASE, GOOD[0]]
    items = _items_file(tmp_path, sources)
    args = ["--db", url, "batch", "convert", "--variant", "tiny-mag50", "--from-file", str(items), *FAST,
            "--pack-density", "0.3", "--push-to", "carol", "--workers", str(workers), "--retries", "1",
            "--name", "zoo", "--json"]
    r = cli(*args)
    assert r.code == 1, r.err  # some items failed: reported, and the exit status says so
    out = r.json()
    assert "3 failed" in r.err and "adapt batch status zoo" in r.err, [(i["source"], i["error"]) for i in out["items"]]
    assert out["counts"] == {"queued": 0, "running": 0, "done": 8, "failed": 3}
    by_source = {}
    for it in out["items"]:
        by_source.setdefault(it["source"], []).append(it)
    assert "does-not-exist" in by_source[MISSING][0]["error"]
    assert "someone/other-model" in by_source[OTHER_BASE][0]["error"]
    assert by_source[GOOD[0]][1]["error"] == "duplicate of item #1 (alice/tiny-lora-0)"
    done = [it for it in out["items"] if it["state"] == "done"]
    assert {it["source"] for it in done} == set(GOOD)
    for it in done:
        assert it["attempts"] == 1 and len(it["artifact_ids"]) == 3  # pulled, converted, pack
        assert set(it["outputs"]) >= {"pull", "convert", "pack", "evaluate", "push"}
        assert it["outputs"]["push"]["repo"].startswith("carol/")
        assert it["outputs"]["evaluate"]["completion_ppl"] > 1
    converted, packs = _artifacts(breg, "recovered-lora"), _artifacts(breg, "pack")
    assert len(converted) == 8 and len(packs) == 8
    assert all(a.variant_id == variant.id for a in converted)
    pushed = {it["outputs"]["push"]["repo"] for it in done}
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hf.endpoint, token=TOKEN)
    assert all(api.model_info(repo).sha for repo in pushed) and len(pushed) == 8
    assert len(_runs(breg, "batch convert")) == 1
    converts = len(_runs(breg, "adapt convert"))
    _check_consistent(breg)

    # Re-run: done items are skipped, failed ones retried once (--retries 1), nothing converted twice.
    r = cli(*args)
    assert r.code == 1
    again = r.json()
    assert again["this_run"]["done"] == 0 and again["this_run"]["failed"] == 2
    attempts = {it["source"]: it["attempts"] for it in again["items"] if it["state"] == "failed"}
    assert attempts == {MISSING: 2, OTHER_BASE: 2, GOOD[0]: 0}
    assert len(_artifacts(breg, "recovered-lora")) == 8 and len(_artifacts(breg, "pack")) == 8
    assert len(_runs(breg, "adapt convert")) == converts
    # A third run has nothing left to try; status shows the same picture.
    r = cli(*args)
    assert r.json()["this_run"] == {**r.json()["this_run"], "done": 0, "failed": 0}
    status = cli("--db", url, "batch", "status", "zoo", "--json").json()
    assert status["counts"] == {"queued": 0, "running": 0, "done": 8, "failed": 3}
    table = cli("--db", url, "batch", "status", "zoo")
    assert table.code == 0 and "does-not-exist" in table.out and "8 done, 3 failed" in table.out
    # Same name, other options: refused with a clear message, nothing changed.
    r = cli("--db", url, "batch", "convert", "--variant", "tiny-mag50", "--from-file", str(items), "--steps", "3",
            "--name", "zoo")
    assert r.code == 2 and "other options" in r.err


def test_batch_killed_mid_item_leaves_registry_consistent_and_rerun_finishes(db, breg, variant, hf, cli,
                                                                            tmp_path):
    """The whole `adapt batch convert` (driver and worker) SIGKILLed inside a convert step:
    nothing half-registered, the item stays claimed until its lease expires, a rerun finishes it."""
    url, _ = db
    items = _items_file(tmp_path, GOOD[:2])
    env = dict(os.environ, ADAPTERHUB_BATCH_STEP_HOOK="test_batch:stall_hook", **{STALL_ENV: GOOD[0]},
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = ["--db", url, "batch", "convert", "--variant", "tiny-mag50", "--from-file", str(items), *FAST,
            "--workers", "1", "--name", "killme", "--json"]
    cmd = [sys.executable, "-c", "from adapterhub_c.cli.main import main; main()", *args, "--lease-seconds", "5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_stall(breg, GOOD[0], proc)
        os.killpg(proc.pid, signal.SIGKILL)  # driver, worker and all: nobody is left to give the item back
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    from adapterhub_c.batch import queue

    batch = queue.get_batch(breg, "killme")
    state = {i.source: (i.state, i.attempts) for i in queue.items(breg, batch.id)}
    assert state == {GOOD[0]: ("running", 1), GOOD[1]: ("queued", 0)}
    assert _artifacts(breg, "recovered-lora") == []  # the killed convert registered nothing
    _check_consistent(breg, allow_running=True)

    # Rerun (no hook): the dead claim's lease runs out, the item is taken again and finished.
    r = cli(*args, "--lease-seconds", "30")
    assert r.code == 0, r.err
    final = r.json()
    assert final["counts"]["done"] == 2 and final["this_run"]["done"] == 2
    assert {it["source"]: it["attempts"] for it in final["items"]} == {GOOD[0]: 2, GOOD[1]: 1}
    killed = next(it for it in final["items"] if it["source"] == GOOD[0])
    assert killed["outputs"]["errors"][0]["error"].startswith("worker lost: lease expired")
    assert len(_artifacts(breg, "recovered-lora")) == 2
    _check_consistent(breg)


def _wait_for_stall(reg, source: str, proc, timeout: float = 180) -> int:
    """The pid of the worker once it is inside ``source``'s convert step."""
    from adapterhub_c.batch import queue
    from adapterhub_c.registry.models import Batch

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"batch exited early: {proc.stderr.read()[-2000:]}")
        with reg.session() as s:
            batch = s.query(Batch).filter_by(name="killme").one_or_none()
        if batch is not None:
            for it in queue.items(reg, batch.id):
                if it.source == source and it.state == "running" and (it.outputs or {}).get("step") == "convert":
                    return int(it.worker_id.rsplit(":", 1)[1])
        time.sleep(0.2)
    raise AssertionError("the worker never reached the stalled step")


def test_bad_input_is_refused_before_any_work(breg, variant, cli, tmp_path, db):
    url, _ = db
    r = cli("--db", url, "batch", "convert", "--variant", "nope", "--from-file", str(_items_file(tmp_path, GOOD)))
    assert r.code == 2 and "unknown variant 'nope'" in r.err
    r = cli("--db", url, "batch", "convert", "--variant", "tiny-mag50")
    assert r.code == 2 and "--from-file" in r.err
    r = cli("--db", url, "batch", "convert", "--variant", "tiny-mag50", "--from-file", str(tmp_path / "none.txt"))
    assert r.code == 2 and "no such file" in r.err
    r = cli("--db", url, "batch", "convert", "--variant", "tiny-mag50", "--from-file",
            str(_items_file(tmp_path, GOOD)), "--workers", "0")
    assert r.code == 2 and "--workers" in r.err
    r = cli("--db", url, "batch", "convert", "--variant", "tiny-mag50", "--from-file",
            str(_items_file(tmp_path, GOOD)), "--threads", "0")
    assert r.code == 2 and "--threads" in r.err
    r = cli("--db", url, "batch", "status", "nothing-here")
    assert r.code == 2 and "unknown batch" in r.err
    from adapterhub_c.registry.views import list_objects

    assert not [x for x in list_objects(breg, "runs") if x["command"] == "batch convert"]


# ---- Ray ---------------------------------------------------------------------------------------
@pytest.fixture
def shared_db(home):
    """The registry a Ray cluster would share: PostgreSQL when the server is there, else SQLite."""
    admin = _pg_admin_url()
    if admin:
        with scratch_postgres_database(admin, "adapt_batch") as url:
            yield url
    else:
        yield f"sqlite:///{home / 'registry.db'}"


def test_batch_on_a_local_ray_instance(shared_db, home, hf, cli, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is in the distributed extra: pip install '.[distributed]'")
    from adapterhub_c.registry import Registry

    reg = Registry(url=shared_db, home=home)
    try:
        _make_variant(reg)
        items = _items_file(tmp_path, GOOD[:3] + [MISSING])
        r = cli("--db", shared_db, "batch", "convert", "--variant", "tiny-mag50", "--from-file", str(items), *FAST,
                "--executor", "ray", "--workers", "2", "--retries", "0", "--name", "on-ray", "--json")
        assert r.code == 1, r.err
        out = r.json()
        assert out["counts"] == {"queued": 0, "running": 0, "done": 3, "failed": 1}
        assert out["this_run"]["executor"] == "ray" and out["this_run"]["workers"] == 2
        assert not out["this_run"]["lost_workers"]
        done = [it for it in out["items"] if it["state"] == "done"]
        assert all(it["attempts"] == 1 and it["worker"].startswith("w") for it in done)
        assert len(_artifacts(reg, "recovered-lora")) == 3
        assert not ray.is_initialized()  # the local instance the batch started is gone again
        _check_consistent(reg)
    finally:
        reg.close()
