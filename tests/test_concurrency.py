"""Eight processes register artefacts into one SQLite registry at once."""
from __future__ import annotations

import subprocess
import sys

from adapterhub_c.registry.views import list_objects

WORKER = r"""
import sys, tempfile, pathlib
from adapterhub_c.registry import Registry
from adapterhub_c.registry.artifacts import register_artifact
from adapterhub_c.registry.runs import record_run
home, worker = sys.argv[1], int(sys.argv[2])
reg = Registry(home=home)
base = reg.get("builtin:tiny-llama")
for i in range(5):
    with record_run(reg, "test-register", {"worker": worker, "i": i}) as run:
        d = pathlib.Path(tempfile.mkdtemp())
        (d / "data.bin").write_bytes(f"{worker}-{i}".encode() * 1000)
        register_artifact(reg, kind="lora", name=f"w{worker}-a{i}", base_id=base.id, folder=d,
                          parents=[(base, "adapter-of")], run_id=run.id)
print("ok")
"""


def test_eight_processes_register_at_once(reg, tiny_base, home):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(home), str(w)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(8)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=False):
        assert p.returncode == 0, err
        assert "locked" not in err
    names = {a["name"] for a in list_objects(reg, "artifacts")}
    assert names == {f"w{w}-a{i}" for w in range(8) for i in range(5)}
    runs = [r for r in list_objects(reg, "runs") if r["command"] == "test-register"]
    assert len(runs) == 40 and all(r["status"] == "succeeded" for r in runs)
