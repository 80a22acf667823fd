"""fsutil: the one safetensors header reader, with its integrity checks."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from adapterhub_c.errors import IntegrityError
from adapterhub_c.fsutil import read_safetensors_header


def test_header_is_parsed_without_loading_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"a": torch.zeros(2, 3), "b": torch.ones(4)}, metadata={"kind": "x"}))
    header = read_safetensors_header(path)
    assert header["__metadata__"] == {"kind": "x"}
    assert header["a"]["shape"] == [2, 3] and header["b"]["shape"] == [4]


def _file(tmp_path: Path, header: bytes, data: bytes = b"") -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "only 2 bytes"),
    (struct.pack("<Q", 10**6) + b"{}", "header length"),
    (struct.pack("<Q", 0), "header length"),
])
def test_corrupt_length_fields(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(IntegrityError, match=message):
        read_safetensors_header(path)


@pytest.mark.parametrize("header, message", [
    (b"[1, 2]", "corrupt safetensors header"),
    (b"{not json", "corrupt safetensors header"),
    (b'{"a": {"dtype": "F32", "shape": [2]}}', "malformed header entry"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "lies outside"),
])
def test_corrupt_headers(tmp_path, header, message):
    with pytest.raises(IntegrityError, match=message):
        read_safetensors_header(_file(tmp_path, header, b"\0" * 4))


def test_missing_file_is_an_integrity_error(tmp_path):
    with pytest.raises(IntegrityError, match="cannot read"):
        read_safetensors_header(tmp_path / "nope.safetensors")
