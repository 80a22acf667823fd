"""Registry operations for soft prompts: learn one on a variant, attach one, transfer matrix.

- ``learn_prompt_artifact``: learn a ``k``-token prompt on a variant (or the base itself)
  with the LM loss on a dataset's train split, through the shared training loop
  (checkpoints, ``--resume``), and register it as a ``prompt`` artefact (one safetensors
  file + ``prompt_config.json``) with lineage ``learned-on`` → the variant. Perplexity on
  the dataset's test split before and after is recorded as evaluations.
- ``attach_prompt``: what ``models.stack.load_stack`` calls for ``--prompt P``; wraps the
  (possibly PEFT) model in ``PromptedModel``.
- ``prompt_transfer``: every prompt on every variant (plus a no-prompt row), as in
  Compress, Then Prompt's Figure 5; optional heat map PNG.

Perplexity with and without a prompt is always measured on the same windows: the window
is shrunk so that the prompt plus the window fits the model's context.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.metrics import DEFAULT_MAX_LENGTH, DEFAULT_STRIDE, perplexity
from adapterhub_c.models.device import resolve_device
from adapterhub_c.options.prompt import PromptOptions, TransferOptions
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import already_done_report, check_new_name, earlier_result, register_artifact
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.bases import base_label
from adapterhub_c.runtime.evaluations import record_evaluations
from adapterhub_c.runtime.prompts import PROMPT_FILE, read_prompt_artifact
from adapterhub_c.runtime.stack import StackSpec, load_stack
from adapterhub_c.training.loop import TrainConfig, train
from adapterhub_c.training.prompt import PromptedModel, learn_prompt, save_prompt
from adapterhub_c.training.prompt_transfer import NO_PROMPT, plot_transfer, transfer_matrix

CONFIG_FILE = "prompt_config.json"


# ---------------------------------------------------------------------------------------
# helpers


def _context(base: BaseModel) -> int | None:
    value = (base.config or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def _hidden(base: BaseModel) -> int | None:
    value = (base.config or {}).get("hidden_size")
    return value if isinstance(value, int) and value > 0 else None


def eval_window(context: int | None, k: int, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[int, int]:
    """(max_length, stride) of perplexity windows that fit ``k`` prompt tokens in ``context``."""
    if context is not None:
        max_length = min(max_length, context - k)
    if max_length < 2:
        raise UsageError(f"{k} prompt tokens leave no room for text in a context of {context}")
    return max_length, max(1, min(DEFAULT_STRIDE, max_length // 2))


def _check_tokens(tokens: Any, context: int | None, seq_len: int | None = None) -> None:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise UsageError(f"--tokens must be a positive integer, got {tokens!r}")
    if context is not None and tokens >= context:
        raise UsageError(f"--tokens {tokens} does not fit the model's context of {context} positions")
    if context is not None and seq_len is not None and tokens + seq_len > context:
        raise UsageError(f"--tokens {tokens} + --seq-len {seq_len} exceed the model's context of "
                         f"{context} positions; lower one of them")


def _resolve_target(reg: Registry, ref: str) -> tuple[BaseModel, Variant | None]:
    """A base or a variant named by ``ref`` (artefacts are refused)."""
    with reg.session() as s:
        obj = reg.resolve(s, ref)
        if isinstance(obj, Variant):
            return s.get(BaseModel, obj.base_id), obj
        if isinstance(obj, BaseModel):
            return obj, None
        raise UsageError(f"{ref!r} is a {obj.kind} artefact; give a variant (or a base) to learn a prompt on")


def _checkpoint_dir(reg: Registry, target_id: str, data: str, name: str | None) -> Path:
    # Keyed by what the user names, not by the hyper-parameters: a resume with changed
    # options then finds the checkpoint and the loop refuses with the differences listed.
    key = hashlib.sha256(json.dumps([target_id, data, name or ""]).encode()).hexdigest()[:16]
    return reg.cache_dir / "checkpoints" / f"prompt-{key}"




def _load_target(reg: Registry, base: BaseModel, variant: Variant | None, device: str | None):
    return load_stack(reg, StackSpec(base=base, variant=variant), device)


# ---------------------------------------------------------------------------------------
# learn


def learn_prompt_artifact(reg: Registry, variant_ref: str, options: PromptOptions | None = None, *,
                          name: str | None = None, progress: Progress | None = None,
                          **fields: Any) -> tuple[Artifact, dict]:
    """Learn a soft prompt on a variant (or base) and register it as a ``prompt`` artefact.

    ``options``: a ``PromptOptions`` (``fields`` set single fields of it by the same names).
    Training: ``tokens`` embeddings initialised by ``init`` (``vocab-sample`` or
    ``text:<string>``), AdamW at ``lr`` with no weight decay (the paper's Trainer default),
    ``steps`` steps of ``batch_size`` × ``seq_len`` token chunks of ``data``'s train split,
    through ``adapt.loop.train`` with checkpoints (every ``checkpoint_every`` steps, at the
    end, on Ctrl-C) in the registry cache; ``resume`` continues from them. Before/after
    perplexity on ``data``'s test split (at most ``eval_tokens`` tokens) is recorded as
    evaluations and returned in the report. Nothing is registered on error.
    """
    opts = PromptOptions.of(options, fields)
    base, variant = _resolve_target(reg, variant_ref)
    context = _context(base)
    _check_tokens(opts.tokens, context, opts.seq_len)
    train_set = load_dataset(opts.data, "train")
    test_set = load_dataset(opts.data, "test")
    check_new_name(reg, name, command="prompt learn")
    target = variant or base
    ckpt_dir = _checkpoint_dir(reg, target.id, opts.data, name)
    config = TrainConfig(steps=opts.steps, lr=opts.lr, weight_decay=0.0, batch_size=opts.batch_size,
                         seq_len=opts.seq_len, seed=opts.seed, device=str(resolve_device(opts.device)),
                         checkpoint_every=opts.checkpoint_every, checkpoint_dir=str(ckpt_dir))
    config.validate()
    window = eval_window(context, opts.tokens)
    params = dict(variant=variant_ref, name=name, **opts.params())
    if (earlier := earlier_result(reg, name, "prompt learn", params, ignore=PromptOptions.unkeyed())) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "prompt learn", params) as run:
        model, tokenizer = _load_target(reg, base, variant, opts.device)
        test_texts = test_set.as_texts()
        before = perplexity(model, tokenizer, test_texts, max_length=window[0], stride=window[1],
                            max_tokens=opts.eval_tokens, progress=progress)
        prompt, result = _learn(model, tokenizer, train_set, opts, config, base, target, progress)
        prompted = PromptedModel(model, prompt, freeze_inner=False)
        after = perplexity(prompted, tokenizer, test_texts, max_length=window[0], stride=window[1],
                           max_tokens=opts.eval_tokens, progress=progress)
        art_config = {"num_virtual_tokens": prompt.num_virtual_tokens, "hidden_size": prompt.hidden_size,
                      "base": base_label(base), "learned_on": target.name,
                      "learned_on_kind": "variant" if variant else "base", "init": opts.init,
                      "data": opts.data, "steps": opts.steps, "lr": opts.lr, "batch_size": opts.batch_size,
                      "seq_len": opts.seq_len, "seed": opts.seed, "weight_decay": config.weight_decay}
        metrics = {"test_perplexity_before": before["perplexity"],
                   "test_perplexity_after": after["perplexity"], "eval_tokens": before["tokens"],
                   "eval_max_length": window[0], "eval_stride": window[1],
                   "final_loss": result.final_loss, "first_loss": result.losses[0] if result.losses else None,
                   "train_tokens_per_s": result.tokens_per_s, "train_wall_s": result.wall_s,
                   "resumed_from": result.resumed_from}
        art = _register_prompt(reg, prompt, art_config, metrics, StackSpec(base=base, variant=variant), opts, name,
                               run.id)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the artefact is complete; the checkpoint is spent
        _record_before_after(reg, base, variant, art, opts.data, before, after, run.id)
        report = {"name": art.name, "id": art.id, "learned_on": target.name, "tokens": opts.tokens,
                  "steps": opts.steps, "data": opts.data, "perplexity_before": before["perplexity"],
                  "perplexity_after": after["perplexity"], "eval_tokens": before["tokens"],
                  "first_loss": metrics["first_loss"], "final_loss": result.final_loss,
                  "train_wall_s": result.wall_s, "resumed_from": result.resumed_from}
        run.output = report
    return art, report


def _learn(model, tokenizer, train_set, opts: PromptOptions, config: TrainConfig, base: BaseModel, target,
           progress: Progress | None):
    """Train the prompt through the shared loop (checkpoints, resume); (prompt, TrainResult)."""
    def train_fn(module, named, loss_fn, batches, cfg):
        fingerprint = {"target": target.id, "data": opts.data, "tokens": opts.tokens, "init": opts.init}
        return train(module, named, loss_fn, batches, cfg, progress=progress, resume=opts.resume,
                     fingerprint=fingerprint)

    return learn_prompt(model, tokenizer, train_set, opts.tokens, opts.init, config, seq_len=opts.seq_len,
                        batch_size=opts.batch_size, max_batches=max(1, opts.steps), seed=opts.seed,
                        base=base_label(base), learned_on=target.name, train_fn=train_fn)


def _register_prompt(reg: Registry, prompt, art_config: dict, metrics: dict, on: StackSpec, opts: PromptOptions,
                     name: str | None, run_id: str) -> Artifact:
    """Write the prompt folder (safetensors + ``prompt_config.json``) and register it, ``learned-on`` its target."""
    base, variant = on.base, on.variant
    target = variant or base
    with reg.staging("prompt") as tmp:
        folder = Path(tmp) / "prompt"
        folder.mkdir()
        save_prompt(prompt, folder / PROMPT_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(art_config, indent=2, sort_keys=True))
        return register_artifact(reg, kind="prompt", name=name,
                                 stem=None if name else f"prompt-{target.name.replace(':', '-')}-k{opts.tokens}",
                                 base_id=base.id, folder=folder, variant_id=variant.id if variant else None,
                                 source=f"learned:{opts.data}", config=art_config, metrics=metrics,
                                 parents=[(target, "learned-on")], run_id=run_id)


def _record_before_after(reg: Registry, base: BaseModel, variant: Variant | None, art: Artifact, data: str,
                         before: dict, after: dict, run_id: str) -> None:
    """The test perplexity without and with the prompt, as evaluations."""
    split = "test"
    record_evaluations(reg, StackSpec(base=base, variant=variant), data, split,
                       {"perplexity": before["perplexity"], "_details": {"perplexity": before}}, run_id)
    record_evaluations(reg, StackSpec(base=base, variant=variant, prompt=art), data, split,
                       {"perplexity": after["perplexity"], "_details": {"perplexity": after}}, run_id)


# ---------------------------------------------------------------------------------------
# attach




# ---------------------------------------------------------------------------------------
# transfer


def _transfer_targets(reg: Registry, prompts: list[str], variants: list[str]) -> list[tuple[BaseModel,
                                                                                          Variant | None]]:
    """The columns of a transfer matrix: (base, variant or None) per name, all of one base."""
    if not prompts:
        raise UsageError("give at least one prompt (--prompts P1,P2,…)")
    if not variants:
        raise UsageError("give at least one variant (--variants V1,V2,…)")
    if len(set(prompts)) != len(prompts) or len(set(variants)) != len(variants):
        raise UsageError("a prompt or variant is named twice")
    targets = [_resolve_target(reg, v) for v in variants]
    base = targets[0][0]
    for b, v in targets:
        if b.id != base.id:
            raise UsageError(f"{(v or b).name!r} belongs to base {b.name!r}, not {base.name!r}")
    return targets


def prompt_transfer(reg: Registry, prompts: Sequence[str], variants: Sequence[str], data: str,
                    options: TransferOptions | None = None, *, progress: Progress | None = None,
                    **fields: Any) -> dict:
    """Perplexity of every prompt on every variant (and of each variant without a prompt).

    ``options``: a ``TransferOptions`` (``fields`` set single fields of it: ``split``,
    ``max_tokens``, ``plot``, ``device``). Rows: ``no prompt`` then the prompts (where they
    were learned); columns: the variants (a base may be named too). Models are loaded one at
    a time. Each cell is recorded as an evaluation. With ``plot`` a heat map PNG is written
    there. Returns the matrix dict of ``prompt_transfer.transfer_matrix`` plus ``learned_on``
    per row and ``plot``.
    """
    opts = TransferOptions.of(options, fields)
    split, plot, max_tokens, device = opts.split, opts.plot, opts.max_tokens, opts.device
    prompts, variants = [p for p in prompts if p], [v for v in variants if v]
    targets = _transfer_targets(reg, prompts, variants)
    base = targets[0][0]
    with reg.session() as s:
        arts = [reg.resolve(s, p, "artifact") for p in prompts]
    loaded = {a.name: read_prompt_artifact(reg, a, base, _hidden(base)) for a in arts}
    context = _context(base)
    longest = max(p.num_virtual_tokens for p in loaded.values())
    if context is not None and longest >= context:
        raise UsageError(f"a {longest}-token prompt does not fit the model's context of {context}")
    max_length, stride = eval_window(context, longest)
    texts = load_dataset(data, split).as_texts()

    params = dict(prompts=list(prompts), variants=list(variants), data=data, **opts.params())
    with record_run(reg, "prompt transfer", params) as run:
        columns: list[str] = []
        values: list[list[float]] = [[] for _ in range(len(loaded) + 1)]
        tokens = None
        total, done = len(targets) * (len(loaded) + 1), 0
        for b, v in targets:
            model, tokenizer = _load_target(reg, b, v, device)
            column_name = (v or b).name

            def column_progress(desc, completed, count, _done=done):
                if progress:
                    progress("prompt transfer", _done + completed, total)

            part = transfer_matrix(loaded, {column_name: model}, tokenizer, texts, max_tokens=max_tokens,
                                   max_length=max_length, stride=stride, progress=column_progress)
            done += len(part["rows"])
            columns.append(column_name)
            for i, line in enumerate(part["values"]):
                values[i].append(line[0])
            tokens = part["tokens"]
            del model
        rows = [NO_PROMPT, *loaded]
        matrix = {"rows": rows, "columns": columns, "values": values, "metric": "perplexity",
                  "max_length": max_length, "stride": stride, "tokens": tokens, "data": data, "split": split,
                  "learned_on": [None] + [p.learned_on for p in loaded.values()]}
        by_name = {a.name: a for a in arts}
        for (b, v), j in zip(targets, range(len(columns)), strict=False):
            for i, row in enumerate(rows):
                spec = StackSpec(base=b, variant=v, prompt=by_name.get(row))
                value = values[i][j]
                record_evaluations(reg, spec, data, split, {"perplexity": value, "_details": {"perplexity": {
                    "perplexity": value, "tokens": tokens, "max_length": max_length, "stride": stride}}},
                    run.id)
        if plot is not None:
            plot_transfer(matrix, plot, title=f"Soft-prompt transfer: perplexity on {data} {split}")
        matrix["plot"] = str(plot) if plot is not None else None
        run.output = {"rows": rows, "columns": columns,
                      "values": [[None if not math.isfinite(x) else x for x in line] for line in values],
                      "plot": matrix["plot"]}
    return matrix
