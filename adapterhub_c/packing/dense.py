"""A checked pack table + streams → dense tensors, through the compiled decoders.

:func:`decode_dense` makes one flat buffer per output dtype (one for most adapters) and
decodes every tensor of that dtype into it in one compiled call
(:mod:`adapterhub_c.kernels.unpack_cpu`), split over a few threads for large packs (the
kernels release the GIL; each thread writes its own tensors). The tensors are views of the buffer: laid out
grouped by shape, each group is one ``view(count, *shape).unbind(0)``, so the Python cost
is per distinct shape (a handful), not per tensor. The numpy decoder of :mod:`.encoding`
followed by :meth:`.ternary.TernaryTensor.to_dense` is the reference twin
(``read_pack_dense(..., impl="ref")``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from adapterhub_c.errors import IntegrityError
from adapterhub_c.packing.table import PackTable, torch_dtype

_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# Below this many output elements one thread decodes: handing work to a second thread costs
# ~30 µs, what the kernel needs for ~100K elements.
PARALLEL_MIN_NUMEL = 1 << 18
MAX_THREADS = 4
_pool: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its size), grown on demand, kept for the process


def decode_threads() -> int:
    """Threads a large pack is decoded with: ``ADAPTERHUB_DECODE_THREADS``, else the CPUs this
    process may use, at most :data:`MAX_THREADS`."""
    env = os.environ.get("ADAPTERHUB_DECODE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_THREADS, cpus))


def _run_split(kernel, index: np.ndarray, start: np.ndarray, vals: np.ndarray, threads: int,
               during=None) -> tuple[int, int]:
    """``kernel(index, start, vals)`` (rows of the same tensors) over ``threads`` contiguous runs
    of tensors, in parallel (the kernels release the GIL); the first failure by tensor number.

    ``during`` (see :func:`decode_dense`) runs in this thread first, while the other threads
    decode: this thread's run is then the smaller one (1 / (threads + 1) of the elements,
    the others share the rest), else the runs are about equal."""
    global _pool
    if threads <= 1 or index.shape[0] < 2 or int(index[:, 0].sum()) < PARALLEL_MIN_NUMEL:
        if during is not None:
            during()
        return kernel(index, start, vals)
    cum = np.cumsum(index[:, 0])
    first = 1 / (threads + 1) if during is not None else 1 / threads
    cuts = np.searchsorted(cum, cum[-1] * (first + (1 - first) * np.arange(threads - 1) / (threads - 1)))
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < index.shape[0])), index.shape[0]]
    runs = list(zip(bounds[:-1], bounds[1:], strict=True))
    if len(runs) == 1:  # one tensor holds nearly everything
        if during is not None:
            during()
        return kernel(index, start, vals)
    if _pool is None or _pool[1] < len(runs) - 1:
        _pool = (ThreadPoolExecutor(max_workers=len(runs) - 1, thread_name_prefix="pack-decode"), len(runs) - 1)
    jobs = [_pool[0].submit(kernel, index[a:b], start[a:b], vals[a:b]) for a, b in runs[1:]]
    try:
        if during is not None:
            during()
        a, b = runs[0]
        results = [kernel(index[a:b], start[a:b], vals[a:b])]  # the first run in this thread
    finally:  # a refusal by ``during`` waits for the other threads before it propagates
        results_rest = [job.result() for job in jobs]
    for (a, _), (bad, status) in zip(runs, results + results_rest, strict=True):
        if status:
            return a + bad, status
    return -1, 0


def _values(scales: np.ndarray, codes: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """[T, 3] bit patterns in ``dtype`` of (+0, +scale, -scale) as each tensor's own dtype (``codes``)
    holds them: float32 scale, rounded once to that dtype, as ``TernaryTensor.to_dense`` computes
    float32(±1)·float32(scale), then cast to ``dtype`` (what ``.to(dtype)`` of that tensor gives)."""
    s = torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32))
    vals = torch.stack([torch.zeros_like(s), s, -s], dim=1)
    if (codes == codes[0]).all():  # one source dtype (the usual case)
        out = vals.to(torch_dtype(int(codes[0]))).to(dtype)
        return out.view(_WORDS[out.element_size()]).numpy()
    out = torch.empty(vals.shape, dtype=dtype)
    for code in np.unique(codes).tolist():
        sel = torch.from_numpy(codes == code)
        out[sel] = vals[sel].to(torch_dtype(code)).to(dtype)
    return out.view(_WORDS[out.element_size()]).numpy()


def _layout_by_shape(dims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, first of each shape group in ``order``): tensors grouped by shape (the rows of
    :attr:`.table.PackTable.dims`), name order inside a group (lexsort is stable)."""
    used = 1 + int(dims[:, 0].max()) if dims.size else 1  # the columns past every rank are all ones
    order = np.lexsort(dims[:, :used].T[::-1])
    ordered = dims[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    return order, np.flatnonzero(new_group)


def _decode_group(table: PackTable, sel: np.ndarray, dtype: torch.dtype, encoding: str,
                  streams: dict[str, np.ndarray], threads: int, during=None) -> tuple[np.ndarray, list[torch.Tensor]]:
    """(tensor numbers, their dense views) for the tensors ``sel``, decoded into ``dtype``."""
    from adapterhub_c.kernels import unpack_cpu

    order, firsts = _layout_by_shape(table.dims[sel])
    tensors = sel[order]
    index = np.ascontiguousarray(table.index[tensors])
    numel = index[:, 0]
    start = np.cumsum(numel) - numel
    flat = torch.empty(int(numel.sum()), dtype=dtype)
    words = flat.view(_WORDS[flat.element_size()]).numpy()
    vals = _values(table.scales[tensors], table.dtypes[tensors], dtype)
    if encoding == "golomb":
        padded = unpack_cpu.padded_words(streams["bits"])
        kernel = lambda ix, st, vs: unpack_cpu.golomb_dense(padded, ix, st, vs, words)  # noqa: E731
    else:
        kernel = lambda ix, st, vs: unpack_cpu.bitmask_dense(streams["pos"], streams["neg"], ix, st, vs, words)  # noqa: E731
    bad, status = _run_split(kernel, index, start, vals, threads, during)
    if status:
        raise IntegrityError(f"{table.names[tensors[bad]]!r}: {unpack_cpu.STATUS_MESSAGES[status]}")
    views: list[torch.Tensor] = []
    ends = np.append(firsts[1:], len(tensors)).tolist()
    for first, end, row in zip(firsts.tolist(), ends, table.dims[tensors[firsts]].tolist(), strict=True):
        shape = row[1:1 + row[0]]
        a = int(start[first])
        views += flat[a:a + (end - first) * int(numel[first])].view(end - first, *shape).unbind(0)
    return tensors, views


def decode_dense(table: PackTable, encoding: str, streams: dict[str, np.ndarray], threads: int | None = None,
                 out_codes: np.ndarray | None = None, during=None) -> dict[str, torch.Tensor]:
    """Every tensor of ``table`` (checked by the reader) as a dense tensor, by name.

    ``out_codes``: the dtype code (:data:`.table.DTYPE_CODES`) each tensor is decoded into, its
    own by default; a tensor decoded into another dtype holds its values cast (see :func:`_values`).
    ``threads``: decoding threads for a large pack (default :func:`decode_threads`); the
    output is the same bits for any number. ``during``: a call (the reader's checks that
    decoding does not rely on) made once in this thread while other threads decode, before
    this thread decodes its share; what it raises is raised once every thread has stopped,
    ahead of any stream error."""
    threads = decode_threads() if threads is None else threads
    codes = table.dtypes if out_codes is None else out_codes
    if not codes.size:
        if during is not None:
            during()
        return {}
    groups = [np.arange(codes.size)] if (codes == codes[0]).all() else \
        [np.flatnonzero(codes == c) for c in np.unique(codes)]
    placed: list = [None] * codes.size
    for sel in groups:
        dtype = torch_dtype(int(codes[sel[0]]))
        tensors, views = _decode_group(table, sel, dtype, encoding, streams, threads, during)
        during = None  # made with the first group
        for t, view in zip(tensors.tolist(), views, strict=True):
            placed[t] = view
    return dict(zip(table.names, placed, strict=True))
