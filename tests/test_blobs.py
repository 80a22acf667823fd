"""Blob store: content addressing, verification, crash safety, gc."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from adapterhub_c.errors import AdaptError, IntegrityError
from adapterhub_c.registry.blobs import BlobStore, sha256_file


def test_put_and_verify(tmp_path):
    store = BlobStore(tmp_path)
    d = store.put_bytes(b"hello")
    assert store.path_for(d).parent.name == d[:2]
    assert store.read_bytes(d) == b"hello"
    assert store.put_bytes(b"hello") == d


def test_corrupt_and_missing_blobs_are_detected(tmp_path):
    store = BlobStore(tmp_path)
    d = store.put_bytes(b"hello world")
    path = store.path_for(d)
    path.chmod(0o644)
    path.write_bytes(b"hello World")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read_bytes(d)
    path.unlink()
    with pytest.raises(AdaptError, match="missing blob"):
        store.read_bytes(d)


WRITER = r"""
import sys, time
from adapterhub_c.registry import Registry
from adapterhub_c.workflows.bases import add_builtin_base
from adapterhub_c.registry.artifacts import register_artifact
reg = Registry(home=sys.argv[1])
base, _ = add_builtin_base(reg, "builtin:tiny-llama")
tmp = reg.home / "tmp"
class Slow:
    def __init__(self): self.n, self.told = 0, False
    def read(self, size):
        self.n += 1
        if not self.told and any(p.stat().st_size > 0 for p in tmp.iterdir()):
            self.told = True  # bytes reached the temp file: the parent may kill us now
            print("writing", flush=True)
        time.sleep(0.05)  # pacing only: this stream never ends
        return b"x" * 1024
digest = reg.blobs.put_stream(Slow())  # never ends: killed mid-write
register_artifact(reg, kind="lora", name="never", base_id=base.id, files={"x": digest})
"""


def test_killed_writer_leaves_no_row_and_gc_cleans(tmp_path, cli, home):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(home)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # sent once the temp file holds bytes
    tmp_files = list((home / "tmp").iterdir())
    assert tmp_files and all(p.stat().st_size > 0 for p in tmp_files)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = cli("ls", "artifacts", "--json")
    assert r.code == 0 and r.json() == []
    r = cli("gc", "--json")
    assert r.code == 0, r.err
    assert r.json()["temp_removed"] == len(tmp_files)
    assert not list((home / "tmp").iterdir())
    # the base's blobs are referenced and survive
    from adapterhub_c.registry import Registry

    reg = Registry(home=home)
    base = reg.get("builtin:tiny-llama")
    for digest in base.files.values():
        assert sha256_file(reg.blobs.verified_path(digest)) == digest


def test_gc_removes_unreferenced_blobs(reg, tiny_base, cli):
    orphan = reg.blobs.put_bytes(b"orphan")
    r = cli("gc", "--json")
    assert r.json()["blobs_removed"] == 1
    assert not reg.blobs.exists(orphan)
    assert all(reg.blobs.exists(d) for d in tiny_base.files.values())
