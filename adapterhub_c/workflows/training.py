"""Registry operations of ``adapt train`` and ``adapt convert``.

``train_adapter``: a plain LoRA (QLoRA on a quantized variant) trained on a base or a
variant with ``train.train_lora``, saved as a PEFT folder whose
``base_model_name_or_path`` is the base's Hub id (or its name), registered as ``lora``
with lineage ``trained-on`` → base or variant, the training summary in ``metrics`` and
its evaluation on held-out data (before / after) recorded as ``evaluations`` rows.

``convert_adapter``: CA-LoRA / CPET conversion (``training.convert.ca_lora``) of a registered adapter
(any kind, packs included) to a variant of its base. It measures, on the evaluation
data, the variant alone, the variant + source adapter (naive; ffn-sliced on
``ffn-channels`` variants), the teacher (base + source) and the converted adapter,
records all of them as ``evaluations``, and registers a ``recovered-lora`` (PEFT folder
+ ``recovery.safetensors``) with lineage ``inherited-from`` (``converted-from`` with
``inherit=False``) → source and ``targets`` → variant.

Both runs checkpoint under ``<registry cache>/checkpoints/<run key>``; the key names
what is trained (command, base/variant or source/variant, data, name), not the
hyper-parameters, so ``resume=True`` with changed options finds the checkpoint and is
refused with the list of differences instead of silently starting over. A completed run
removes its checkpoint. Ctrl-C saves one (the loop) and the run is marked interrupted.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from adapterhub_c.adapters.attach import load_adapted
from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.evals.data import DEFAULT_CORPUS, load_dataset
from adapterhub_c.evals.evaluate import EvalData, Scores
from adapterhub_c.evals.metrics import QUALITY_METRICS
from adapterhub_c.models.builtin import builtin_for
from adapterhub_c.models.device import resolve_device
from adapterhub_c.models.weights import cap_mmap_threshold
from adapterhub_c.options import Options
from adapterhub_c.options.convert import RECOVER_METHODS, ConvertOptions
from adapterhub_c.options.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EVAL_EXAMPLES,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_LR,
    DEFAULT_SEQ_LEN,
    DEFAULT_STEPS,
    EVAL_SPLIT,
    TrainOptions,
)
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import already_done_report, check_new_name, earlier_result, register_artifact
from adapterhub_c.registry.kinds import ADAPTER_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.runtime.bases import base_label, load_base_model, load_base_tokenizer
from adapterhub_c.runtime.compensation import variant_moments
from adapterhub_c.runtime.evaluations import record_evaluations
from adapterhub_c.runtime.stack import StackSpec, load_stack, resolve_stack
from adapterhub_c.runtime.variants import load_variant, variant_kept_indices, variant_recipe
from adapterhub_c.training.convert import (
    ROW_CONVERTED,
    ROW_NAIVE,
    ROW_TEACHER,
    ROW_VARIANT,
    Conversion,
    ConvertInputs,
    ca_lora,
)
from adapterhub_c.training.loop import TrainConfig, TrainResult
from adapterhub_c.training.train import train_lora
from adapterhub_c.workflows.bases import add_builtin_base

DEFAULT_CALIB = DEFAULT_CORPUS  # lowrank: when the variant's recipe names no calibration set
O = TypeVar("O", bound=Options)


# ---------------------------------------------------------------------------------------
# shared helpers


def run_key(**parts: Any) -> str:
    """A short stable digest naming one training run (its checkpoint folder)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def checkpoint_dir(reg: Registry, key: str) -> Path:
    """``<cache>/checkpoints/<key>`` (created)."""
    return reg.checkpoint_dir(key)


def options_of(cls: type[O], options: O | None, fields: dict[str, Any]) -> O:
    """``options`` (default: ``cls()``) with ``fields`` set: the one way a workflow reads its options."""
    if options is None:
        return cls.from_params(fields)
    if not isinstance(options, cls):
        raise UsageError(f"expected {cls.__name__}, got {type(options).__name__}")
    return options.replace(**fields) if fields else options


def _train_config(options: TrainOptions | ConvertOptions, device: str) -> TrainConfig:
    config = TrainConfig(**options.train_config(device))
    config.validate()
    return config


def train_summary(result: TrainResult | None) -> dict | None:
    """Loss curve start/end (first/last step and the mean of up to 10 steps), steps, time."""
    if result is None:
        return None
    losses = result.losses
    k = max(1, min(10, len(losses) // 5)) if losses else 0
    out = {"steps": len(losses), "loss_start": losses[0] if losses else None,
           "loss_end": losses[-1] if losses else None,
           "loss_start_avg": sum(losses[:k]) / k if k else None,
           "loss_end_avg": sum(losses[-k:]) / k if k else None,
           "wall_s": round(result.wall_s, 3), "tokens": result.tokens,
           "tokens_per_s": round(result.tokens_per_s, 2), "resumed_from": result.resumed_from}
    last = result.logs[-1] if result.logs else {}
    for key in ("task_loss", "distill_loss"):
        if key in last:
            out[f"{key}_end"] = last[key]
    return out


@dataclass(frozen=True)
class Row:
    """One measured model of a report: its role, the stack it was, its scores and its loaded size
    (the model in memory plus the adapter's files)."""

    role: str
    spec: StackSpec
    scores: Scores
    loaded_bytes: int | None

    def public(self) -> dict[str, Any]:
        """The report's row: name, metric values, size."""
        return {"row": self.role, **self.scores.values, "loaded_bytes": self.loaded_bytes}

    def quality(self) -> dict[str, float]:
        """The quality metrics only (what artefact metrics keep)."""
        return {k: v for k, v in self.scores.values.items() if k in QUALITY_METRICS}


def _dataset_label(data: str) -> str:
    if data.startswith("builtin:task/"):
        return data.split("/", 1)[1]
    if data.startswith("builtin:"):
        return data.split(":", 1)[1]
    return Path(data).stem or "data"


def _scorer(evaldata: EvalData, tokenizer, options: TrainOptions | ConvertOptions, progress: Progress | None):
    """``score(role, model) -> Scores`` on the evaluation data, tagged with the role."""
    def score(role: str, model) -> Scores:
        return evaldata.score(model, tokenizer, max_tokens=options.max_eval_tokens,
                              max_examples=options.max_eval_examples, progress=progress).tagged(role)
    return score


# ---------------------------------------------------------------------------------------
# adapt train


def train_adapter(reg: Registry, target: str, data: str | None = None, options: TrainOptions | None = None, *,
                  name: str | None = None, progress: Progress | None = None,
                  **fields: Any) -> tuple[Artifact, dict]:
    """Train a LoRA on ``target`` (a base or a variant; ``variant`` picks one of the base's) on ``data``.

    ``options``: a ``TrainOptions`` (``fields`` set single fields of it, by the same names).
    Returns (the registered ``lora`` artefact, a report dict with the training summary and
    the evaluation on ``eval_data`` (default: ``data``), split ``eval_split``, of the
    model before (``baseline``) and after training). ``targets``: module names (default:
    the attention linears, e.g. q/k/v/o on Llama, c_attn/attn.c_proj on GPT-2). Bad input
    raises UsageError before anything is loaded or registered.
    """
    opts = options_of(TrainOptions, options, {**fields, **({"data": data} if data is not None else {})})
    device = str(resolve_device(opts.device))
    config = _train_config(opts, device)
    spec = _train_target(reg, target, opts.variant, progress)
    dataset = load_dataset(opts.data, "train")
    evaldata = EvalData.load(opts.eval_data or opts.data, opts.eval_split)
    check_new_name(reg, name, command="adapt train")
    opts = opts.replace(eval_data=evaldata.spec, device=device)
    params = {"target": target, "name": name, **opts.params()}
    if (earlier := earlier_result(reg, name, "adapt train", params, ignore=opts.unkeyed())) is not None:
        return earlier, already_done_report(earlier)
    key = run_key(command="adapt train", base=spec.base.id, variant=spec.variant.id if spec.variant else None,
                  data=opts.data, name=name)
    with record_run(reg, "adapt train", params) as run:
        config.checkpoint_dir = str(checkpoint_dir(reg, key))
        run.record_now(checkpoint=config.checkpoint_dir)
        t0 = time.perf_counter()
        art, report = _train(reg, spec, opts, dataset, evaldata, config, name, run, progress)
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        run.output = {"artifact": art.name, "id": art.id, "train": report["train"], "after": report["after"]}
        return art, report


def _train_target(reg: Registry, target: str, variant: str | None, progress: Progress | None = None) -> StackSpec:
    try:
        spec = resolve_stack(reg, target, variant)
    except NotFoundError:
        if builtin_for(target) is None:
            raise
        spec = None
    if spec is None or (spec.base.is_reference and builtin_for(spec.base.name) is not None):
        # a built-in is added on first use (as api.add_base adds it), like pull resolving a Hub base
        add_builtin_base(reg, target if spec is None else spec.base.name, progress=progress)
        spec = resolve_stack(reg, target, variant)
    if spec.adapter is not None or spec.prompt is not None:
        raise UsageError(f"{target!r} is an artefact; train starts from a base or a variant")
    if spec.base.is_reference:
        raise UsageError(f"base {spec.base.name!r} is only a reference; fetch its weights with "
                         f"`adapt base add {spec.base.name}`")
    return spec


def _train(reg, spec: StackSpec, opts: TrainOptions, dataset, evaldata: EvalData, config: TrainConfig,
           name: str | None, run, progress) -> tuple[Artifact, dict]:
    """Load, measure before, train, measure after, register and record; returns (artefact, report)."""
    model, tokenizer = load_stack(reg, spec, config.device)
    score = _scorer(evaldata, tokenizer, opts, progress)
    before = score("before training", model) if opts.baseline else None
    trained = train_lora(model, tokenizer, dataset, rank=opts.rank, alpha=opts.alpha,
                         targets=list(opts.targets) if opts.targets else None, config=config, progress=progress,
                         resume=opts.resume, fingerprint={"base": spec.base.id,
                                                          "variant": spec.variant.id if spec.variant else None})
    adapter = trained.adapter
    adapter.config["base_model_name_or_path"] = base_label(spec.base)
    after = score("trained adapter", load_adapted(model, adapter))
    summary = train_summary(trained.result)
    metrics = {"train": summary, "eval": {"data": evaldata.spec, "split": evaldata.split,
                                          "before": before.values if before else None, "after": after.values}}
    cfg = {"data": opts.data, "rank": opts.rank, "alpha": opts.alpha,
           "targets": sorted(adapter.config["target_modules"]), "train": config.hparams(),
           "trained_on": spec.variant.name if spec.variant else spec.base.name}
    parent = spec.variant if spec.variant is not None else spec.base
    stem = f"{_dataset_label(opts.data)}-lora" + (f"-{spec.variant.name}" if spec.variant else "")
    with reg.staging("train") as tmp:
        folder = adapter.to_folder(Path(tmp) / "adapter")
        art = register_artifact(reg, kind="lora", name=name, stem=None if name else stem, base_id=spec.base.id,
                                folder=folder, variant_id=spec.variant.id if spec.variant else None,
                                source="adapt train", config=cfg, metrics=metrics,
                                parents=[(parent, "trained-on")], run_id=run.id)
    if before is not None:
        record_evaluations(reg, StackSpec(spec.base, spec.variant), evaldata.spec, evaldata.split, before, run.id)
    record_evaluations(reg, StackSpec(spec.base, spec.variant, adapter=art), evaldata.spec, evaldata.split, after,
                       run.id)
    report = {"base": spec.base.name, "variant": spec.variant.name if spec.variant else None, "data": opts.data,
              "eval_data": evaldata.spec, "eval_split": evaldata.split, "artifact": art.name, "id": art.id,
              "size_bytes": art.size_bytes, "train": summary, "before": before.values if before else None,
              "after": after.values}
    return art, report


# ---------------------------------------------------------------------------------------
# adapt convert


@dataclass(frozen=True)
class ConvertSources:
    """The registry rows one conversion reads: source adapter, target variant, their base."""

    adapter: Artifact
    variant: Variant
    base: BaseModel
    source_variant: Variant | None


def _resolve_convert(reg: Registry, adapter_ref: str, variant_ref: str) -> ConvertSources:
    """The source artefact, the variant and the base, with the checks that need only the registry."""
    with reg.session() as s:
        art = reg.resolve(s, adapter_ref, "artifact")
        if art.kind not in ADAPTER_KINDS:
            raise UsageError(f"{art.name!r} is a {art.kind}, not an adapter")
        var = reg.resolve(s, variant_ref, "variant")
        base = s.get(BaseModel, var.base_id)
        if art.base_id != var.base_id:
            other = s.get(BaseModel, art.base_id)
            raise UsageError(f"adapter {art.name!r} belongs to base {other.name!r}, but variant {var.name!r} "
                             f"is a variant of {base.name!r}")
        source_variant = s.get(Variant, art.variant_id) if art.variant_id else None
        if source_variant is not None and source_variant.id == var.id:
            raise UsageError(f"adapter {art.name!r} already targets variant {var.name!r}")
        return ConvertSources(art, var, base, source_variant)


def convert_adapter(reg: Registry, adapter_ref: str, variant_ref: str, options: ConvertOptions | None = None, *,
                    name: str | None = None, progress: Progress | None = None,
                    **fields: Any) -> tuple[Artifact, dict]:
    """Convert adapter ``adapter_ref`` to variant ``variant_ref`` (CA-LoRA: inherit, recover, distill).

    ``options``: a ``ConvertOptions`` (``fields`` set single fields of it, by the same names).
    Without ``data`` (or with ``steps=0``) nothing is trained: the inherited LoRA is
    registered as is (no recovery modules: untrained ones are exactly zero). Evaluation
    on ``eval_data`` (default: ``data``, else the source's training data, else
    builtin:pydoc), split ``eval_split``. ``reference_rows=False`` skips the "variant
    alone", "naive" and "teacher" rows (the converted one is always measured). Returns
    (the ``recovered-lora`` artefact, report with the rows and the gap closed).

    ``recover``: "modules" (CA-LoRA recovery modules, trained with the data), "none" or
    "lowrank" (compensated conversion, ``training.compensate``): the LoRA becomes the best
    rank-(r + ``recover_rank``) approximation of W + s·B·A − Ŵ in the calibration-weighted
    norm on the ``recover_targets`` layers ("attn" or "all"), from ``calib_samples`` ×
    ``calib_seq_len`` tokens of ``calib`` (default: the variant's own calibration set, else
    builtin:pydoc; the moments are cached per variant); no data needed, and with data the
    distillation starts from it. The result is one plain PEFT LoRA, registered as ``lora``;
    ``inherit=False`` compensates the variant alone.
    """
    opts = options_of(ConvertOptions, options, fields)
    device = str(resolve_device(opts.device))
    config = _train_config(opts, device)
    src = _resolve_convert(reg, adapter_ref, variant_ref)
    calib = (opts.calib or variant_recipe(src.variant).calib or DEFAULT_CALIB) if opts.lowrank else None
    if calib is not None:
        load_dataset(calib, "train")
    dataset = load_dataset(opts.data, "train") if opts.data else None
    evaldata = EvalData.load(opts.eval_data or opts.data or (src.adapter.config or {}).get("data") or DEFAULT_CORPUS,
                             opts.eval_split)
    check_new_name(reg, name, command="adapt convert")
    opts = opts.replace(eval_data=evaldata.spec, device=device, calib=calib)
    params = {"adapter": adapter_ref, "variant": variant_ref, "name": name, **opts.params()}
    if (earlier := earlier_result(reg, name, "adapt convert", params, ignore=opts.unkeyed())) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "adapt convert", params) as run:
        cap_mmap_threshold()  # a conversion holds two models and trains: freed blocks go back to the OS
        if opts.trains:
            key = run_key(command="adapt convert", adapter=src.adapter.id, variant=src.variant.id, data=opts.data,
                          name=name)
            config.checkpoint_dir = str(checkpoint_dir(reg, key))
            run.record_now(checkpoint=config.checkpoint_dir)
        t0 = time.perf_counter()
        art, report = _convert(reg, src, opts, dataset, evaldata, config, name, run, progress)
        if config.checkpoint_dir:
            shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        run.output = {"artifact": art.name, "id": art.id, "train": report["train"], "rows": report["rows"],
                      "gap_closed": report["gap_closed"], "compensation": report["compensation"]}
        return art, report


def gap_closed(rows: list[dict]) -> dict:
    """Per metric: (converted − naive) / (teacher − naive), the share of the gap closed.

    On tasks the perplexity figure is ``completion_nll`` (the log of completion
    perplexity: the gap in nats per completion token); on text, ``perplexity``.
    """
    by = {r["row"]: r for r in rows}
    out = {}
    if not {ROW_NAIVE, ROW_TEACHER, ROW_CONVERTED} <= set(by):
        return out
    for metric in ("perplexity", "completion_nll", "exact_match"):
        vals = [_gap_value(by[r], metric) for r in (ROW_NAIVE, ROW_TEACHER, ROW_CONVERTED)]
        if any(v is None for v in vals):
            continue
        naive, teacher, conv = vals
        if teacher != naive:
            out[metric] = (conv - naive) / (teacher - naive)
    return out


def _gap_value(row: dict, metric: str) -> float | None:
    if metric == "completion_nll":
        ppl = row.get("completion_ppl")
        return None if ppl is None else math.log(ppl)
    return row.get(metric)


class _VariantMoments:
    """The variant's calibration moments from the registry's cache (``cached``: whether they were there)."""

    def __init__(self, reg: Registry, variant: Variant, model, tokenizer, opts: ConvertOptions, progress):
        self.reg, self.variant, self.model, self.tokenizer = reg, variant, model, tokenizer
        self.opts, self.progress, self.cached = opts, progress, None

    def __call__(self):
        moments, self.cached = variant_moments(self.reg, self.variant, self.model, self.tokenizer, self.opts.calib,
                                               self.opts.calib_samples, self.opts.calib_seq_len,
                                               progress=self.progress)
        return moments


def _lowrank_settings(opts: ConvertOptions) -> dict | None:
    """The compensation's settings as recorded (and compared on resume); None without ``lowrank``."""
    if not opts.lowrank:
        return None
    return {"rank": opts.recover_rank, "targets": opts.recover_targets, "calib": opts.calib,
            "samples": opts.calib_samples, "seq_len": opts.calib_seq_len}


def _convert_inputs(reg: Registry, src: ConvertSources, opts: ConvertOptions, dataset, device: str, progress):
    """Load the source LoRA, the base (when needed) and the variant; (inputs, moments provider)."""
    loaded = load_adapter_artifact(reg, src.adapter)
    if loaded.recovery_state is not None:
        raise UsageError(f"{src.adapter.name!r} is already converted (it has recovery modules); convert its source "
                         "instead")
    if src.source_variant is not None and variant_kept_indices(reg, src.source_variant):
        raise UsageError(f"{src.adapter.name!r} was trained on the ffn-channels variant {src.source_variant.name!r}; "
                         "its shapes do not fit the base")
    kept = variant_kept_indices(reg, src.variant)
    # the variant first: its load holds the base's stored tensors (masked, then quantized) whole, and the
    # base's load maps its weight file until the end; loaded the other way round, both of those transients
    # would come on top of the uncompressed base, the largest thing a conversion holds
    variant_model = load_variant(reg, src.variant, device)
    if opts.needs_base:
        base_model, tokenizer = load_base_model(reg, src.base, device)
    else:
        base_model, tokenizer = None, load_base_tokenizer(reg, src.base)
    moments = _VariantMoments(reg, src.variant, variant_model, tokenizer, opts, progress) if opts.lowrank else None
    inputs = ConvertInputs(variant=variant_model, tokenizer=tokenizer, source=loaded.lora, base=base_model,
                           dataset=dataset, kept_indices=kept, moments=moments)
    return inputs, moments


def _convert(reg, src: ConvertSources, opts: ConvertOptions, dataset, evaldata: EvalData, config: TrainConfig,
             name: str | None, run, progress) -> tuple[Artifact, dict]:
    """Resolve the inputs, run ``training.convert.ca_lora``, register, record; returns (artefact, report)."""
    inputs, moments = _convert_inputs(reg, src, opts, dataset, config.device, progress)
    kept, tokenizer = bool(inputs.kept_indices), inputs.tokenizer
    conversion = ca_lora(inputs, opts, config, measure=_scorer(evaldata, tokenizer, opts, progress),
                         progress=progress,
                         fingerprint={"adapter": src.adapter.id, "variant": src.variant.id, "inherit": opts.inherit,
                                      "compensation": _lowrank_settings(opts)})
    del inputs
    comp_info = _compensation_info(opts, conversion, moments)
    conversion.result.lora.config["base_model_name_or_path"] = base_label(src.base)
    rows = _reference_rows(src, conversion)
    art_new = _register_converted(reg, src, opts, conversion, evaldata, rows, comp_info, kept, config, name, run)
    rows.append(Row(ROW_CONVERTED, StackSpec(src.base, src.variant, adapter=art_new),
                    conversion.measurements[ROW_CONVERTED], _add(src.variant.loaded_bytes, art_new.stored_bytes)))
    for r in rows:
        record_evaluations(reg, r.spec, evaldata.spec, evaldata.split, r.scores, run.id)
    public = [r.public() for r in rows]
    report = {"artifact": art_new.name, "id": art_new.id, "kind": art_new.kind, "source": src.adapter.name,
              "variant": src.variant.name, "base": src.base.name, "data": opts.data, "eval_data": evaldata.spec,
              "eval_split": evaldata.split, "inherit": opts.inherit,
              "recover": opts.recovery_modules or opts.lowrank, "recover_method": _recover_method(opts),
              "distill": opts.distills, "distill_on": opts.distill_on if opts.distills else None,
              "train": train_summary(conversion.result.train), "compensation": comp_info,
              "warnings": list((comp_info or {}).get("warnings", [])), "rows": public,
              "gap_closed": gap_closed(public)}
    return art_new, report


def _recover_method(opts: ConvertOptions) -> str | None:
    """What recovers the compression loss in the result: "lowrank", "modules" (trained) or None."""
    return "lowrank" if opts.lowrank else ("modules" if opts.recovery_modules else None)


def _reference_rows(src: ConvertSources, conversion: Conversion) -> list[Row]:
    """The measured reference models (variant alone, naive, teacher) as rows, in measuring order."""
    a, v, b = src.adapter, src.variant, src.base
    specs = {ROW_VARIANT: (StackSpec(b, v), v.loaded_bytes),
             ROW_NAIVE: (StackSpec(b, v, adapter=a), _add(v.loaded_bytes, a.stored_bytes)),
             ROW_TEACHER: (StackSpec(b, adapter=a), _add(b.loaded_bytes, a.stored_bytes))}
    return [Row(role, specs[role][0], scores, specs[role][1])
            for role, scores in conversion.measurements.items() if role in specs]


def _compensation_info(opts: ConvertOptions, conversion: Conversion, moments: _VariantMoments | None) -> dict | None:
    comp = conversion.compensation
    if comp is None:
        return None
    return {**_lowrank_settings(opts), **comp.summary(), "moments_cached": moments.cached if moments else None,
            "warnings": comp.warnings}


def _register_converted(reg, src: ConvertSources, opts: ConvertOptions, conversion: Conversion, evaldata: EvalData,  # noqa: PLR0913 - what one conversion produced, passed once
                        rows: list[Row], comp_info: dict | None, kept: bool, config: TrainConfig, name, run):
    """Register the converted adapter (``lora`` when compensated, else ``recovered-lora``) with its lineage."""
    result = conversion.result
    converted = conversion.measurements[ROW_CONVERTED]
    metrics = {"train": train_summary(result.train),
               "eval": {"data": evaldata.spec, "split": evaldata.split,
                        "rows": {r.role: r.quality() for r in rows} | {ROW_CONVERTED: dict(converted.values)}}}
    cfg = {"data": opts.data,
           "source": src.adapter.name, "variant": src.variant.name,
           "inherit": opts.inherit, "recover": opts.recovery_modules, "distill": opts.distills,
           "recover_method": _recover_method(opts),
           "compensation": {k: v for k, v in (comp_info or {}).items() if k not in ("warnings", "wall_s")} or None,
           "recovery": result.recovery_config.to_dict() if result.recovery_config else None,
           "distill_alpha": opts.distill_alpha if opts.distills else None,
           "distill_on": opts.distill_on if opts.distills else None,
           "ffn_sliced": kept, "train": config.hparams() if result.train else None}
    with reg.staging("train") as tmp:
        folder = result.save(Path(tmp) / "adapter")
        return register_artifact(reg, kind="lora" if opts.lowrank else "recovered-lora", name=name,
                                 stem=None if name else f"{src.adapter.name}-{src.variant.name}",
                                 base_id=src.base.id, folder=folder, variant_id=src.variant.id,
                                 source="adapt convert", config=cfg, metrics=metrics,
                                 parents=[(src.adapter, "inherited-from" if opts.inherit else "converted-from"),
                                          (src.variant, "targets")], run_id=run.id)


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


__all__ = ["train_adapter", "convert_adapter", "train_summary", "gap_closed", "run_key", "checkpoint_dir",
           "options_of", "Row", "ConvertSources", "RECOVER_METHODS", "EVAL_SPLIT", "DEFAULT_EVAL_TOKENS",
           "DEFAULT_EVAL_EXAMPLES", "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_BATCH_SIZE", "DEFAULT_SEQ_LEN",
           "ROW_VARIANT", "ROW_NAIVE", "ROW_TEACHER", "ROW_CONVERTED"]
