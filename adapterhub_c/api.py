"""The public Python API: one function per ``adapt`` command, each returning plain data.

Every function that makes or fetches something returns a frozen :class:`Result` (name, id,
kind, paths, report) instead of registry rows, so a notebook can chain them::

    import adapterhub_c as ah
    reg = ah.open_registry()
    lora = ah.pull("org/some-lora", registry=reg)
    pack = ah.pack(lora.name, density=0.1, registry=reg)

``registry`` is optional everywhere: without it the registry of ``$ADAPTERHUB_HOME`` /
``$ADAPTERHUB_DB_URL`` is opened once and reused. ``progress`` takes a
``progress(description, completed, total)`` callback (the CLI draws it as a bar). Options not
named in a signature are passed on to the workflow function named in its docstring, with
the same names as the command's flags (``--batch-size`` → ``batch_size``).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from adapterhub_c.models.builtin import SMOLLM2, builtin_for
from adapterhub_c.options.batch import BatchExecution, BatchItems, BatchSteps
from adapterhub_c.options.convert import ConvertOptions
from adapterhub_c.options.corpus import DEFAULT_CORPUS
from adapterhub_c.options.export import EXPORT_FORMATS
from adapterhub_c.options.merge import ComposeOptions, MergeOptions
from adapterhub_c.options.pack import PackOptions
from adapterhub_c.options.prompt import PromptOptions, TransferOptions
from adapterhub_c.options.serve import DEFAULT_HOST as SERVE_HOST
from adapterhub_c.options.serve import TOKEN_ENV as SERVE_TOKEN_ENV
from adapterhub_c.options.train import TrainOptions
from adapterhub_c.options.variant import VariantOptions
from adapterhub_c.progress import Progress
from adapterhub_c.registry.kinds import LISTABLE

if TYPE_CHECKING:  # the registry (SQLAlchemy) loads on first use: `adapt --help` never needs it
    from adapterhub_c.registry.store import Registry
DEFAULT_DEMO_BASE = SMOLLM2

# The choice lists and defaults of the commands, resolved on first access (PEP 562). Each is
# read from the light options module that states it (no torch), where the CLI reads it too.
_LAZY_NAMES: dict[str, Callable[[], Any]] = {
    "DEFAULT_CALIB": lambda: _module("options.variant").DEFAULT_CALIB,  # silently unused by recipes needing none
    "RECOVER_METHODS": lambda: _module("options.convert").RECOVER_METHODS,  # adapt convert --recover
    "COMPENSATE_TARGETS": lambda: _module("options.convert").COMPENSATE_TARGETS,  # --recover lowrank --targets
    "PACK_METHODS": lambda: _module("options.pack").METHODS,  # adapt pack --method
    "MERGE_METHODS": lambda: _module("options.merge").METHODS,  # adapt merge --method
    "RESCALES": lambda: _module("options.merge").RESCALES,
    "DISTILL_ON": lambda: _module("options.convert").DISTILL_ON,
    "GRANULARITIES": lambda: _module("options.variant").GRANULARITIES,
    "PRUNE_METHODS": lambda: _module("options.variant").PRUNE_METHODS,
    "QUANT_METHODS": lambda: _module("options.variant").QUANT_METHODS,
    "TRAIN_DEFAULTS": lambda: _module("options.train").TrainOptions.defaults(),
    "CONVERT_DEFAULTS": lambda: _module("options.convert").ConvertOptions.defaults(),
}


def _module(name: str):
    return importlib.import_module(f"adapterhub_c.{name}")


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = _LAZY_NAMES[name]()
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterhub_c.api' has no attribute {name!r}")

__all__ = [
    "Result", "open_registry", "add_base", "create_variant", "list_variants", "show_variant", "export", "pull",
    "add_variant", "search", "train", "convert", "TrainOptions", "ConvertOptions", "PackOptions", "VariantOptions", "MergeOptions",
    "ComposeOptions", "PromptOptions", "TransferOptions", "replay_merge",
    "BatchItems", "BatchSteps", "BatchExecution",
    "pack", "unpack", "inspect_pack", "merge", "compose", "learn_prompt", "transfer_prompts", "push", "evaluate",
    "generate", "load", "list_objects", "show", "lineage", "remove", "gc", "run_batch", "batch_status",
    "serve_hub", "serve", "demo", "LISTABLE", "DEFAULT_DEMO_BASE", "DEFAULT_CORPUS", "EXPORT_FORMATS", "SERVE_HOST", "SERVE_TOKEN_ENV",
]
__all__.extend(_LAZY_NAMES)  # the choice lists and defaults the commands offer


@dataclass(frozen=True)
class Result:
    """What a command made or found.

    ``kind``: base, variant, an artefact kind (lora, recovered-lora, pack, merged, composed,
    prompt), or folder / evaluation / generation / push. ``paths``: file name → path on disk
    (blob store files for registry objects, written files for unpack). ``report``: the
    command's figures (what ``--json`` prints). ``created`` is False when the object was
    already there (re-runs are idempotent). ``warnings``: messages the CLI prints as warnings,
    also raised through :mod:`warnings` while the command ran.
    """

    name: str
    id: str
    kind: str
    paths: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    created: bool = True
    warnings: tuple[str, ...] = ()


_default_registries: dict[tuple[str | None, str | None], Registry] = {}


def open_registry(home: str | Path | None = None, db: str | None = None) -> Registry:
    """The registry at ``home`` (default ``$ADAPTERHUB_HOME`` or ``~/.cache/adapterhub_c``) or URL ``db``.

    Created and migrated to the current schema on first use.
    """
    from adapterhub_c.registry.store import Registry

    return Registry(url=db, home=home)


def _reg(registry: Registry | None) -> Registry:
    """``registry``, or the one the environment names (opened once per home / URL)."""
    if registry is not None:
        return registry
    key = (os.environ.get("ADAPTERHUB_HOME"), os.environ.get("ADAPTERHUB_DB_URL"))
    if key not in _default_registries:
        _default_registries[key] = open_registry()
    return _default_registries[key]


def _kind(row) -> str:
    from adapterhub_c.registry.models import Artifact, BaseModel, Variant

    if isinstance(row, BaseModel):
        return "base"
    if isinstance(row, Variant):
        return "variant"
    return row.kind if isinstance(row, Artifact) else type(row).__name__.lower()


def _result(reg: Registry, row, report: dict | None = None, created: bool | None = None) -> Result:
    report = dict(report or {})
    if created is None:  # a rerun of a finished (or killed after registering) command: nothing new
        created = not report.get("already_done")
    paths = {f: str(reg.blobs.path_for(d)) for f, d in sorted((row.files or {}).items())}
    return Result(name=row.name, id=row.id, kind=_kind(row), paths=paths, report=report, created=created,
                  warnings=tuple(report.get("warnings") or ()))


# ---- bases and variants -------------------------------------------------------------------


def add_base(name: str, *, revision: str | None = None, allow_pickle: bool = False, token: str | None = None,
             registry: Registry | None = None, progress: Progress | None = None) -> Result:
    """Register a base: ``builtin:smollm2-135m``, ``builtin:tiny-llama``, or a Hub repo ``REPO[@REV]``.

    A Hub id that names a built-in (e.g. the SmolLM2 repo) without a revision is served by the
    built-in copy, offline. Idempotent: ``created`` is False when it was registered already.
    """
    from adapterhub_c.workflows import bases as _bases
    from adapterhub_c.workflows import pull as _hub
    reg = _reg(registry)
    if name.startswith("builtin:") or (builtin_for(name) is not None and not revision and "@" not in name):
        row, created = _bases.add_builtin_base(reg, name, progress=progress)
    else:
        row, created = _hub.add_hub_base(reg, name, revision=revision, allow_pickle=allow_pickle, token=token,
                                         progress=progress)
    return _result(reg, row, {"params": row.params, "hub_id": row.hub_id, "created": created}, created)


def create_variant(base: str, options: VariantOptions | None = None, *, name: str | None = None,
                   registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> Result:
    """A compressed variant of ``base`` (see ``workflows.variants.create_variant``).

    ``options``: a :class:`VariantOptions` (``api.VariantOptions``); ``fields`` set single fields
    of it by name (``quant="nf4"``, ``prune="wanda"``, ``sparsity=0.5``, …), as the command's
    flags do. ``calib``: calibration data for wanda, 2:4 and ffn-channels (``"none"`` or None:
    magnitude scores). The same recipe on the same base returns the existing variant
    (``created`` False).
    """
    from adapterhub_c.workflows import variants as _variants
    reg = _reg(registry)
    row, created = _variants.create_variant(reg, base, options, name=name, progress=progress, **fields)
    report = {**_variants.show_variant(reg, row.id), "created": created}
    if not created and name is not None and name != row.name:
        report["warnings"] = [_variants.same_recipe_warning(row.name, name)]
    return _result(reg, row, report, created)


def add_variant(repo: str, base: str, options: Any = None, *, name: str | None = None, token: str | None = None,
                registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> Result:
    """Register the pre-quantized checkpoint ``repo`` (Hub ``owner/name[@rev]`` or a local folder:
    compressed-tensors, GPTQ, bitsandbytes) as a variant of ``base``, its files stored as they are
    (see ``workflows.imports.add_variant``). ``options``: a ``VariantAddOptions`` (``fields`` set
    single fields: revision, include, exclude, eval_tokens, device). The same checkpoint on the
    same base returns the existing variant (``created`` False)."""
    from adapterhub_c.workflows import imports as _imports
    from adapterhub_c.workflows import variants as _variants
    reg = _reg(registry)
    row, created = _imports.add_variant(reg, repo, base, options, name=name, token=token, progress=progress,
                                        **fields)
    report = {**_variants.show_variant(reg, row.id), "created": created,
              "warnings": list((row.stats or {}).get("warnings") or [])}
    return _result(reg, row, report, created)


def show_variant(name: str, *, registry: Registry | None = None) -> dict[str, Any]:
    """One variant: recipe, storage form, sizes next to the fp16 base, perplexity."""
    from adapterhub_c.workflows import variants as _variants
    return _variants.show_variant(_reg(registry), name)




def export(variant: str, out: str | Path, fmt: str = "hf", *, force: bool = False, registry: Registry | None = None,
           progress: Progress | None = None, on_variant: str | None = None) -> Result:
    """Write ``variant`` as a standalone folder (``hf``, ``compressed-tensors`` or ``gguf``: llama.cpp + ollama);
    an adapter's name exports (``gguf``) its GGUF LoRA with the GGUF of its model (``on_variant``, default its
    own variant or base) and an ollama Modelfile."""
    from adapterhub_c.workflows import exports as _exports
    reg = _reg(registry)
    res, row = _exports.export(reg, variant, out, fmt, variant=on_variant, force=force, progress=progress)
    paths = {f["path"]: str(Path(res.out) / f["path"]) for f in res.files}
    return Result(name=row.name, id=row.id, kind="folder", paths=paths, report=res.to_dict())


def list_variants(base: str | None = None, *, registry: Registry | None = None) -> list[dict[str, Any]]:
    """Every variant (of ``base``): recipe, parameters kept, sizes, perplexity."""
    from adapterhub_c.workflows import variants as _variants
    return _variants.list_variants(_reg(registry), base=base)


# ---- the Hub --------------------------------------------------------------------------------


def pull(repo: str, *, revision: str | None = None, name: str | None = None, registry: Registry | None = None,
         progress: Progress | None = None, **options: Any) -> Result:
    """Pull a LoRA ``REPO[@REV]`` from the Hub (options: include, exclude, allow_pickle, with_base, token,
    base: attach to this registered base whatever the adapter's config names; the shape check decides)."""
    from adapterhub_c.workflows import pull as _hub
    reg = _reg(registry)
    art, created = _hub.pull_adapter(reg, repo, revision=revision, name=name, progress=progress, **options)
    base = reg.get(art.base_id, "base")
    report = {"name": art.name, "id": art.id, "kind": art.kind, "source": art.source, "base": base.name,
              "base_reference_only": base.is_reference, "size_bytes": art.size_bytes, "created": created,
              "warnings": [_hub.reference_warning(base.name, art.name)] if base.is_reference else []}
    return _result(reg, art, report, created)


def search(base: str, *, limit: int = 50, token: str | None = None,
           registry: Registry | None = None) -> list[dict[str, Any]]:
    """LoRA adapters of ``base`` on the Hub, with what is already pulled."""
    from adapterhub_c.workflows import search as _hub
    return _hub.search_adapters_for(_reg(registry), base, limit=limit, token=token)


def push(name: str, repo_id: str, *, registry: Registry | None = None, progress: Progress | None = None,
         **options: Any) -> Result:
    """Push artefact or variant ``name`` to Hub repo ``repo_id`` (options: private, fmt, commit_message, dry_run, token)."""
    from adapterhub_c.workflows import push as _hub
    reg = _reg(registry)
    out = _hub.push_artifact(reg, name, repo_id, progress=progress, **options)  # an artefact or a variant
    row = reg.get(name)
    return Result(name=row.name, id=row.id, kind="push", report=out, created=bool(out.get("uploaded")))


def serve_hub(root: str | Path, **options: Any) -> None:
    """Serve Hub repos from ``root`` until interrupted (options: host, port, token, ready, warn)."""
    from adapterhub_c.hubserver import server as _hub
    _hub.serve_hub(root, **options)


# ---- training, conversion, prompts ----------------------------------------------------------



def train(target: str, data: str, options: TrainOptions | None = None, *, name: str | None = None,
          registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> Result:
    """Train a LoRA on ``target`` (a base or variant) with ``data`` (see ``workflows.training.train_adapter``).

    ``options``: a :class:`TrainOptions` (``api.TrainOptions``); ``fields`` set single fields of
    it by name (``steps=20``, ``rank=8``, …), as the command's flags do.
    """
    from adapterhub_c.workflows import training as _training
    reg = _reg(registry)
    art, report = _training.train_adapter(reg, target, data, options, name=name, progress=progress, **fields)
    return _result(reg, art, report)


def convert(adapter: str, variant: str, options: ConvertOptions | None = None, *, name: str | None = None,
            registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> Result:
    """Carry ``adapter`` to compressed ``variant`` (CA-LoRA; see ``workflows.training.convert_adapter``).

    ``options``: a :class:`ConvertOptions` (``api.ConvertOptions``); ``fields`` set single fields
    of it by name (``data=…``, ``recover="lowrank"``, ``steps=20``, …), as the command's flags do.
    """
    from adapterhub_c.workflows import training as _training
    reg = _reg(registry)
    art, report = _training.convert_adapter(reg, adapter, variant, options, name=name, progress=progress, **fields)
    return _result(reg, art, report)


def learn_prompt(variant: str, options: PromptOptions | None = None, *, name: str | None = None,
                 registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> Result:
    """Learn a soft prompt on ``variant`` (see ``workflows.prompts.learn_prompt_artifact``).

    ``options``: a :class:`PromptOptions` (``api.PromptOptions``); ``fields`` set single fields
    of it by name (``tokens=16``, ``steps=30``, ``data=…``, …), as the command's flags do.
    """
    from adapterhub_c.workflows import prompts as _prompts
    reg = _reg(registry)
    art, report = _prompts.learn_prompt_artifact(reg, variant, options, name=name, progress=progress, **fields)
    return _result(reg, art, report)


def transfer_prompts(prompts: Sequence[str], variants: Sequence[str], data: str,
                     options: TransferOptions | None = None, *, registry: Registry | None = None,
                     progress: Progress | None = None, **fields: Any) -> dict[str, Any]:
    """Perplexity of every prompt on every variant (see ``workflows.prompts.prompt_transfer``).

    ``options``: a :class:`TransferOptions`; ``fields`` set single fields of it (``split``,
    ``max_tokens``, ``plot``, ``device``).
    """
    from adapterhub_c.workflows import prompts as _prompts
    return _prompts.prompt_transfer(_reg(registry), list(prompts), list(variants), data, options,
                                    progress=progress, **fields)


# ---- packs, merges, composition -------------------------------------------------------------


def pack(adapter: str, density: float | str, options: PackOptions | None = None, *, name: str | None = None,
         registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> Result:
    """ComPEFT-pack ``adapter`` keeping ``density`` of its values (see ``workflows.packs.pack_artifact``).

    ``options``: a :class:`PackOptions` (``api.PackOptions``); ``fields`` set single fields of it
    by name (``alpha="auto"``, ``method="compeft"``, …), as the command's flags do.
    """
    from adapterhub_c.workflows import packs as _packs
    reg = _reg(registry)
    art, report = _packs.pack_artifact(reg, adapter, options, name=name, progress=progress,
                                       **{**fields, "density": density})
    return _result(reg, art, report)


def unpack(pack: str, out: str | Path | None = None, *, registry: Registry | None = None) -> Result:
    """Decode ``pack`` into a PEFT folder at ``out`` (default ``./<pack name>``)."""
    from adapterhub_c.workflows import packs as _packs
    reg = _reg(registry)
    folder = _packs.unpack_artifact(reg, pack, out)
    art = reg.get(pack, "artifact")
    paths = {p.name: str(p) for p in sorted(folder.iterdir())}
    return Result(name=art.name, id=art.id, kind="folder", paths=paths, report={"pack": pack, "path": str(folder)})


def inspect_pack(pack_or_path: str | Path, *, registry: Registry | None = None) -> dict[str, Any]:
    """Per-tensor density, scale and bits of a pack artefact or a pack file."""
    from adapterhub_c.workflows import packs as _packs
    path = Path(pack_or_path)
    return _packs.inspect_pack_ref(None if path.is_file() else _reg(registry), pack_or_path)


def merge(adapters: Sequence[str], method: str | None = None, options: MergeOptions | None = None, *,
          name: str | None = None, registry: Registry | None = None, progress: Progress | None = None,
          **fields: Any) -> Result:
    """Merge ``adapters`` with ``method`` (see ``workflows.merges.merge_artifacts``).

    ``options``: a :class:`MergeOptions` (``api.MergeOptions``, which names the method too);
    ``fields`` set single fields of it by name (``density=0.5``, ``weights=[1, 0.5]``, …), as
    the command's flags do.
    """
    from adapterhub_c.workflows import merges as _merges
    reg = _reg(registry)
    if method is not None:
        fields["method"] = method
    art, report = _merges.merge_artifacts(reg, list(adapters), options, name=name, progress=progress, **fields)
    return _result(reg, art, report)


def replay_merge(config: str | Path, *, name: str | None = None, device: str | None = None,
                 registry: Registry | None = None, progress: Progress | None = None) -> Result:
    """Re-run the merge a ``merge_config.yaml`` records (a file, or its text) and register the result.

    As ``merge`` does (one run, idempotent by ``name``); the inputs are found by their recorded
    id, else name, and one whose weights changed since is refused (see
    ``workflows.merges.replay_merge_artifact``).
    """
    from adapterhub_c.workflows import merges as _merges
    reg = _reg(registry)
    art, report = _merges.replay_merge_artifact(reg, config, name=name, device=device, progress=progress)
    return _result(reg, art, report)


def compose(adapters: Sequence[str], examples: str | None = None, options: ComposeOptions | None = None, *,
            name: str | None = None, registry: Registry | None = None, progress: Progress | None = None,
            **fields: Any) -> Result:
    """LoraHub composition of ``adapters`` searched on ``examples`` (see ``workflows.merges.compose_artifacts``).

    ``options``: a :class:`ComposeOptions` (``api.ComposeOptions``, which names the examples
    too); ``fields`` set single fields of it by name (``shots=5``, ``budget=40``, …).
    """
    from adapterhub_c.workflows import merges as _merges
    reg = _reg(registry)
    if examples is not None:
        fields["examples"] = examples
    art, report = _merges.compose_artifacts(reg, list(adapters), options, name=name, progress=progress, **fields)
    report = {**report, "curve_summary": _merges.summarize_curve(report["curve"])}
    return _result(reg, art, report)


# ---- using a stack --------------------------------------------------------------------------


def evaluate(target: str, data: str, *, registry: Registry | None = None, progress: Progress | None = None,
             **options: Any) -> Result:
    """Measure ``target`` (+ variant / adapter / prompt options) on ``data``; results are recorded."""
    from adapterhub_c.workflows import evals as _evals
    reg = _reg(registry)
    row = _evals.run_eval(reg, target, data, progress=progress, **options)
    return Result(name=row["target"], id="", kind="evaluation", report=row)


def generate(target: str, text: str, *, registry: Registry | None = None, **options: Any) -> Result:
    """Greedy continuation of ``text``; ``report["text"]`` holds it."""
    from adapterhub_c.workflows import evals as _evals
    out = _evals.run_generate(_reg(registry), target, text, **options)
    return Result(name=target, id="", kind="generation", report={"text": out})


def load(target: str, adapter: str | None = None, prompt: str | None = None, *, variant: str | None = None,
         device: str | None = "cpu", registry: Registry | None = None):
    """``(model, tokenizer)`` of a stack in eval mode: base or variant, then adapter, then prompt."""
    from adapterhub_c.runtime.stack import load_stack, resolve_stack
    reg = _reg(registry)
    return load_stack(reg, resolve_stack(reg, target, variant, adapter, prompt), device)


# ---- the registry ---------------------------------------------------------------------------


def list_objects(what: str = "artifacts", *, limit: int | None = None,
                 registry: Registry | None = None) -> list[dict[str, Any]]:
    """Bases, variants, artifacts or runs as dicts."""
    from adapterhub_c.registry import views

    return views.list_objects(_reg(registry), what, limit=limit)


def show(ref: str, *, registry: Registry | None = None) -> dict[str, Any]:
    """Everything about one base, variant or artefact."""
    from adapterhub_c.registry import views

    return views.show_object(_reg(registry), ref)


def lineage(ref: str, *, registry: Registry | None = None) -> dict[str, Any]:
    """Where ``ref`` comes from and what derives from it, as a tree."""
    from adapterhub_c.registry import views

    return views.lineage_tree(_reg(registry), ref)


def remove(ref: str, *, cascade: bool = False, registry: Registry | None = None) -> list[str]:
    """Remove ``ref`` (and with ``cascade`` everything derived); returns the names removed."""
    from adapterhub_c.registry import views

    return views.remove(_reg(registry), ref, cascade=cascade)


def gc(*, dry_run: bool = False, registry: Registry | None = None) -> dict[str, Any]:
    """Delete unreferenced blobs and dead writers' temp files."""
    from adapterhub_c.registry import views

    return views.collect_garbage(_reg(registry), dry_run=dry_run)


# ---- many at once ---------------------------------------------------------------------------


def run_batch(variant: str | None = None, *, name: str | None = None,
              convert: ConvertOptions | dict[str, Any] | None = None, items: BatchItems | None = None,
              steps: BatchSteps | None = None, execution: BatchExecution | None = None,
              registry: Registry | None = None, progress: Progress | None = None, **fields: Any) -> dict:
    """Pull, convert, pack, evaluate and push many adapters to ``variant`` (see ``batch.ops.run_batch``).

    ``convert``: a :class:`ConvertOptions`; ``items`` / ``steps`` / ``execution``: the
    :class:`BatchItems`, :class:`BatchSteps` and :class:`BatchExecution` of the batch, or
    their fields as keywords (``sources=[...]``, ``pack_density=0.1``, ``workers=2``, …).
    """
    from adapterhub_c.batch import ops as _batch
    return _batch.run_batch(_reg(registry), variant=variant, name=name, convert=convert, items=items, steps=steps,
                            execution=execution, progress=progress, **fields)


def batch_status(name: str, *, registry: Registry | None = None) -> dict[str, Any]:
    """The items of batch ``name``: state, attempts, errors, results."""
    from adapterhub_c.batch import ops as _batch
    return _batch.batch_status(_reg(registry), name)




def serve(target: str, *, host: str | None = None, port: int = 8000, registry: Registry | None = None,
          ready: Callable | None = None, warn: Callable[[str], None] | None = None, **options: Any) -> None:
    """Serve ``target`` and its adapters behind an OpenAI-compatible API until interrupted.

    ``options`` are the fields of ``serve.server.ServeOptions`` (adapters, all, max_resident,
    max_resident_mb, token, device, allow_pull, log_requests, max_batch, batch_window_ms);
    ``ready(endpoint, server)`` is called once listening.
    """
    from adapterhub_c.serve import server as _serve
    host = host or SERVE_HOST
    _serve.serve(_reg(registry), target, _serve.ServeOptions(**options), host=host, port=port, ready=ready,
                 warn=warn)


def demo(*, base: str = SMOLLM2, max_tokens: int | None = None, registry: Registry | None = None,
         progress: Progress | None = None) -> Iterator[tuple[str, list[dict]]]:
    """The whole flow on ``base``, yielding (title, rows) per step as it goes."""
    from adapterhub_c import demo_flow as _demo
    yield from _demo.run_demo(_reg(registry), base=base, max_tokens=max_tokens, progress=progress)


# ---- the registry web page (adapt ui) and what it shows ------------------------------------


def registry_summary(*, runs: int = 10, registry: Registry | None = None) -> dict[str, Any]:
    """Counts per kind, blob disk use and what ``gc`` would reclaim, the latest and the failed runs."""
    from adapterhub_c.registry import pages as _pages
    return _pages.summary(_reg(registry), runs=runs)


def model_tree(base: str, *, page: int = 1, per_page: int = 50, registry: Registry | None = None) -> dict[str, Any]:
    """Base → variants (recipe, sizes, perplexity) → adapters → packs / merges / compositions / prompts."""
    from adapterhub_c.registry import pages as _pages
    from adapterhub_c.workflows.variants import variant_summary
    return _pages.model_tree(_reg(registry), base, page=page, per_page=per_page, describe_variant=variant_summary)


def show_page(ref: str, *, registry: Registry | None = None) -> dict[str, Any]:
    """``show`` plus file sizes, evaluation intervals, the run that made it (and its command line), pictures."""
    from adapterhub_c.registry import pages as _pages
    return _pages.detail(_reg(registry), ref)


def compare(artifacts: Sequence[str] = (), *, task: str | None = None, variant: str | None = None,
            registry: Registry | None = None) -> dict[str, Any]:
    """Evaluations of ``artifacts`` (or all adapters of ``task`` on ``variant``) side by side, with references."""
    from adapterhub_c.registry import pages as _pages
    return _pages.compare(_reg(registry), list(artifacts), task=task, variant=variant)


def list_runs(*, command: str | None = None, status: str | None = None, page: int = 1, per_page: int = 50,
              registry: Registry | None = None) -> dict[str, Any]:
    """Runs newest first, filtered by command and status, one page at a time."""
    from adapterhub_c.registry import pages as _pages
    return _pages.list_runs(_reg(registry), command=command, status=status, page=page, per_page=per_page)


def find(query: str = "", *, kind: str | None = None, base: str | None = None, page: int = 1, per_page: int = 50,
         registry: Registry | None = None) -> dict[str, Any]:
    """Bases, variants and artefacts of the registry by name, Hub repo or tag (``search`` asks the Hub)."""
    from adapterhub_c.registry import pages as _pages
    return _pages.search(_reg(registry), query, kind=kind, base=base, page=page, per_page=per_page)


def ui(*, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, home: str | Path | None = None,
       db: str | None = None, registry: Registry | None = None, ready: Callable | None = None) -> None:
    """Serve the read-only registry page until interrupted (``ready(url, needs_token)`` once listening).

    The registry (``registry``, or the one ``home`` / ``db`` name) is opened and read before
    anything binds; a non-loopback ``host`` needs ``token`` (or ``$ADAPTERHUB_UI_TOKEN``)."""
    from adapterhub_c.ui import server as _ui
    reg = registry if registry is not None else _ui.open_checked(home=home, db=db)
    _ui.serve_ui(reg, host=host, port=port, token=token, ready=ready)


def ui_command(*, home: str | Path | None = None, db: str | None = None) -> str:
    """The ``adapt ui`` command line that browses the registry at ``home`` / ``db`` (a password in
    ``db`` is not spelled out: the line then reads the URL from ``$ADAPTERHUB_DB_URL``)."""
    import shlex

    from adapterhub_c.registry.db import describe_url
    words = ["adapt"]
    if home:
        words += ["--home", shlex.quote(str(home))]
    if db:
        words += ["--db", shlex.quote(db) if describe_url(db) == db else '"$ADAPTERHUB_DB_URL"']
    return " ".join([*words, "ui"])


__all__.extend(["registry_summary", "model_tree", "show_page", "compare", "list_runs", "find", "ui", "ui_command"])
