"""ComPEFT: keep the top-k entries by magnitude, keep their signs, replace magnitudes.

Works on any dict of named float tensors (LoRA factors, biases, recovery modules): the
"task vector" of each tensor is the tensor itself (initialisation taken as zero), as in
the reference code (prateeky2806/ComPEFT, ``ties_utils.py``).

Our choices, where the reference code is loose:

* Exactly ``round(k·n)`` entries are selected (round half up). The reference keeps
  ``|x| >= kthvalue(n - int(n·k))``: ``int(n·k) + 1`` entries, more on ties (so at least
  one entry, and about one more than ours); we keep ours, the count the density names,
  and say so in ``pack inspect`` (:data:`KEPT_COUNT_RULE`). Ties at the threshold are broken by position:
  the lowest flat index wins, where the flat index runs over the tensors concatenated in
  sorted-name order (``scope="global"``) or over one tensor (``scope="tensor"``).
  A selected entry that is exactly 0 has no sign and stays 0.
* ``scope="global"`` (the paper's code): one top-k and one unbiased std over the
  concatenation of all tensors. ``scope="tensor"``: top-k and std per tensor.
* ``method="compeft"``: magnitude ``alpha · std`` (std of the dense values, unbiased;
  0 for fewer than two values). ``method="stc"`` (sparse ternary compression): magnitude
  = mean |kept values| over the scope, ``alpha`` is ignored.
* ``method="delta-fit"`` (ours, :mod:`.deltafit`): the factors of each LoRA module are
  re-balanced and their ternary patterns scaled so that the packed update keeps all of B·A
  along B·A; ``alpha`` is then a gain on that fit (1 = the fit). Per tensor only.
* Scales are rounded to float32 once, here, so a pack file round-trips exactly.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.options.pack import METHODS, SCOPES  # the names live with the options (re-exported)
from adapterhub_c.packing import deltafit
from adapterhub_c.packing.ternary import TernaryTensor, dtype_name

KEPT_COUNT_RULE = ("round(k·n) entries per top-k group, ties to the lowest index (the ComPEFT reference "
                   "keeps int(k·n)+1 plus ties)")


def check_params(density: float, alpha: float = 1.0, scope: str = "global", method: str = "compeft") -> None:
    """Raise UsageError unless 0 < density <= 1, alpha > 0 and scope/method are known."""
    if isinstance(density, bool) or not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise UsageError(f"density must be in (0, 1], got {density!r}")
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise UsageError(f"alpha must be a positive number, got {alpha!r}")
    if scope not in SCOPES:
        raise UsageError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "delta-fit" and scope != "tensor":
        raise UsageError("method delta-fit fits each module on its own: it needs scope tensor")


def kept_at_density(n: int, *, density: float) -> int:
    """How many of ``n`` entries a top-k keeps at this density: round(density · n), halves up."""
    return min(n, int(math.floor(density * n + 0.5)))


def topk_indices(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest entries; ties go to the lowest index."""
    n = magnitudes.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    kth = np.partition(magnitudes, n - k)[n - k]
    above = np.flatnonzero(magnitudes > kth)
    ties = np.flatnonzero(magnitudes == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


def _flat_arrays(tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], list[np.ndarray]]:
    names = sorted(tensors)
    wide = any(tensors[n].dtype == torch.float64 for n in names)
    arrays = []
    for name in names:
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise UsageError(f"tensor {name!r} is not a floating-point tensor")
        a = t.detach().to("cpu", torch.float64 if wide else torch.float32).reshape(-1).numpy()
        if not np.isfinite(a).all():
            raise UsageError(f"tensor {name!r} has NaN or infinite values")
        arrays.append(a)
    return names, arrays


def _groups(names: list[str], arrays: list[np.ndarray], scope: str):
    """Yield (names, arrays) groups that share one top-k and one magnitude."""
    if scope == "global":
        yield names, arrays
    else:
        for name, a in zip(names, arrays, strict=False):
            yield [name], [a]


def _select(arrays: list[np.ndarray], density: float) -> list[np.ndarray]:
    """Per-array kept indices for a top-k over the concatenation of ``arrays``."""
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    chosen = topk_indices(np.abs(flat), kept_at_density(flat.size, density=density))
    chosen = chosen[flat[chosen] != 0]  # exact zeros have no sign
    bounds = np.cumsum([0] + [a.size for a in arrays])
    cuts = np.searchsorted(chosen, bounds)
    return [chosen[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(arrays))]


def _std(flat: np.ndarray) -> float:
    return float(np.std(flat, dtype=np.float64, ddof=1)) if flat.size >= 2 else 0.0


def compress_tensors(tensors: Mapping[str, torch.Tensor], density: float, *, alpha: float = 1.0,
                     scope: str = "global", method: str = "compeft") -> dict[str, TernaryTensor]:
    """Sparsify and ternarize every tensor; returns one :class:`TernaryTensor` per name.

    ``density`` k in (0, 1] is the kept fraction; see the module docstring for the
    tie rule, the scopes and the methods.
    """
    check_params(density, alpha, scope, method)
    names, arrays = _flat_arrays(tensors)
    if method == "delta-fit":
        return deltafit.fit(dict(zip(names, arrays, strict=True)),
                            {n: tuple(tensors[n].shape) for n in names},
                            {n: dtype_name(tensors[n].dtype) for n in names},
                            alpha, lambda flat: _select([flat], density)[0])
    out: dict[str, TernaryTensor] = {}
    for group_names, group in _groups(names, arrays, scope):
        kept = _select(group, density)
        if method == "compeft":
            mag = alpha * _std(np.concatenate(group) if group else np.zeros(0))
        else:
            vals = np.concatenate([np.abs(a[i]) for a, i in zip(group, kept, strict=False)]) if group else np.zeros(0)
            mag = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
        scale = float(np.float32(mag))
        for name, a, idx in zip(group_names, group, kept, strict=False):
            t = tensors[name]
            out[name] = TernaryTensor(idx, a[idx] < 0, scale, tuple(t.shape), dtype_name(t.dtype))
    return out


def prune_tensors(tensors: Mapping[str, torch.Tensor], density: float, *,
                  scope: str = "global") -> dict[str, torch.Tensor]:
    """Pruned-only baseline: the same top-k selection, kept entries keep their values."""
    check_params(density, 1.0, scope, "compeft")
    names, arrays = _flat_arrays(tensors)
    out = {}
    for group_names, group in _groups(names, arrays, scope):
        for name, idx in zip(group_names, _select(group, density), strict=False):
            src = tensors[name].detach().cpu()
            flat = torch.zeros(src.numel(), dtype=src.dtype)
            ix = torch.from_numpy(idx)
            flat[ix] = src.reshape(-1)[ix]
            out[name] = flat.reshape(src.shape)
    return out


def decode_tensors(ternaries: Mapping[str, TernaryTensor]) -> dict[str, torch.Tensor]:
    """Dense tensors ``scale · T`` at each tensor's original dtype and shape."""
    return {name: t.to_dense() for name, t in ternaries.items()}
