"""Content-addressed blob store: ``blobs/sha256/ab/abcdef…``.

Writes stream into ``tmp/<pid>-<random>.part`` while hashing and are renamed into place
only when complete, so a blob path always holds whole, verified content. Reads verify
the digest (``IntegrityError`` on mismatch). Temp files carry the writer's pid, which
lets ``gc`` tell a live writer from one that died mid-write.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Iterable

from adapterhub_c.errors import AdaptError, IntegrityError

CHUNK = 1 << 20
STALE_AFTER_S = 24 * 3600


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BlobStore:
    """Blobs under ``root/blobs/sha256`` with temp files under ``root/tmp``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"

    # ---- writing ---------------------------------------------------------------
    def path_for(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        return self.blob_dir / digest[:2] / digest

    def _new_temp(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{os.getpid()}-{os.urandom(6).hex()}.part"

    def put_stream(self, stream: BinaryIO) -> str:
        """Store everything read from ``stream``; returns its sha256."""
        tmp = self._new_temp()
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            final = self.path_for(digest)
            if final.exists():
                tmp.unlink()
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            return digest
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def put_file(self, path: str | os.PathLike) -> str:
        """Store a file's content; returns its sha256."""
        with open(path, "rb") as f:
            return self.put_stream(f)

    def put_bytes(self, data: bytes) -> str:
        """Store bytes; returns their sha256."""
        import io

        return self.put_stream(io.BytesIO(data))

    def put_folder(self, folder: str | os.PathLike) -> dict[str, str]:
        """Store every file under ``folder``; returns {relative path: digest}."""
        folder = Path(folder)
        files = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                files[p.relative_to(folder).as_posix()] = self.put_file(p)
        return files

    # ---- reading ---------------------------------------------------------------
    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def verified_path(self, digest: str) -> Path:
        """The blob's path after checking that its content still hashes to ``digest``."""
        path = self.path_for(digest)
        if not path.is_file():
            raise AdaptError(f"missing blob {digest[:12]}… (the store at {self.root} is incomplete)")
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(f"blob {digest[:12]}… is corrupt (content hashes to {actual[:12]}…)")
        return path

    def read_bytes(self, digest: str) -> bytes:
        """The blob's content, verified."""
        return self.verified_path(digest).read_bytes()

    def materialize(self, files: dict[str, str], dest: str | os.PathLike, link: bool = True) -> Path:
        """Lay out ``files`` ({relpath: digest}) in ``dest`` as symlinks (or copies), verified."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for rel, digest in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise IntegrityError(f"refusing unsafe file name {rel!r}")
            src = self.verified_path(digest)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if link and target.is_symlink() and os.readlink(target) == str(src.resolve()):
                continue
            # Build beside the target and rename over it: another process may be reading the
            # same view (e.g. batch workers loading one variant), so it must never be missing.
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
            if link:
                tmp.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        return dest

    # ---- maintenance -------------------------------------------------------------
    def all_digests(self) -> Iterable[str]:
        if not self.blob_dir.is_dir():
            return []
        return [p.name for p in self.blob_dir.glob("*/*") if p.is_file()]

    def gc(self, referenced: set[str], dry_run: bool = False) -> dict:
        """Delete blobs not in ``referenced`` and temp files of dead or stale writers."""
        removed_blobs, freed = [], 0
        for digest in self.all_digests():
            if digest not in referenced:
                path = self.path_for(digest)
                freed += path.stat().st_size
                removed_blobs.append(digest)
                if not dry_run:
                    path.unlink()
        removed_tmp = []
        if self.tmp_dir.is_dir():
            now = time.time()
            for p in self.tmp_dir.iterdir():
                pid_part = p.name.split("-", 1)[0]
                dead = pid_part.isdigit() and not pid_alive(int(pid_part))
                stale = now - p.stat().st_mtime > STALE_AFTER_S
                if dead or stale:
                    freed += p.stat().st_size if p.is_file() else 0
                    removed_tmp.append(p.name)
                    if not dry_run:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
        return {"blobs_removed": len(removed_blobs), "temp_removed": len(removed_tmp),
                "bytes_freed": freed, "dry_run": dry_run}
