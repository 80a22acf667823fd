"""Activation statistics from calibration data, collected with forward hooks.

For every hooked linear layer we accumulate, per input feature j, the sum over all
calibration tokens of x_j**2; the Wanda score uses sqrt of it, ||X_j||_2.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.metrics import token_stream
from adapterhub_c.models.arch import features


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def normalise_calibration(calib_input_ids: Sequence[torch.Tensor] | torch.Tensor | None) -> list[torch.Tensor]:
    """Turn the caller's input_ids (a [N, T] tensor or a list of [T] / [1, T] tensors) into [1, T] rows."""
    if calib_input_ids is None:
        return []
    if isinstance(calib_input_ids, torch.Tensor):
        if calib_input_ids.dim() == 1:
            calib_input_ids = calib_input_ids.unsqueeze(0)
        rows = list(calib_input_ids.unbind(0))
    else:
        rows = list(calib_input_ids)
    out = []
    for row in rows:
        if not isinstance(row, torch.Tensor) or row.dtype not in (torch.int64, torch.int32):
            raise UsageError("calibration data must be integer input_ids tensors")
        row = row.reshape(1, -1).long()
        if row.shape[1] == 0:
            raise UsageError("calibration data contains an empty sequence")
        out.append(row)
    return out


def calibration_rows(tokenizer, data: str, samples: int, seq_len: int) -> list[torch.Tensor]:
    """Calibration input_ids: the train split of ``data`` as one token stream (texts joined
    by EOS) cut into at most ``samples`` consecutive rows of ``seq_len`` tokens."""
    if samples < 1 or seq_len < 1:
        raise UsageError(f"calibration needs samples >= 1 and seq_len >= 1 (got {samples}, {seq_len})")
    dataset = load_dataset(data, "train")
    ids = token_stream(tokenizer, dataset.as_texts(), max_tokens=samples * seq_len)
    rows = ids.numel() // seq_len
    if rows == 0:
        raise UsageError(f"calibration data {data!r} has fewer than {seq_len} tokens")
    return list(ids[: rows * seq_len].view(rows, seq_len).unbind(0))


def length_batches(rows: list[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    """The rows ([1, length] token ids) concatenated into batches of up to ``batch_size`` rows of
    one length (shortest first): no padding, so every token is a real one."""
    by_len: dict[int, list[torch.Tensor]] = defaultdict(list)
    for row in rows:
        by_len[row.shape[1]].append(row)
    for length in sorted(by_len):
        group = by_len[length]
        for i in range(0, len(group), batch_size):
            yield torch.cat(group[i : i + batch_size], dim=0)


@torch.no_grad()
def input_sq_norms(
    model: nn.Module,
    rows: list[torch.Tensor],
    modules: dict[str, nn.Module],
    stop_after: nn.Module | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of x_j**2 for the input of each named linear (float32).

    `stop_after`: a module after whose forward the pass is cut short (a decoder block),
    so stats for block i cost only the forward up to block i.
    """
    if not rows:
        raise UsageError("calibration data is empty")
    device = next(model.parameters()).device
    sums = {name: torch.zeros(features(mod)[0], dtype=torch.float32, device=device) for name, mod in modules.items()}

    def make_hook(name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(dim=0)

        return hook

    def stop(_mod, _args, _out):
        raise _StopForward

    handles = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in modules.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        _forward_batches(model, rows, batch_size, device)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _forward_batches(model: nn.Module, rows: list[torch.Tensor], batch_size: int, device) -> None:
    """Run ``rows`` through ``model`` in length-grouped batches; a hook may stop each forward early."""
    for batch in length_batches(rows, batch_size):
        try:
            model(input_ids=batch.to(device), use_cache=False)
        except _StopForward:
            pass


class BlockwiseCalibrator:
    """Runs calibration data through the decoder blocks one at a time, as the Wanda code does.

    The inputs of block 0 (hidden states and the keyword arguments the model passes, such
    as rotary position embeddings) are captured once; `stats(i, …)` runs block i alone on
    the cached inputs, `advance(i)` replaces them by block i's (pruned) outputs. The whole
    pruning costs about two forward passes instead of one per block.
    """

    def __init__(self, model: nn.Module, rows: list[torch.Tensor], blocks: list[nn.Module], batch_size: int = 8):
        if not rows:
            raise UsageError("calibration data is empty")
        self.blocks = blocks
        self.inputs: list[tuple[torch.Tensor, dict]] = []
        device = next(model.parameters()).device

        def capture(_mod, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.inputs.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}
                                | {"_extra_args": args[1:]}))
            raise _StopForward

        handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                _forward_batches(model, rows, batch_size, device)
        finally:
            handle.remove()

    def _run(self, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        kwargs = dict(kwargs)
        extra = kwargs.pop("_extra_args", ())
        out = self.blocks[i](hidden, *extra, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def stats(self, i: int, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Sum over tokens of x_j**2 at the input of each named linear inside block i."""
        sums = {name: torch.zeros(features(m)[0], dtype=torch.float32, device=m.weight.device)
                for name, m in modules.items()}

        def add(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            sums[name] += (x * x).sum(dim=0)

        self.observe(i, modules, add)
        return sums

    @torch.no_grad()
    def observe(self, i: int, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Run block i on the cached inputs, calling ``fn(name, x)`` with the input x ([batch, tokens, in])
        of each named linear inside it (GPTQ / SparseGPT accumulate their Hessians so)."""

        def make_hook(name: str):
            def hook(_mod, args):
                fn(name, args[0].detach())

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
        try:
            for hidden, kwargs in self.inputs:
                self._run(i, hidden, kwargs)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Replace the cached inputs by block i's outputs (call after pruning block i)."""
        self.inputs = [(self._run(i, hidden, kwargs).detach(), kwargs) for hidden, kwargs in self.inputs]
