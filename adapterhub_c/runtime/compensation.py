"""Calibration activation moments of a variant, collected once and cached in the registry's cache.

``adapt convert --recover lowrank`` needs, for every linear layer of the variant, the
second moment of its calibration inputs (``training.compensate.collect_moments``). They
depend only on the variant and the calibration set, so they are stored under
``<cache>/moments/<key>.safetensors`` with key = digest(variant id, calibration data,
samples, sequence length, format version) and reused by every adapter converted to the
variant: a batch of 100 LoRAs pays for them once. The file holds each moment's
eigendecomposition (Q in float32, eigenvalues in float64) — the compensation needs
exactly that, and the regularised moment C + δ·I has the same eigenvectors — and, in its
metadata, which module reads which moment and from how many tokens. Written atomically;
a file that cannot be read is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from adapterhub_c.progress import Progress
from adapterhub_c.registry.models import Variant
from adapterhub_c.registry.store import Registry
from adapterhub_c.training.compensate import Moment, Moments, collect_moments
from adapterhub_c.variants.calibration import calibration_rows

FORMAT = 1


def moments_key(variant: Variant, calib: str, samples: int, seq_len: int) -> str:
    """The cache key of a variant's calibration moments (variant, data, samples, length, format)."""
    text = json.dumps({"variant": variant.id, "calib": calib, "samples": int(samples), "seq_len": int(seq_len),
                       "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def moments_path(reg: Registry, variant: Variant, calib: str, samples: int, seq_len: int) -> Path:
    """Where those moments are cached in the registry's cache folder."""
    return reg.cache_dir / "moments" / f"{moments_key(variant, calib, samples, seq_len)}.safetensors"


def variant_moments(reg: Registry, variant: Variant, model, tokenizer, calib: str, samples: int, seq_len: int,
                    progress: Progress | None = None) -> tuple[Moments, bool]:
    """(the variant's calibration moments, True when they came from the cache).

    ``model``: the variant as loaded (``load_variant``), before any adapter is attached."""
    path = moments_path(reg, variant, calib, samples, seq_len)
    cached = _read(path)
    if cached is not None:
        return cached, True
    rows = calibration_rows(tokenizer, calib, samples, seq_len)
    moments = collect_moments(model, rows, progress=progress)
    _write(path, moments, {"variant": variant.id, "calib": calib, "samples": samples, "seq_len": seq_len})
    return moments, False


def _write(path: Path, moments: Moments, about: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key, m in moments.moments.items():
        tensors[f"{key}.Q"] = m.Q.float().contiguous()
        tensors[f"{key}.e"] = m.e.double().contiguous()
    meta = {"format": str(FORMAT), "groups": json.dumps(moments.groups, sort_keys=True),
            "tokens": json.dumps({k: m.tokens for k, m in moments.moments.items()}, sort_keys=True),
            "about": json.dumps(about, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path) -> Moments | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT):
                return None
            groups, tokens = json.loads(meta["groups"]), json.loads(meta["tokens"])
            moments = {key: Moment(Q=f.get_tensor(f"{key}.Q"), e=f.get_tensor(f"{key}.e"), tokens=int(n))
                       for key, n in tokens.items()}
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if not set(groups.values()) <= set(moments):
        return None
    return Moments(groups=groups, moments=moments)
