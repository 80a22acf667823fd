"""Registry operations of ``adapt train`` and ``adapt convert``.

``train_adapter``: a plain LoRA (QLoRA on a quantized variant) trained on a base or a
variant with ``train.train_lora``, saved as a PEFT folder whose
``base_model_name_or_path`` is the base's Hub id (or its name), registered as ``lora``
with lineage ``trained-on`` → base or variant, the training summary in ``metrics`` and
its evaluation on held-out data (before / after) recorded as ``evaluations`` rows.

``convert_adapter``: CA-LoRA / CPET conversion (``convert.py``) of a registered adapter
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
from pathlib import Path
from typing import Any, Sequence

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import DEFAULT_CORPUS, load_dataset
from adapterhub_c.evals.evaluate import evaluate_model
from adapterhub_c.evals.metrics import QUALITY_METRICS
from adapterhub_c.models.device import resolve_device
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
from adapterhub_c.training.compensate import TARGET_SETS, check_readable, compensate, compensation_targets
from adapterhub_c.training.convert import (
    DISTILL_ON,
    _attach_source_lora,
    build_student,
    build_teacher,
    distill_convert,
    load_adapted,
)
from adapterhub_c.training.loop import Progress, TrainConfig, TrainResult
from adapterhub_c.training.recovery import RecoveryConfig
from adapterhub_c.training.train import train_lora

# the training loop's own defaults (one place: TrainConfig)
DEFAULT_STEPS = TrainConfig.steps
DEFAULT_LR = TrainConfig.lr
DEFAULT_BATCH_SIZE = TrainConfig.batch_size
DEFAULT_SEQ_LEN = TrainConfig.seq_len
EVAL_SPLIT = "test"
DEFAULT_EVAL_TOKENS = 8192     # perplexity: first tokens of the eval split
DEFAULT_EVAL_EXAMPLES = 50     # exact match: first examples of a task's eval split
RECOVER_METHODS = ("modules", "lowrank")
DEFAULT_CALIB = DEFAULT_CORPUS  # lowrank: when the variant's recipe names no calibration set


# ---------------------------------------------------------------------------------------
# shared helpers


def run_key(**parts: Any) -> str:
    """A short stable digest naming one training run (its checkpoint folder)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def checkpoint_dir(reg: Registry, key: str) -> Path:
    """``<cache>/checkpoints/<key>`` (created)."""
    path = reg.cache_dir / "checkpoints" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train_config(steps, lr, batch_size, seq_len, grad_accum, seed, device, checkpoint_every) -> TrainConfig:
    config = TrainConfig(steps=int(steps), lr=float(lr), batch_size=int(batch_size), seq_len=int(seq_len),
                         grad_accum=int(grad_accum), seed=int(seed), device=device,
                         checkpoint_every=int(checkpoint_every))
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


def _evaluate(model, tokenizer, data: str, split: str, max_tokens, max_examples, progress) -> dict:
    return evaluate_model(model, tokenizer, data, split, max_tokens=max_tokens, max_examples=max_examples,
                          progress=progress)


def _public(results: dict) -> dict:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def _tag(results: dict, role: str) -> dict:
    """Add the row's role to every metric's details (stored with the evaluation)."""
    for details in results.get("_details", {}).values():
        details["role"] = role
    return results


def _dataset_label(data: str) -> str:
    if data.startswith("builtin:task/"):
        return data.split("/", 1)[1]
    if data.startswith("builtin:"):
        return data.split(":", 1)[1]
    return Path(data).stem or "data"


# ---------------------------------------------------------------------------------------
# adapt train


def train_adapter(reg: Registry, target: str, data: str, *, variant: str | None = None, rank: int = 16,
                  alpha: float = 32, targets: Sequence[str] | None = None, steps: int = DEFAULT_STEPS,
                  lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE, seq_len: int = DEFAULT_SEQ_LEN,
                  grad_accum: int = 1, seed: int = 0, checkpoint_every: int = 0, name: str | None = None,
                  eval_data: str | None = None, eval_split: str = EVAL_SPLIT,
                  max_eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
                  max_eval_examples: int | None = DEFAULT_EVAL_EXAMPLES, baseline: bool = True,
                  device: str | None = "cpu", resume: bool = False,
                  progress: Progress | None = None) -> tuple[Artifact, dict]:
    """Train a LoRA on ``target`` (a base or a variant; ``variant`` picks one of the base's) on ``data``.

    Returns (the registered ``lora`` artefact, a report dict with the training summary and
    the evaluation on ``eval_data`` (default: ``data``), split ``eval_split``, of the
    model before (``baseline``) and after training). ``targets``: module names (default:
    the attention linears, e.g. q/k/v/o on Llama, c_attn/attn.c_proj on GPT-2). Bad input
    raises UsageError before anything is loaded or registered.
    """
    if rank < 1:
        raise UsageError(f"rank must be >= 1 (got {rank})")
    if not alpha > 0:
        raise UsageError(f"alpha must be > 0 (got {alpha})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be >= 1 (got {steps!r}); nothing would be trained")
    if targets:  # None or empty: the attention linears of the model (models/arch.py)
        targets = sorted({t.strip() for t in targets if t and t.strip()})
        if not targets:
            raise UsageError("--targets is empty")
    else:
        targets = None
    device = str(resolve_device(device))
    config = _train_config(steps, lr, batch_size, seq_len, grad_accum, seed, device, checkpoint_every)
    spec = resolve_stack(reg, target, variant)
    if spec.adapter is not None or spec.prompt is not None:
        raise UsageError(f"{target!r} is an artefact; train starts from a base or a variant")
    if spec.base.is_reference:
        raise UsageError(f"base {spec.base.name!r} is only a reference; fetch its weights with "
                         f"`adapt base add {spec.base.name}`")
    dataset = load_dataset(data, "train")
    eval_data = eval_data or data
    load_dataset(eval_data, eval_split)
    check_new_name(reg, name, command="adapt train")
    stem = f"{_dataset_label(data)}-lora" + (f"-{spec.variant.name}" if spec.variant else "")
    key = run_key(command="adapt train", base=spec.base.id, variant=spec.variant.id if spec.variant else None,
                  data=data, name=name)
    params = dict(target=target, data=data, variant=variant, rank=rank, alpha=alpha, targets=targets,
                  steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, seed=seed,
                  name=name, eval_data=eval_data, eval_split=eval_split, device=device, resume=resume)
    if (earlier := earlier_result(reg, name, "adapt train", params)) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "adapt train", params) as run:
        config.checkpoint_dir = str(checkpoint_dir(reg, key))
        run.output = {"checkpoint": config.checkpoint_dir}
        t0 = time.perf_counter()
        model, tokenizer = load_stack(reg, spec, device)
        report: dict[str, Any] = {"base": spec.base.name, "variant": spec.variant.name if spec.variant else None,
                                  "data": data, "eval_data": eval_data, "eval_split": eval_split}
        before = None
        if baseline:
            before = _tag(_evaluate(model, tokenizer, eval_data, eval_split, max_eval_tokens, max_eval_examples,
                                    progress), "before training")
        trained = train_lora(model, tokenizer, dataset, rank=rank, alpha=alpha, targets=targets, config=config,
                             progress=progress, resume=resume,
                             fingerprint={"base": spec.base.id,
                                          "variant": spec.variant.id if spec.variant else None})
        adapter = trained.adapter

        adapter.config["base_model_name_or_path"] = base_label(spec.base)
        adapted = load_adapted(model, adapter)
        after = _tag(_evaluate(adapted, tokenizer, eval_data, eval_split, max_eval_tokens, max_eval_examples,
                               progress), "trained adapter")
        summary = train_summary(trained.result)
        metrics = {"train": summary, "eval": {"data": eval_data, "split": eval_split,
                                              "before": _public(before) if before else None,
                                              "after": _public(after)}}
        cfg = {"data": data, "rank": rank, "alpha": alpha, "targets": sorted(adapter.config["target_modules"]),
               "train": config.hparams(),
               "trained_on": spec.variant.name if spec.variant else spec.base.name}
        parent = spec.variant if spec.variant is not None else spec.base
        with reg.staging("train") as tmp:
            folder = adapter.to_folder(Path(tmp) / "adapter")
            art = register_artifact(reg, kind="lora", name=name, stem=None if name else stem, base_id=spec.base.id, folder=folder,
                                    variant_id=spec.variant.id if spec.variant else None, source="adapt train",
                                    config=cfg, metrics=metrics, parents=[(parent, "trained-on")], run_id=run.id)
        if before is not None:
            record_evaluations(reg, StackSpec(spec.base, spec.variant), eval_data, eval_split, before, run.id)
        record_evaluations(reg, StackSpec(spec.base, spec.variant, adapter=art), eval_data, eval_split, after,
                           run.id)
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
        report.update(artifact=art.name, id=art.id, size_bytes=art.size_bytes, train=summary,
                      before=_public(before) if before else None, after=_public(after),
                      wall_s=round(time.perf_counter() - t0, 2))
        run.output = {"artifact": art.name, "id": art.id, "train": summary, "after": _public(after)}
        return art, report


# ---------------------------------------------------------------------------------------
# adapt convert


def _resolve_convert(reg: Registry, adapter_ref: str, variant_ref: str):
    """(source artefact, variant, base) with the checks that need only the registry."""
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
        return art, var, base, source_variant


def convert_adapter(reg: Registry, adapter_ref: str, variant_ref: str, *, data: str | None = None,
                    eval_data: str | None = None, eval_split: str = EVAL_SPLIT, inherit: bool = True,
                    recover: bool | str = True, distill: bool = True, recover_rank: int = 16,
                    recover_act: str = "gelu", recover_targets: str = "all", calib: str | None = None,
                    calib_samples: int = 32, calib_seq_len: int = 128,
                    distill_alpha: float = 1.0, distill_on: str = "hidden", steps: int = DEFAULT_STEPS,
                    lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE, seq_len: int = DEFAULT_SEQ_LEN,
                    grad_accum: int = 1, seed: int = 0, checkpoint_every: int = 0, name: str | None = None,
                    max_eval_tokens: int | None = DEFAULT_EVAL_TOKENS,
                    max_eval_examples: int | None = DEFAULT_EVAL_EXAMPLES, reference_rows: bool = True,
                    device: str | None = "cpu", resume: bool = False,
                    progress: Progress | None = None) -> tuple[Artifact, dict]:
    """Convert adapter ``adapter_ref`` to variant ``variant_ref`` (CA-LoRA: inherit, recover, distill).

    Without ``data`` (or with ``steps=0``) nothing is trained: the inherited LoRA is
    registered as is (no recovery modules: untrained ones are exactly zero). Evaluation
    on ``eval_data`` (default: ``data``, else the source's training data, else
    builtin:pydoc), split ``eval_split``. ``reference_rows=False`` skips the "variant
    alone", "naive" and "teacher" rows (the converted one is always measured). Returns
    (the ``recovered-lora`` artefact, report with the rows and the gap closed).

    ``recover``: True / "modules" (CA-LoRA recovery modules, trained with the data),
    False (none) or "lowrank" (compensated conversion, ``training.compensate``): the
    LoRA becomes the best rank-(r + ``recover_rank``) approximation of W + s·B·A − Ŵ in
    the calibration-weighted norm on the ``recover_targets`` layers ("attn" or "all"),
    from ``calib_samples`` × ``calib_seq_len`` tokens of ``calib`` (default: the variant's
    own calibration set, else builtin:pydoc; the moments are cached per variant); no
    data needed, and with data the distillation starts from it. The result is one plain
    PEFT LoRA, registered as ``lora``; ``inherit=False`` compensates the variant alone.
    """
    device = str(resolve_device(device))
    config = _train_config(steps, lr, batch_size, seq_len, grad_accum, seed, device, checkpoint_every)
    if distill_on not in DISTILL_ON:
        raise UsageError(f"--distill-on must be one of {', '.join(DISTILL_ON)} (got {distill_on!r})")
    if distill_alpha < 0:
        raise UsageError(f"--distill-alpha must be >= 0 (got {distill_alpha})")
    method = _recover_method(recover)
    if method == "lowrank":
        if isinstance(recover_rank, bool) or not isinstance(recover_rank, int) or recover_rank < 1:
            raise UsageError(f"--recover-rank must be a positive integer (got {recover_rank!r})")
        if recover_targets not in TARGET_SETS:
            raise UsageError(f"--targets must be one of {', '.join(TARGET_SETS)} (got {recover_targets!r})")
        for flag, value in (("--calib-samples", calib_samples), ("--calib-seq-len", calib_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag} must be a positive integer (got {value!r})")
    else:
        RecoveryConfig(rank=recover_rank, act=recover_act)  # validates rank and activation
    art, var, base, source_variant = _resolve_convert(reg, adapter_ref, variant_ref)
    lowrank = None
    if method == "lowrank":
        lowrank = {"rank": recover_rank, "targets": recover_targets,
                   "calib": calib or variant_recipe(var).calib or DEFAULT_CALIB, "samples": calib_samples,
                   "seq_len": calib_seq_len}
        load_dataset(lowrank["calib"], "train")
    dataset = load_dataset(data, "train") if data else None
    trains = dataset is not None and config.steps > 0
    if not inherit and not trains and lowrank is None:
        raise UsageError("--no-inherit without training data (or with --steps 0) leaves an empty adapter; "
                         "give --data")
    eval_data = eval_data or data or (art.config or {}).get("data") or DEFAULT_CORPUS
    load_dataset(eval_data, eval_split)
    check_new_name(reg, name, command="adapt convert")
    recover_used, distill_used = method == "modules" and trains, distill and trains
    key = run_key(command="adapt convert", adapter=art.id, variant=var.id, data=data, name=name)
    params = dict(adapter=adapter_ref, variant=variant_ref, data=data, eval_data=eval_data, eval_split=eval_split,
                  inherit=inherit, recover=method or False, distill=distill, recover_rank=recover_rank,
                  recover_act=recover_act, recover_targets=recover_targets if lowrank else None,
                  calib=lowrank["calib"] if lowrank else None, calib_samples=calib_samples if lowrank else None,
                  calib_seq_len=calib_seq_len if lowrank else None,
                  distill_alpha=distill_alpha, distill_on=distill_on, steps=steps, lr=lr,
                  batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, seed=seed, name=name,
                  device=device, resume=resume)
    if (earlier := earlier_result(reg, name, "adapt convert", params)) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "adapt convert", params) as run:
        if trains:
            config.checkpoint_dir = str(checkpoint_dir(reg, key))
            run.output = {"checkpoint": config.checkpoint_dir}
        t0 = time.perf_counter()
        result, rows, art_new, comp = _convert(reg, art, var, base, source_variant, dataset, eval_data,
                                               eval_split, inherit, recover_used, distill_used, recover_rank,
                                               recover_act, distill_alpha, distill_on, config, name,
                                               max_eval_tokens, max_eval_examples, reference_rows, device, resume,
                                               progress, run, lowrank=lowrank)
        if config.checkpoint_dir:
            shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
        summary = train_summary(result.train)
        report = {"artifact": art_new.name, "id": art_new.id, "kind": art_new.kind, "source": art.name,
                  "variant": var.name, "base": base.name, "data": data, "eval_data": eval_data,
                  "eval_split": eval_split, "inherit": inherit, "recover": recover_used or lowrank is not None,
                  "recover_method": "lowrank" if lowrank else ("modules" if recover_used else None),
                  "distill": distill_used, "distill_on": distill_on if distill_used else None, "train": summary,
                  "compensation": comp, "warnings": list((comp or {}).get("warnings", [])),
                  "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                  "gap_closed": gap_closed(rows), "wall_s": round(time.perf_counter() - t0, 2)}
        run.output = {"artifact": art_new.name, "id": art_new.id, "train": summary, "rows": report["rows"],
                      "gap_closed": report["gap_closed"], "compensation": comp}
        return art_new, report


def _recover_method(recover: bool | str | None) -> str | None:
    """True / "modules" → "modules", False / "none" → None, "lowrank" → "lowrank"."""
    if recover is None or recover is True or recover == "modules":
        return "modules"
    if recover is False or recover == "none":
        return None
    if recover == "lowrank":
        return "lowrank"
    raise UsageError(f"--recover must be one of {', '.join(RECOVER_METHODS)} (got {recover!r})")


ROW_VARIANT, ROW_NAIVE, ROW_TEACHER, ROW_CONVERTED = ("variant alone", "variant + source (naive)",
                                                      "base + source (teacher)", "variant + converted")


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


def _convert(reg, art, var, base, source_variant, dataset, eval_data, eval_split, inherit, recover, distill,
             recover_rank, recover_act, distill_alpha, distill_on, config, name, max_eval_tokens, max_eval_examples,
             reference_rows, device, resume, progress, run, lowrank=None):
    loaded = load_adapter_artifact(reg, art)
    if loaded.recovery_state is not None:
        raise UsageError(f"{art.name!r} is already converted (it has recovery modules); convert its source instead")
    if source_variant is not None and variant_kept_indices(reg, source_variant):
        raise UsageError(f"{art.name!r} was trained on the ffn-channels variant {source_variant.name!r}; "
                         "its shapes do not fit the base")
    lora = loaded.lora
    kept = variant_kept_indices(reg, var)
    if distill or reference_rows or lowrank:
        base_model, tokenizer = load_base_model(reg, base, device)
    else:
        base_model, tokenizer = None, load_base_tokenizer(reg, base)
    variant_model = load_variant(reg, var, device)
    comp, cached = None, None
    if lowrank:
        comp, cached = _compensate(reg, var, base_model, variant_model, tokenizer, lora if inherit else None,
                                   kept, lowrank, progress)
    rows: list[dict] = []

    def measure(model, role: str, spec: StackSpec, size: int | None) -> None:
        res = _tag(_evaluate(model, tokenizer, eval_data, eval_split, max_eval_tokens, max_eval_examples,
                             progress), role)
        rows.append({"row": role, **_public(res), "size_bytes": size, "_spec": spec, "_res": res})

    if reference_rows:
        measure(variant_model, ROW_VARIANT, StackSpec(base, var), var.size_bytes)
        naive, _ = _attach_source_lora(variant_model, lora, kept_indices=kept)
        naive.requires_grad_(False)
        measure(naive.eval(), ROW_NAIVE, StackSpec(base, var, adapter=art), _add(var.size_bytes, art.size_bytes))
        variant_model = naive.unload()
    teacher = None
    if distill or reference_rows:
        teacher = build_teacher(base_model, lora)
        if reference_rows:
            measure(teacher, ROW_TEACHER, StackSpec(base, adapter=art), _add(base.size_bytes, art.size_bytes))
    if not distill:
        teacher = None
    del base_model
    if comp is not None:  # the student starts from the compensated LoRA, already shaped for the variant
        student = build_student(variant_model, comp.adapter, inherit=True, recover=False, seed=config.seed)
    else:
        student = build_student(variant_model, lora, inherit=inherit, recover=recover, recover_rank=recover_rank,
                                recover_act=recover_act, kept_indices=kept, seed=config.seed)
    result = distill_convert(student, teacher, tokenizer, dataset, distill=distill, distill_alpha=distill_alpha,
                             distill_on=distill_on, config=config, progress=progress, resume=resume,
                             fingerprint={"adapter": art.id, "variant": var.id, "inherit": inherit,
                                          "compensation": lowrank})
    teacher = None
    result.lora.config["base_model_name_or_path"] = base_label(base)
    conv_res = _tag(_evaluate(student.model, tokenizer, eval_data, eval_split, max_eval_tokens, max_eval_examples,
                              progress), ROW_CONVERTED)
    metrics = {"train": train_summary(result.train),
               "eval": {"data": eval_data, "split": eval_split,
                        "rows": {r["row"]: {k: v for k, v in r.items() if k in QUALITY_METRICS}
                                 for r in rows} | {ROW_CONVERTED: _public(conv_res)}}}
    comp_info = None if comp is None else {**lowrank, **comp.summary(), "moments_cached": cached,
                                           "warnings": comp.warnings}
    cfg = {"data": dataset.name if dataset is not None else None, "source": art.name, "variant": var.name,
           "inherit": inherit, "recover": recover, "distill": distill,
           "recover_method": "lowrank" if comp is not None else ("modules" if recover else None),
           "compensation": {k: v for k, v in (comp_info or {}).items() if k not in ("warnings", "wall_s")} or None,
           "recovery": result.recovery_config.to_dict() if result.recovery_config else None,
           "distill_alpha": distill_alpha if distill else None, "distill_on": distill_on if distill else None,
           "ffn_sliced": bool(kept), "train": config.hparams() if result.train else None}
    stem = f"{art.name}-{var.name}"
    with reg.staging("train") as tmp:
        folder = result.save(Path(tmp) / "adapter")
        kind = "lora" if comp is not None else "recovered-lora"  # compensated: one plain PEFT LoRA
        art_new = register_artifact(reg, kind=kind, name=name, stem=None if name else stem,
                                    base_id=base.id, folder=folder, variant_id=var.id, source="adapt convert",
                                    config=cfg, metrics=metrics,
                                    parents=[(art, "inherited-from" if inherit else "converted-from"),
                                             (var, "targets")], run_id=run.id)
    rows.append({"row": ROW_CONVERTED, **_public(conv_res), "size_bytes": _add(var.size_bytes, art_new.size_bytes),
                 "_spec": StackSpec(base, var, adapter=art_new), "_res": conv_res})
    for r in rows:
        record_evaluations(reg, r["_spec"], eval_data, eval_split, r["_res"], run.id)
    return result, rows, art_new, comp_info


def _compensate(reg, var, base_model, variant_model, tokenizer, source, kept, lowrank, progress):
    """The compensated LoRA of ``source`` (None: of the variant alone) on the loaded variant."""
    check_readable(variant_model, compensation_targets(variant_model, lowrank["targets"]))
    moments, cached = variant_moments(reg, var, variant_model, tokenizer, lowrank["calib"], lowrank["samples"],
                                      lowrank["seq_len"], progress=progress)
    comp = compensate(base_model, variant_model, source, moments, lowrank["rank"], lowrank["targets"],
                      kept_indices=kept, progress=progress)
    return comp, cached


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


__all__ = ["train_adapter", "convert_adapter", "train_summary", "gap_closed", "run_key", "checkpoint_dir"]
