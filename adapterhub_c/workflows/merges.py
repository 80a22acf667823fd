"""Registry operations: merge and compose registered adapter artefacts (``adapt merge`` / ``compose``).

Inputs are any adapter artefacts (``lora``, ``recovered-lora`` without recovery modules,
``merged``, ``composed``, ``pack``). Packs are read once and decoded once, on the merge
device (the bitmask decode kernel on CUDA, its twin on CPU), and their bit planes are
kept for the popcount sign election.

Popcount sign election (TIES over packs). A ComPEFT pack stores every factor tensor as
``c · T`` (T ternary, one magnitude c per tensor: per input with ``scope=global``, per
tensor with ``scope=tensor``). In factor space, TIES on such tensors is:

- trim: a no-op, as long as ``int(density·numel) >= 1`` for every factor matrix (every
  non-zero has the same magnitude, so the k-th largest is c or 0 and ``|x| >= kth``
  keeps all non-zeros); under the mergekit convention, which keeps exactly k entries at
  a tie, also as long as k is at least every input's non-zero count;
- elect: the vote of input i at an entry is ``v_i · T_i`` (``v_i = c_i`` under the peft
  convention, ``c_i·w_i`` under mergekit's). With ``majority=frequency`` the dense vote
  is the integer Σ sign(v_i)·T_i: exactly what ``kernels.elect_signs`` counts on the bit
  planes. With ``majority=total`` the same count gives the same sign when every voting
  input has the same |v_i| and at most 5 inputs vote: then the float partial sums of the
  dense path are ±c, ±2c, 0 wherever the exact sum is 0, all exact, and a non-zero sum
  cannot change sign by rounding (6 voters could reach a rounded ±3c before coming back).

Where these hold (and the inputs are all packs, method ``ties``, space ``factors``),
the vote runs on the bit planes and the disjoint mean is the dense path's own code, so
the merged tensors are bit-identical (tests/test_merge_ops.py checks it). Elsewhere
(delta space: B·A is not ternary; DARE-TIES: random drops; unequal magnitudes with
``total``) the dense vote runs, and the report says why.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from adapterhub_c.adapters.lora import PREFIX, WEIGHTS_NAME, LoraAdapter, check_lora_config
from adapterhub_c.errors import AdaptWarning, NotFoundError, UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.metrics import encode_completions
from adapterhub_c.kernels import bitmask_decode, elect_signs, planes_to_torch, unpack_bits
from adapterhub_c.merging.api import merge_adapters
from adapterhub_c.merging.compose import check_compose_options, compose_adapters
from adapterhub_c.merging.factors import check_equal_ranks, factor_weights
from adapterhub_c.merging.inputs import check_inputs, compute_dtype, dora_as_lora, input_names, module_inputs
from adapterhub_c.merging.spec import (
    MergeInputRef,
    MergeSpec,
    make_spec,
    merge_config_yaml,
    parse_merge_config,
    spec_dict,
)
from adapterhub_c.models.device import resolve_device
from adapterhub_c.options.merge import DEFAULT_SHOTS, ELECTIONS, ComposeOptions, MergeOptions, check_choice, check_shots
from adapterhub_c.packing.encoding import encode
from adapterhub_c.packing.format import Pack
from adapterhub_c.packing.ternary import dtype_from_name
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import already_done_report, check_new_name, earlier_result, register_artifact
from adapterhub_c.registry.kinds import ADAPTER_KINDS, PACK_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.runtime.bases import linear_weights, load_base_tokenizer
from adapterhub_c.runtime.packs import PACK_FILE, read_pack_artifact
from adapterhub_c.runtime.stack import StackSpec, load_stack

MERGE_CONFIG_FILE = "merge_config.yaml"
COMPOSE_CONFIG_FILE = "compose_config.json"
MAX_TOTAL_VOTERS = 5


@dataclass
class PackPlanes:
    """One packed factor tensor as bit planes on the merge device."""

    pos: torch.Tensor     # int32 words, bit set where T = +1
    neg: torch.Tensor     # int32 words, bit set where T = -1
    numel: int
    shape: tuple[int, ...]
    scale: float
    dtype: torch.dtype    # dtype of the decoded tensor (the source adapter's)
    nnz: int              # non-zero entries


@dataclass
class MergeInput:
    """A resolved input: its row, its LoRA on the device, and for packs the bit planes."""

    art: Artifact
    adapter: LoraAdapter
    digest: str | None
    planes: dict[str, PackPlanes] | None = None
    seconds: float = 0.0
    dora_rank: int | None = None  # a DoRA input, turned into its weight-space ΔW: its largest rank


@dataclass
class Election:
    """How TIES signs were elected: ``popcount`` (bit planes) or ``dense``, and why."""

    method: str
    reason: str
    signs: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    seconds: float = 0.0


# ---- resolving and loading inputs ---------------------------------------------------------
def resolve_inputs(reg: Registry, refs: Sequence[str], *, at_least: int = 2) -> tuple[list[Artifact], BaseModel,
                                                                                     Variant | None]:
    """Artefact rows for ``refs`` (adapters of one base); the base; the shared variant or None."""
    refs = list(refs)
    if len(refs) < at_least:
        raise UsageError(f"give at least {at_least} adapters (got {len(refs)})")
    with reg.session() as s:
        arts = [reg.resolve(s, ref, "artifact") for ref in refs]
        for art in arts:
            if art.kind not in ADAPTER_KINDS:
                raise UsageError(f"{art.name!r} is a {art.kind}, not an adapter")
        bases = {art.base_id for art in arts}
        if len(bases) > 1:
            other = next(a for a in arts if a.base_id != arts[0].base_id)
            b0, b1 = s.get(BaseModel, arts[0].base_id), s.get(BaseModel, other.base_id)
            raise UsageError(f"adapters are for different bases: {arts[0].name!r} is for {b0.name!r}, "
                             f"{other.name!r} is for {b1.name!r}")
        base = s.get(BaseModel, arts[0].base_id)
        variants = {art.variant_id for art in arts}
        variant = s.get(Variant, arts[0].variant_id) if len(variants) == 1 and arts[0].variant_id else None
        return arts, base, variant


def _planes_of(tensor, encoded, device) -> tuple[torch.Tensor, torch.Tensor]:
    data = encoded.data if encoded.encoding == "bitmask" else \
        encode(tensor.indices, tensor.negative, tensor.numel, "bitmask").data
    return planes_to_torch(data["pos"], data["neg"], device)


def load_pack_input(pack: Pack, device: torch.device, label: str) -> tuple[LoraAdapter, dict[str, PackPlanes]]:
    """Decode every tensor of a read (and verified) pack on ``device`` from its bit planes.

    The decoded values are ``float32(T)·float32(scale)`` rounded once to the source dtype,
    exactly what :func:`adapterhub_c.pack.format.unpack_to_adapter` gives. ``label`` names
    the pack in messages.
    """
    if pack.has_recovery:
        raise UsageError(f"{label}: the pack carries recovery modules, which are non-linear and "
                         f"cannot be merged or composed")
    config = dict(pack.adapter_config)
    check_lora_config(config, label)
    tensors, planes = {}, {}
    for name, t in pack.tensors.items():
        dtype = dtype_from_name(t.dtype)
        pos, neg = _planes_of(t, pack.encoded[name], device)
        if dtype == torch.float64:
            dense = t.to_dense().to(device)
        else:
            dense = bitmask_decode(pos, neg, t.numel, t.scale, dtype).reshape(t.shape)
        tensors[name] = dense
        planes[name] = PackPlanes(pos, neg, t.numel, tuple(t.shape), float(t.scale), dtype, t.nnz)
    tensors.update({k: v.to(device) for k, v in pack.raw.items()})
    return LoraAdapter(config=config, tensors=tensors), planes


def load_inputs(reg: Registry, arts: Sequence[Artifact], device: torch.device,
                progress: Progress | None = None) -> list[MergeInput]:
    """Every input once, on ``device``; an artefact named twice is read once."""
    cache: dict[str, MergeInput] = {}
    out = []
    for i, art in enumerate(arts):
        if art.id not in cache:
            t0 = time.perf_counter()
            if art.kind in PACK_KINDS:
                adapter, planes = load_pack_input(read_pack_artifact(reg, art), device, f"pack {art.name!r}")
                digest = art.files.get(PACK_FILE)
            else:
                loaded = load_adapter_artifact(reg, art)
                if loaded.recovery_state is not None:
                    raise UsageError(f"{art.name!r} has recovery modules, which are non-linear and cannot be "
                                     f"merged or composed")
                adapter = LoraAdapter(loaded.lora.config, {k: v.to(device) for k, v in loaded.lora.tensors.items()})
                planes, digest = None, art.files.get(WEIGHTS_NAME)
            cache[art.id] = MergeInput(art, adapter, digest, planes, time.perf_counter() - t0)
        out.append(cache[art.id])
        if progress:
            progress("reading inputs", i + 1, len(arts))
    for x in cache.values():
        if x.adapter.is_dora:
            _dora_to_weight_space(reg, x, device)
    return out


def _dora_to_weight_space(reg: Registry, x: MergeInput, device: torch.device) -> None:
    """Replace a DoRA input by the exact LoRA of its weight-space ΔW (the base's or variant's W)."""
    with reg.session() as s:
        base = s.get(BaseModel, x.art.base_id)
        variant = s.get(Variant, x.art.variant_id) if x.art.variant_id else None
    weights = linear_weights(reg, base, variant, x.adapter.modules())
    x.dora_rank = max(layer.rank for layer in x.adapter.layers().values())
    x.adapter = dora_as_lora(x.adapter, {k: v.to(device) for k, v in weights.items()})
    x.planes = None  # bit planes of A and B say nothing about ΔW in weight space


def _dora_rank(inputs: Sequence[MergeInput], spec: MergeSpec) -> tuple[MergeSpec, list[str]]:
    """With DoRA inputs and no --rank: the output rank the inputs' own ranks give, and a warning."""
    if not any(x.dora_rank for x in inputs):
        return spec, []
    if spec.space == "factors":
        raise UsageError("a DoRA adapter's update lives in weight space (it depends on W): merge it with "
                         "space=delta, not space=factors")
    ranks = [x.dora_rank or max(layer.rank for layer in x.adapter.layers().values()) for x in inputs]
    if spec.rank is None:
        rank = sum(ranks) if spec.method == "task-arithmetic" else max(ranks)
        spec = dataclasses.replace(spec, rank=rank)
    note = (f"DoRA inputs merged in weight space (ΔW = m·(W+sBA)/‖W+sBA‖_c − W on the base weights), "
            f"result truncated to rank {spec.rank}: not exact, and a plain LoRA")
    return spec, [note]


# ---- popcount sign election ----------------------------------------------------------------
class _NotExact(Exception):
    """The popcount vote would differ from the dense one here (the message says why)."""


def _dense_only_reason(inputs: Sequence[MergeInput], spec: MergeSpec) -> str | None:
    """Why these inputs and this spec cannot be elected on bit planes at all (None: they may)."""
    if spec.method != "ties":
        return (f"{spec.method} is not TIES" if not spec.uses_sign_election
                else "dare-ties drops entries at random before the vote")
    if spec.space != "factors":
        return "in delta space ΔW = B·A is not ternary"
    if any(x.dora_rank for x in inputs):
        return "DoRA inputs merge in weight space, not on A/B sign planes"
    if any(x.planes is None for x in inputs):
        return "not every input is a pack"
    return None


def _voters(planes: list, weights: list[float], spec: MergeSpec, dtype: torch.dtype) -> tuple[list, list, list]:
    """(positive planes, negative planes, voter magnitudes) of one factor, as the dense vote weighs them."""
    pos, neg, mags = [], [], []
    for p, wi in zip(planes, weights, strict=False):
        if p is None:
            continue
        # the voter magnitude exactly as the dense path computes it
        value = torch.tensor(p.scale, dtype=torch.float32).to(p.dtype).to(dtype)
        voter = value if spec.convention == "peft" else value * torch.tensor(wi, dtype=dtype)
        if voter.item() == 0:
            continue
        mags.append(abs(voter.item()))
        flip = spec.convention == "mergekit" and wi < 0
        pos.append(p.neg if flip else p.pos)
        neg.append(p.pos if flip else p.neg)
    return pos, neg, mags


def _check_exact(spec: MergeSpec, key: str, planes: list, numel: int, mags: list[float]) -> None:
    """``_NotExact`` where the trim or the majority rule would make the bit-plane vote differ."""
    if spec.density is not None and int(spec.density * numel) < 1:
        raise _NotExact(f"density {spec.density} keeps no entry of {key}")
    if spec.convention == "mergekit" and any(p is not None and p.nnz > int(spec.density * numel) for p in planes):
        # every non-zero is tied at c, and mergekit's trim keeps only k of them
        raise _NotExact(f"density {spec.density} keeps fewer entries of {key} than a pack holds, and the "
                        "mergekit trim cuts ties")
    if spec.majority == "total":
        if len(set(mags)) > 1:
            raise _NotExact(f"majority=total with unequal input magnitudes at {key} "
                            "(use majority=frequency, or packs with equal scales)")
        if len(mags) > MAX_TOTAL_VOTERS:
            raise _NotExact(f"majority=total with more than {MAX_TOTAL_VOTERS} voters")


def _factor_sign(spec: MergeSpec, key: str, planes: list, weights: list[float], dtype: torch.dtype,
                 device: torch.device, impl: str) -> torch.Tensor:
    """The elected sign tensor of one factor from its inputs' bit planes (``_NotExact`` where it would differ)."""
    shape = next(p.shape for p in planes if p is not None)
    numel = int(np.prod(shape))
    pos, neg, mags = _voters(planes, weights, spec, dtype)
    _check_exact(spec, key, planes, numel, mags)
    if not pos:
        return torch.ones(shape, dtype=dtype, device=device)
    _, e_neg = elect_signs(torch.stack(pos), torch.stack(neg), numel, impl=impl)
    # a tie (count 0) elects nothing in the kernel and + in the dense rule
    return (1 - 2 * unpack_bits(e_neg, numel)).to(dtype).reshape(shape)


def popcount_elections(inputs: Sequence[MergeInput], spec: MergeSpec, names: Sequence[str] | None = None,
                       *, impl: str = "auto") -> Election:
    """Elect TIES signs on the packs' bit planes where that equals the dense vote exactly.

    Returns ``Election("popcount", …, signs={module: (sign_A, sign_B)})`` or
    ``Election("dense", reason)`` when any condition of the module docstring fails.
    """
    t0 = time.perf_counter()
    if (reason := _dense_only_reason(inputs, spec)) is not None:
        return Election("dense", reason)
    adapters = [x.adapter for x in inputs]
    names = input_names(adapters, names)
    check_inputs(adapters, names)
    modules = module_inputs(adapters, names)
    dtype = compute_dtype(adapters)
    device = next(iter(inputs[0].planes.values())).pos.device
    signs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for m in modules:
            w_A, w_B = factor_weights(spec.weights, [m], dtype, device)
            pair = []
            for factor, w in (("A", w_A[:, 0]), ("B", w_B[:, 0])):
                key = f"{PREFIX}{m.name}.lora_{factor}.weight"
                planes = [x.planes.get(key) if layer is not None else None
                          for x, layer in zip(inputs, m.layers, strict=False)]
                pair.append(_factor_sign(spec, key, planes, w.tolist(), dtype, device, impl))
            signs[m.name] = (pair[0], pair[1])
    except _NotExact as e:
        return Election("dense", str(e))
    return Election("popcount", f"factor-space TIES on packs, majority={spec.majority}", signs,
                    time.perf_counter() - t0)


# ---- merge -----------------------------------------------------------------------------------
def _default_merge_stem(method: str, arts: Sequence[Artifact]) -> str:
    stem = f"merge-{method}-" + "+".join(dict.fromkeys(a.name for a in arts))
    return stem[:120]


def _yaml_refs(inputs: Sequence[MergeInput]) -> list[MergeInputRef]:
    return [MergeInputRef(name=x.art.name, digest=x.digest, extra={"kind": x.art.kind, "id": x.art.id})
            for x in inputs]


def run_merge(inputs: Sequence[MergeInput], spec: MergeSpec, *, election: str = "auto",
              progress: Progress | None = None):
    """Merge loaded inputs by ``spec`` (popcount election where exact); (MergeResult, Election)."""
    check_choice("election", election, ELECTIONS)
    el = Election("dense", "asked for") if election == "dense" else popcount_elections(inputs, spec)
    if election == "popcount" and el.method != "popcount":
        raise UsageError(f"the popcount election is not exact here: {el.reason}")
    refs = _yaml_refs(inputs)
    result = merge_adapters([x.adapter for x in inputs], spec.method, weights=spec.weights, space=spec.space,
                            rank=spec.rank, density=spec.density, majority=spec.majority,
                            convention=spec.convention, seed=spec.seed, svd=spec.svd, rescale=spec.rescale,
                            names=[r.name for r in refs],
                            digests=[r.digest for r in refs], progress=progress, elections=el.signs)
    result.config_yaml = merge_config_yaml(result.spec, refs)
    return result, el


@dataclass
class MergePlan:
    """A merge ready to run: its inputs loaded on the device, its spec, its canonical options."""

    arts: list[Artifact]
    base: BaseModel
    variant: Variant | None
    inputs: list[MergeInput]
    spec: MergeSpec
    options: MergeOptions   # weights, rescale, rank and device as the merge uses them (the run's parameters)
    device: torch.device
    read_s: float
    warnings: list[str]


def _plan_merge(reg: Registry, arts: list[Artifact], base: BaseModel, variant: Variant | None,
                spec: MergeSpec, opts: MergeOptions, progress: Progress | None) -> MergePlan:
    """Load the inputs and run every check that needs their tensors (ranks, shapes, configs)."""
    dev = resolve_device(opts.device)
    t0 = time.perf_counter()
    inputs = load_inputs(reg, arts, dev, progress)
    spec, notes = _dora_rank(inputs, spec)
    read_s = time.perf_counter() - t0
    adapters = [x.adapter for x in inputs]
    names = [a.name for a in arts]
    check_inputs(adapters, names)
    modules = module_inputs(adapters, names)
    if spec.space == "factors":
        r = check_equal_ranks(modules, names)
        if spec.rank is not None and spec.rank != r:
            raise UsageError(f"space=factors keeps the input rank {r}; rank={spec.rank} needs space=delta")
    canonical = opts.replace(weights=spec.weights, rescale=spec.rescale, rank=spec.rank, device=str(dev))
    return MergePlan(arts, base, variant, inputs, spec, canonical, dev, read_s, notes)


def merge_artifacts(reg: Registry, refs: Sequence[str], options: MergeOptions | None = None, *,
                    name: str | None = None, progress: Progress | None = None,
                    **fields: Any) -> tuple[Artifact, dict]:
    """Merge registered adapters into a new ``merged`` artefact; returns (artefact, report).

    ``refs``: two or more adapter artefacts of one base (LoRAs, converted LoRAs without
    recovery, packs, merges, compositions). ``options``: a ``MergeOptions`` (``fields`` set
    single fields of it by the same names: ``method="ties"``, ``density=0.5``, ``weights``
    as a list or ``"1,0.5"``, …; see :func:`adapterhub_c.merging.merge_adapters`). The
    artefact is a PEFT folder plus ``merge_config.yaml`` (replay it with
    :func:`replay_merge_artifact`), lineage ``merge-input`` to every input; its variant is
    the inputs' if they all share one. ``election``: ``auto`` (popcount where exact),
    ``popcount`` (UsageError where not exact), ``dense``. UsageError on bad input, before
    anything is registered.
    """
    opts = MergeOptions.of(options, fields)
    arts, base, variant = resolve_inputs(reg, refs)
    spec = make_spec(len(arts), **opts.spec_fields())
    check_new_name(reg, name, command="merge")
    return _merge_and_register(reg, _plan_merge(reg, arts, base, variant, spec, opts, progress), name, progress)


def _merge_and_register(reg: Registry, plan: MergePlan, name: str | None,
                        progress: Progress | None) -> tuple[Artifact, dict]:
    """The run of ``adapt merge`` (and of its replay): idempotent by name, one run row, one artefact."""
    params = dict(inputs=[a.name for a in plan.arts], name=name, **plan.options.params())
    if (earlier := earlier_result(reg, name, "merge", params, ignore=MergeOptions.unkeyed())) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "merge", params) as run:
        result, el = run_merge(plan.inputs, plan.spec, election=plan.options.election, progress=progress)
        notes = plan.warnings + result.warnings
        inputs_info = [{"name": x.art.name, "id": x.art.id, "kind": x.art.kind, "weight": w}
                       for x, w in zip(plan.inputs, plan.spec.weights, strict=False)]
        config = {"merge": spec_dict(plan.spec), "inputs": inputs_info, "config_file": MERGE_CONFIG_FILE,
                  "election": {"method": el.method, "reason": el.reason}}
        ranks = sorted({layer.rank for layer in result.adapter.layers().values()})
        metrics = {"merge_seconds": result.seconds, "read_seconds": plan.read_s, "election_seconds": el.seconds,
                   "modules": len(result.modules), "ranks": ranks, "parameters": result.adapter.num_parameters()}
        art = _register_merged(reg, plan, result, name, config, metrics, run.id)
        report = _merge_report(plan, art, el, inputs_info, metrics, result.seconds, run.id, notes)
        for message in notes:
            warnings.warn(message, AdaptWarning, stacklevel=3)
        run.output = report
        return art, report


def _register_merged(reg: Registry, plan: MergePlan, result, name: str | None, config: dict, metrics: dict,
                     run_id: str) -> Artifact:
    """Write the merged PEFT folder (+ ``merge_config.yaml``) and register it with its lineage."""
    with reg.staging("merge") as tmp:
        folder = Path(tmp) / "merged"
        cpu = LoraAdapter(result.adapter.config, {k: v.detach().cpu() for k, v in result.adapter.tensors.items()})
        cpu.to_folder(folder, extra_files={MERGE_CONFIG_FILE: result.config_yaml.encode()})
        parents = [(a, "merge-input") for a in {a.id: a for a in plan.arts}.values()]
        return register_artifact(reg, kind="merged", name=name,
                                 stem=None if name else _default_merge_stem(plan.spec.method, plan.arts),
                                 base_id=plan.base.id, folder=folder,
                                 variant_id=plan.variant.id if plan.variant else None,
                                 source=f"merge:{plan.spec.method}", config=config, metrics=metrics,
                                 parents=parents, run_id=run_id)


def _merge_report(plan: MergePlan, art: Artifact, el: Election, inputs_info: list[dict], metrics: dict,
                  merge_s: float, run_id: str, notes: list[str]) -> dict:
    """What ``adapt merge --json`` prints (and the run's output)."""
    spec = plan.spec
    return {"artifact": art.name, "id": art.id, "kind": art.kind, "base": plan.base.name,
            "variant": plan.variant.name if plan.variant else None, "method": spec.method, "space": spec.space,
            "svd": spec.svd if spec.space == "delta" else None,
            "inputs": inputs_info, "density": spec.density,
            "majority": spec.majority if spec.uses_sign_election else None,
            "convention": spec.convention if spec.uses_sign_election else None,
            "rescale": spec.rescale, "election": el.method, "election_reason": el.reason, "ranks": metrics["ranks"],
            "parameters": metrics["parameters"], "size_bytes": art.size_bytes, "device": str(plan.device),
            "read_seconds": plan.read_s, "merge_seconds": merge_s, "run_id": run_id, "warnings": notes}


# ---- replay ----------------------------------------------------------------------------------
def _input_digest(art: Artifact) -> str | None:
    """The digest a merge config records for an input: its pack file, else its LoRA weights."""
    return (art.files or {}).get(PACK_FILE if art.kind in PACK_KINDS else WEIGHTS_NAME)


def _replay_inputs(reg: Registry, refs: Sequence[MergeInputRef], verify_digests: bool = True) -> list[Artifact]:
    """The recorded inputs, by their recorded id, else by name; a changed one is a UsageError."""
    arts = []
    with reg.session() as s:
        for r in refs:
            rid = r.extra.get("id")
            try:
                art = reg.resolve(s, str(rid), "artifact") if rid else None
            except NotFoundError:
                art = None
            arts.append(art or reg.resolve(s, r.name, "artifact"))
    for r, art in zip(refs, arts, strict=True):
        digest = _input_digest(art)
        if verify_digests and r.digest and digest != r.digest:
            raise UsageError(f"input {r.name!r} has changed since the merge (digest {digest} != {r.digest}); "
                             f"it cannot be replayed")
    return arts


def _read_config(config: str | Path) -> str:
    """The YAML text of a merge config given as a file or as its text (text has a newline)."""
    if isinstance(config, Path) or "\n" not in str(config):
        path = Path(config)
        if not path.is_file():
            raise UsageError(f"merge config {str(config)!r} not found")
        return path.read_text(encoding="utf-8")
    return str(config)


def replay_merge_artifact(reg: Registry, config: str | Path, *, name: str | None = None,
                          device: str | None = None, progress: Progress | None = None) -> tuple[Artifact, dict]:
    """Re-run the merge a ``merge_config.yaml`` records and register the result, as ``adapt merge`` does.

    ``config``: the file or its text. The inputs are found by their recorded id, else by
    name; an input whose weights differ from the recorded digest is refused (UsageError).
    The run is an ``adapt merge`` run with the recorded options (idempotent by ``name``:
    a replay into the name the original merge took returns it); returns (artefact, report).
    """
    spec, refs = parse_merge_config(_read_config(config))
    arts = _replay_inputs(reg, refs)
    arts, base, variant = resolve_inputs(reg, [a.id for a in arts])
    opts = MergeOptions(method=spec.method, weights=spec.weights, density=spec.density, majority=spec.majority,
                        convention=spec.convention, rescale=spec.rescale, space=spec.space, rank=spec.rank,
                        seed=spec.seed, svd=spec.svd, device=device or "auto")
    check_new_name(reg, name, command="merge")
    return _merge_and_register(reg, _plan_merge(reg, arts, base, variant, spec, opts, progress), name, progress)


def replay_merge(reg: Registry, config_text: str, *, device: str | None = None, verify_digests: bool = True):
    """Re-run a merge from its ``merge_config.yaml`` text without registering it; returns the MergeResult.

    Inputs are looked up by the recorded id (else name); with ``verify_digests`` a
    recorded digest that differs from the input's current weights is a UsageError.
    """
    spec, refs = parse_merge_config(config_text)
    arts = _replay_inputs(reg, refs, verify_digests)
    result, _ = run_merge(load_inputs(reg, arts, resolve_device(device)), spec)
    return result


# ---- compose ---------------------------------------------------------------------------------
def load_examples(examples: str, shots: int | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a .jsonl file or ``builtin:task/<name>`` (its train split).

    ``shots`` keeps the first N (default: all of a file, 5 of a built-in task).
    UsageError when nothing usable is left.
    """
    check_shots(shots)
    if examples.startswith("builtin:"):
        if not examples.startswith("builtin:task/"):
            raise UsageError(f"{examples}: composition needs prompt/completion examples (builtin:task/<name>)")
        pairs = load_dataset(examples, "train").pairs[: shots or DEFAULT_SHOTS]
    else:
        path = Path(examples)
        if path.suffix != ".jsonl":
            raise UsageError(f"{examples}: examples must be a .jsonl file of prompt/completion lines")
        if not path.is_file():
            raise UsageError(f"examples file {examples!r} not found")
        if not path.read_text(encoding="utf-8").strip():
            raise UsageError(f"examples file {examples!r} has no usable example")
        ds = load_dataset(examples, "train")
        if not ds.pairs:
            raise UsageError(f"{examples}: no prompt/completion example (lines need 'prompt' and 'completion')")
        pairs = ds.pairs[:shots] if shots else ds.pairs
    if not pairs:
        raise UsageError(f"{examples}: no usable example")
    return pairs


@dataclass
class ComposePlan:
    """A composition ready to search: its inputs on the device, its examples, its canonical options."""

    arts: list[Artifact]
    base: BaseModel
    variant: Variant | None
    inputs: list[MergeInput]
    pairs: list[tuple[str, str]]
    n_tokens: int
    options: ComposeOptions  # device resolved (the run's parameters)


def _plan_compose(reg: Registry, refs: Sequence[str], opts: ComposeOptions, name: str | None,
                  progress: Progress | None) -> ComposePlan:
    """Resolve and load the inputs and the examples; every check before the run row is opened."""
    arts, base, variant = resolve_inputs(reg, refs)
    check_compose_options(opts.optimizer, opts.budget, opts.bounds, opts.l1)
    check_new_name(reg, name, command="compose")
    pairs = load_examples(opts.examples, opts.shots)
    tokenizer = load_base_tokenizer(reg, base)
    n_tokens = encode_completions(tokenizer, pairs, opts.batch_size).tokens  # UsageError if none is usable
    dev = resolve_device(opts.device)
    inputs = load_inputs(reg, arts, dev, progress)
    dora = [x.art.name for x in inputs if x.dora_rank]
    if dora:
        raise UsageError(f"{dora[0]!r} is a DoRA adapter: composition mixes the inputs' A and B factors, "
                         "which says nothing about a DoRA update (it lives in weight space); merge it instead")
    adapters = [x.adapter for x in inputs]
    names = [a.name for a in arts]
    check_inputs(adapters, names)
    check_equal_ranks(module_inputs(adapters, names), names, what="composition")
    return ComposePlan(arts, base, variant, inputs, pairs, n_tokens, opts.replace(device=str(dev)))


def compose_artifacts(reg: Registry, refs: Sequence[str], options: ComposeOptions | None = None, *,
                      name: str | None = None, progress: Progress | None = None,
                      **fields: Any) -> tuple[Artifact, dict]:
    """LoraHub-style composition of registered adapters on a few examples → ``composed`` artefact.

    ``options``: a ``ComposeOptions`` (``fields`` set single fields of it by the same names:
    ``examples`` (a .jsonl file of prompt/completion lines or ``builtin:task/<name>``, train
    split, first ``shots``), ``budget``, ``bounds``, ``l1``, ``optimizer``, …). Loads the base
    (or the inputs' shared variant) once; the weights, the optimizer chain nevergrad ran and
    the loss curve go into the run output and the artefact's config (and
    ``compose_config.json`` in its folder). UsageError on bad input, before anything is
    registered.
    """
    plan = _plan_compose(reg, refs, ComposeOptions.of(options, fields), name, progress)
    opts = plan.options
    names = [a.name for a in plan.arts]
    params = dict(inputs=names, n_examples=len(plan.pairs), name=name, **opts.params())
    if (earlier := earlier_result(reg, name, "compose", params, ignore=ComposeOptions.unkeyed())) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "compose", params) as run:
        t0 = time.perf_counter()
        model, tokenizer = load_stack(reg, StackSpec(base=plan.base, variant=plan.variant), opts.device)
        load_s = time.perf_counter() - t0
        res = compose_adapters([x.adapter for x in plan.inputs], model=model, tokenizer=tokenizer,
                               examples=plan.pairs, optimizer=opts.optimizer, budget=opts.budget,
                               bounds=opts.bounds, l1=opts.l1, seed=opts.seed, batch_size=opts.batch_size,
                               names=names, progress=progress)
        summary = _compose_summary(plan, res)
        metrics = {"loss": res.loss, "objective": res.objective, "compose_seconds": res.seconds,
                   "load_seconds": load_s, "seconds_per_step": res.seconds / max(1, len(res.curve))}
        art = _register_composed(reg, plan, res, name, summary, metrics, run.id)
        report = {"artifact": art.name, "id": art.id, "kind": art.kind, "base": plan.base.name,
                  "variant": plan.variant.name if plan.variant else None, **summary, **metrics,
                  "device": opts.device, "run_id": run.id}
        run.output = report
        return art, report


def _compose_summary(plan: ComposePlan, res) -> dict[str, Any]:
    """The composition's weights, search and loss curve (artefact config, report, ``compose_config.json``)."""
    opts = plan.options
    curve = [{k: c[k] for k in ("step", "loss", "objective", "best")} for c in res.curve]
    return {"inputs": [{"name": x.art.name, "id": x.art.id, "kind": x.art.kind, "weight": w}
                       for x, w in zip(plan.inputs, res.weights, strict=False)],
            "weights": res.weights, "loss": res.loss, "objective": res.objective,
            "optimizer": res.optimizer, "optimizer_used": res.optimizer_used, "budget": opts.budget,
            "bounds": list(opts.bounds), "l1": opts.l1, "seed": opts.seed, "examples": opts.examples,
            "shots": opts.shots, "n_examples": len(plan.pairs), "completion_tokens": plan.n_tokens, "curve": curve}


def _register_composed(reg: Registry, plan: ComposePlan, res, name: str | None, summary: dict, metrics: dict,
                       run_id: str) -> Artifact:
    """Write the composed PEFT folder (+ ``compose_config.json``) and register it with its lineage."""
    names = [a.name for a in plan.arts]
    with reg.staging("merge") as tmp:
        folder = Path(tmp) / "composed"
        cpu = LoraAdapter(res.adapter.config, {k: v.detach().cpu() for k, v in res.adapter.tensors.items()})
        cpu.to_folder(folder, extra_files={COMPOSE_CONFIG_FILE: (json.dumps(summary, indent=2) + "\n").encode()})
        parents = [(a, "compose-input") for a in {a.id: a for a in plan.arts}.values()]
        return register_artifact(reg, kind="composed", name=name,
                                 stem=None if name else ("compose-" + "+".join(dict.fromkeys(names)))[:120],
                                 base_id=plan.base.id, folder=folder,
                                 variant_id=plan.variant.id if plan.variant else None, source="compose:lorahub",
                                 config={**summary, "config_file": COMPOSE_CONFIG_FILE}, metrics=metrics,
                                 parents=parents, run_id=run_id)


def summarize_curve(curve: Sequence[dict[str, Any]], points: int = 8) -> list[dict]:
    """A few evenly spaced points of a loss curve (for tables)."""
    if len(curve) <= points:
        return list(curve)
    idx = np.linspace(0, len(curve) - 1, points).round().astype(int)
    return [curve[i] for i in sorted(set(idx.tolist()))]
