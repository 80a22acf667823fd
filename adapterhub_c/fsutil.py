"""Small filesystem helpers: atomic writes of files and folders, safetensors headers."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

from adapterhub_c.errors import IntegrityError, redact_url  # noqa: F401  (redact_url re-exported)

MAX_HEADER_BYTES = 100_000_000  # a larger safetensors header is a corrupt length field




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


# bits per element of every dtype the safetensors format defines (F4 / F6 are packed sub-byte)
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4,
                          "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
                          "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The parsed JSON header of a safetensors file, without loading any tensor.

    Checked: the length field fits the file, the header is a JSON object, every tensor
    entry has a known ``dtype``, ``data_offsets`` (two integers) and ``shape`` (non-negative
    integers) whose byte size is its data's, and its data lies inside the file.
    ``__metadata__`` (if any) is returned as stored. IntegrityError when any check fails or
    the file cannot be read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{path}: corrupt safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            _check_header_length(path, n, size)
            raw = f.read(n)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read ({e.strerror})") from None
    return _checked_header(path, raw, size - 8 - n)


def parse_safetensors_header(data: bytes, label: str) -> dict:
    """:func:`read_safetensors_header` of a whole file already in memory (``label`` names it in errors)."""
    if len(data) < 8:
        raise IntegrityError(f"{label}: corrupt safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack_from("<Q", data)
    _check_header_length(label, n, len(data))
    return _checked_header(label, data[8:8 + n], len(data) - 8 - n)


def _check_header_length(path, n: int, size: int) -> None:
    if n == 0 or n > size - 8 or n > MAX_HEADER_BYTES:
        raise IntegrityError(f"{path}: corrupt safetensors file (header length {n} "
                             f"does not fit in {size} bytes)")


def _checked_header(path, raw: bytes, data_len: int) -> dict:
    """The header JSON ``raw``, parsed and checked against ``data_len`` bytes of tensor data."""
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise IntegrityError(f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e)[:80]})") from None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
                or not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS):
            raise IntegrityError(f"{path}: tensor {name[:80]}: malformed header entry") from None
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise IntegrityError(f"{path}: tensor {name[:80]}: data [{start}, {end}) lies outside the "
                                 f"{data_len} data bytes (file truncated?)")
        numel = 1
        for d in shape:
            numel *= d
        need = -(-numel * SAFETENSORS_DTYPE_BITS[dtype] // 8)
        if need != end - start:
            raise IntegrityError(f"{path}: tensor {name[:80]}: shape {shape[:8]} of {dtype} needs "
                                 f"{need} bytes, its data has {end - start}")
    return header
