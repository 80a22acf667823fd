"""Small filesystem helpers: atomic writes of files and folders, safetensors headers."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

from adapterhub_c.errors import IntegrityError

MAX_HEADER_BYTES = 100_000_000  # a larger safetensors header is a corrupt length field


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")


def redact_url(text: str | None) -> str | None:
    """``text`` (a URL, or a message holding URLs) with any ``user:password@`` removed from
    every ``scheme://`` URL in it: use before storing or printing an endpoint or URL."""
    return text if not text else _USERINFO.sub(r"\1", text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The parsed JSON header of a safetensors file, without loading any tensor.

    Checked: the length field fits the file, the header is a JSON object, every tensor
    entry has ``data_offsets`` and ``shape`` (returned as a list of ints) and its data lies
    inside the file. ``__metadata__`` (if any) is returned as stored. IntegrityError when
    any check fails or the file cannot be read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{path}: corrupt safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8 or n > MAX_HEADER_BYTES:
                raise IntegrityError(f"{path}: corrupt safetensors file (header length {n} "
                                     f"does not fit in {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: corrupt safetensors header ({e})") from None
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{path}: tensor {name}: malformed header entry") from None
        if not 0 <= start <= end <= data_len:
            raise IntegrityError(f"{path}: tensor {name}: data [{start}, {end}) lies outside the "
                                 f"{data_len} data bytes (file truncated?)")
        info["shape"] = shape
    return header
