"""The one call that merges LoRA adapters: checks, dispatch by space, output adapter + config."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.merging.batching import DEFAULT_CHUNK_BYTES
from adapterhub_c.merging.delta import Progress, merge_delta
from adapterhub_c.merging.factors import merge_factors
from adapterhub_c.merging.inputs import (
    check_inputs,
    compute_dtype,
    full_tensor_average,
    input_device,
    input_names,
    module_inputs,
    output_base_config,
    output_dtype,
)
from adapterhub_c.merging.spec import MergeInputRef, MergeSpec, make_spec, merge_config_yaml


@dataclass
class MergeResult:
    """The merged adapter, the spec it was made with and its replayable YAML config."""

    adapter: LoraAdapter
    spec: MergeSpec
    config_yaml: str
    seconds: float = 0.0
    modules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. modules_to_save tensors averaged


def merge_adapters(adapters: Sequence[LoraAdapter], method: str = "task-arithmetic", *,  # noqa: PLR0913 - the library's merge entry point: a keyword per merge option, checked into one MergeSpec
                   weights: Sequence[float] | None = None, space: str = "delta", rank: int | None = None,
                   density: float | None = None, majority: str = "total", convention: str = "peft",
                   seed: int = 0, svd: str = "randomized", rescale: str | None = None,
                   names: Sequence[str] | None = None,
                   digests: Sequence[str | None] | None = None, progress: Progress | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, elections: dict | None = None) -> MergeResult:
    """Merge N LoRA adapters of one base into one LoRA adapter.

    method: ``task-arithmetic`` | ``ties`` | ``dare-linear`` | ``dare-ties``;
    weights: one per adapter (default 1.0 each); space: ``delta`` (true ΔW, default) or
    ``factors`` (A and B separately, PEFT convention, equal ranks); rank: output rank
    (default Σ r_i for task arithmetic in delta space, else the largest input rank);
    density: fraction kept by TIES/DARE, in (0, 1]; majority: ``total`` | ``frequency``;
    convention: ``peft`` | ``mergekit`` (see :mod:`adapterhub_c.merging.spec`); seed: DARE;
    svd: ``randomized`` | ``exact``, how delta-space results are truncated to ``rank``
    (see :mod:`adapterhub_c.merging.lowrank`); rescale: DARE's ``l1`` | ``inverse-p``
    (default by convention, see :mod:`adapterhub_c.merging.spec`).
    names/digests: how the inputs are named in the YAML config. Runs on the device of
    the inputs, in float32 (float64 if an input is), and stores the result in the
    first input's dtype. Modules adapted by only some inputs count as ΔW = 0 elsewhere.
    ``elections``: pre-elected TIES signs per module (factors space only; see
    :func:`adapterhub_c.workflows.merges.popcount_elections`). Raises UsageError on bad input.
    """
    started = time.perf_counter()
    adapters = list(adapters)
    names = input_names(adapters, names)
    spec = make_spec(len(adapters), method=method, weights=weights, space=space, rank=rank,
                     density=density, majority=majority, convention=convention, seed=seed, svd=svd,
                     rescale=rescale)
    check_inputs(adapters, names)
    modules = module_inputs(adapters, names)
    device, dtype, out_dtype = input_device(adapters), compute_dtype(adapters), output_dtype(adapters)
    if elections is not None and spec.space != "factors":
        raise UsageError("pre-elected signs apply to space=factors only")
    if spec.space == "delta":
        layers = merge_delta(modules, spec, device, dtype, out_dtype, progress, chunk_bytes)
    else:
        layers = merge_factors(modules, spec, names, device, dtype, out_dtype, progress, chunk_bytes, elections)
    adapter = LoraAdapter.from_layers(layers, output_base_config(adapters))
    full, merge_warnings = full_tensor_average(adapters, spec.weights)
    if full:
        adapter.tensors.update(full)
        adapter.config["modules_to_save"] = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    if digests is None:
        digests = [None] * len(adapters)
    refs = [MergeInputRef(name=n, digest=d) for n, d in zip(names, digests, strict=False)]
    return MergeResult(adapter=adapter, spec=spec, config_yaml=merge_config_yaml(spec, refs),
                       seconds=time.perf_counter() - started, modules=[m.name for m in modules],
                       warnings=merge_warnings)
