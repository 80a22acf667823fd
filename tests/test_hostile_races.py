"""Races and leftovers (issue 20 item 7): default names allocated atomically, runs of killed
processes closed by ``adapt gc``, their staging folders removed, and a rerun of a command
whose artefact was already registered is "already done"."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from adapterhub_c.registry.models import Run
from adapterhub_c.registry.views import list_objects

RACE = r"""
import sys, tempfile, pathlib
from adapterhub_c.registry import Registry
from adapterhub_c.registry.artifacts import register_artifact
from adapterhub_c.registry.runs import record_run
home, worker = sys.argv[1], int(sys.argv[2])
reg = Registry(home=home)
base = reg.get("builtin:tiny-llama")
for i in range(3):
    with record_run(reg, "test-race", {"worker": worker, "i": i}) as run:
        d = pathlib.Path(tempfile.mkdtemp())
        (d / "data.bin").write_bytes(f"{worker}-{i}".encode() * 100)
        register_artifact(reg, kind="lora", stem="lora1-k40", base_id=base.id, folder=d, run_id=run.id)
print("ok")
"""


def test_eight_processes_with_one_default_name_all_succeed(reg, tiny_base, home):
    """The stem is taken in the insert's own transaction: 8 × 3 writers get 24 distinct names."""
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(home), str(w)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(8)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    names = sorted(a["name"] for a in list_objects(reg, "artifacts"))
    assert len(names) == 24 and len(set(names)) == 24
    assert set(names) == {"lora1-k40"} | {f"lora1-k40-{i}" for i in range(2, 25)}


KILLED = r"""
import os, signal, sys
from adapterhub_c.registry import Registry
from adapterhub_c.registry.runs import record_run
reg = Registry(home=sys.argv[1])
with record_run(reg, "push", {"what": "killed"}), reg.staging("push") as tmp:
    (tmp / "half-written.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_gc_closes_dead_runs_and_removes_their_staging(reg, home, cli):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(home)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with reg.session() as s:
        (run,) = [r for r in s.query(Run) if r.command == "push"]
        assert run.status == "running" and run.host and run.pid
    left = [p for p in reg.cache_dir.iterdir() if p.name.startswith("push-")]
    assert len(left) == 1 and (left[0] / "half-written.bin").is_file()
    with reg.staging("push") as mine:  # a living writer's folder stays
        dry = cli("gc", "--dry-run", "--json").json()
        assert dry["runs_interrupted"] == [run.id] and dry["staging_removed"] == [left[0].name]
        assert left[0].exists()
        r = cli("gc", "--json")
        assert r.code == 0, r.err
        assert r.json()["runs_interrupted"] == [run.id] and r.json()["staging_removed"] == [left[0].name]
        assert mine.is_dir() and not left[0].exists()
    with reg.session() as s:
        closed = s.get(Run, run.id)
        assert closed.status == "interrupted" and "killed" in closed.error and closed.finished_at is not None
    assert cli("gc", "--json").json()["runs_interrupted"] == []  # nothing left to close


KILLED_TRAINING = r"""
import os, signal, sys
from adapterhub_c.registry import Registry
from adapterhub_c.registry.runs import record_run
reg = Registry(home=sys.argv[1])
with record_run(reg, "adapt convert", {"what": "killed"}) as run:
    run.record_now(checkpoint=str(reg.checkpoint_dir("killed-before-its-first-save")))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_gc_removes_the_empty_checkpoint_of_a_killed_run_and_keeps_resumable_ones(reg, home, cli):
    from adapterhub_c.registry.runs import record_run

    proc = subprocess.run([sys.executable, "-c", KILLED_TRAINING, str(home)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    empty = reg.cache_dir / "checkpoints" / "killed-before-its-first-save"
    assert empty.is_dir() and not any(empty.iterdir())
    resumable = reg.checkpoint_dir("saved-once")
    (resumable / "state.pt").write_bytes(b"x")
    with record_run(reg, "adapt convert", {"what": "alive"}) as run:  # a living run's empty folder stays
        run.record_now(checkpoint=str(reg.checkpoint_dir("alive-not-saved-yet")))
        dry = cli("gc", "--dry-run", "--json").json()
        assert dry["staging_removed"] == [empty.name] and empty.is_dir()
        r = cli("gc", "--json")
        assert r.code == 0, r.err
        assert r.json()["staging_removed"] == [empty.name]
        assert not empty.exists() and resumable.is_dir() and reg.checkpoint_dir("alive-not-saved-yet").is_dir()


def test_runs_of_other_hosts_and_living_processes_are_left_alone(reg):
    from adapterhub_c.registry.runs import mark_dead_runs

    with reg.session() as s:
        s.add(Run(command="x", parameters={}, status="running", pid=os.getpid(), host=None))
        s.add(Run(command="y", parameters={}, status="running", pid=2**22 + 12345, host="elsewhere.example"))
    assert mark_dead_runs(reg) == []


KILL_AFTER_REGISTER = r"""
import os, signal, sys
import adapterhub_c.workflows.packs as packs
from adapterhub_c import api
from adapterhub_c.registry import Registry
original = packs.register_artifact
def register_then_die(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # registered, but the run is never closed
packs.register_artifact = register_then_die
api.pack("lora1", 0.4, registry=Registry(home=sys.argv[1]), name="p1")
"""


def test_rerun_after_a_kill_that_followed_registration_is_already_done(reg, tiny_base, tmp_path, home, cli):
    from tests.test_pack_ops import _make_lora

    _make_lora(reg, tiny_base, tmp_path, name="lora1")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_REGISTER, str(home)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ADAPTERHUB_HOME": str(home)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert reg.get("p1", "artifact").kind == "pack"
    assert cli("gc", "--json").json()["runs_interrupted"]
    # the same command again: exit 0, the artefact it already made, nothing recomputed
    r = cli("pack", "lora1", "--density", "0.4", "--name", "p1")
    assert r.code == 0, r.err
    assert r.out.startswith("already done: p1") and len(r.out.strip().splitlines()) == 1
    assert cli("pack", "lora1", "--density", "0.4", "--name", "p1", "--json").json()["already_done"] is True
    assert [a["name"] for a in list_objects(reg, "artifacts") if a["kind"] == "pack"] == ["p1"]
    # other options under the same name: still refused, one line, exit 2
    other = cli("pack", "lora1", "--density", "0.2", "--name", "p1")
    assert other.code == 2 and "already exists" in other.err and len(other.err.strip().splitlines()) == 1
    # and a name another command made is refused before any work
    r = cli("merge", "lora1", "lora1", "--method", "task-arithmetic", "--name", "p1")
    assert r.code == 2 and "already exists" in r.err, r.err


def test_staging_folder_names_carry_pid_and_host(reg):
    import socket

    with reg.staging("pull") as tmp:
        assert Path(tmp).name.startswith(f"pull-{os.getpid()}@{socket.gethostname()}-")
        assert reg.stale_staging() == []
