"""Registry operations on packs: pack an adapter artefact, decode, unpack, inspect.

A pack artefact is a folder of two files at most:

- ``pack.safetensors``: the pack file (:mod:`.format`), made for the base recorded as
  ``adapters.load.base_label(base)`` and carrying the registry digest of the source's
  ``adapter_model.safetensors`` as its source digest;
- ``alpha_curve.png``: the alpha search curve, when alpha was chosen with ``auto``.

The artefact row has kind ``pack``, the source's base and variant, a ``packed-from``
lineage edge to the source, and in ``config`` the pack parameters, sizes (pack file,
fp16 safetensors of the same tensors, source files) and the alpha search curve.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save

from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.lora import WEIGHTS_NAME
from adapterhub_c.errors import AdaptWarning, IntegrityError, UsageError
from adapterhub_c.evals.data import load_dataset
from adapterhub_c.options.pack import PackOptions
from adapterhub_c.packing.alpha import (
    SEARCH_WINDOW,
    AdapterSlot,
    evaluate_for_search,
    plot_alpha_curve,
    resolve_metric,
    search_alpha,
    search_grid,
)
from adapterhub_c.packing.compeft import check_params
from adapterhub_c.packing.format import Pack, inspect_pack, pack_adapter, write_pack
from adapterhub_c.registry.artifacts import already_done_report, check_new_name, earlier_result, register_artifact
from adapterhub_c.registry.kinds import ADAPTER_KINDS, LORA_KINDS, PACK_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.runtime.bases import base_label
from adapterhub_c.runtime.packs import PACK_FILE, base_of, loaded_from_pack
from adapterhub_c.runtime.stack import StackSpec, load_stack
from adapterhub_c.training.recovery import FILE_NAME, recovery_file_bytes

CURVE_FILE = "alpha_curve.png"
INFO_FILE = "adapterhub_c.json"


def _pack_options(options: PackOptions | None, fields: dict[str, Any]) -> PackOptions:
    """``options`` with ``fields`` set (or ``PackOptions`` from ``fields``)."""
    if options is None:
        return PackOptions.from_params(fields)
    return options.replace(**fields) if fields else options


# ---- packing -------------------------------------------------------------------------------
def _fp16_bytes(loaded: LoadedAdapter) -> int:
    """Size of one fp16 safetensors file holding every tensor of the adapter."""
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in loaded.lora.tensors.items()}
    tensors.update({f"recovery::{k}": v.half().contiguous() for k, v in (loaded.recovery_state or {}).items()})
    return len(st_save(tensors))


def _null_modules(loaded: LoadedAdapter) -> list[str]:
    """Modules whose LoRA update the pack wiped out (all of A or all of B pruned, ΔW = 0).

    With ``scope="global"`` this happens when one factor's entries are much larger than
    the other's: the global top-k then keeps only the larger factor."""
    return sorted(m for m, layer in loaded.lora.layers().items() if not (layer.A.any() and layer.B.any()))


def _pack_warnings(null_modules: list[str], scope: str) -> list[str]:
    """What a user should hear about a pack that was written."""
    if not null_modules:
        return []
    hint = "; --scope tensor keeps every module" if scope == "global" else ""
    return [f"the pack zeroes the whole update of {len(null_modules)} module(s) (no kept entry in A or in B){hint}"]


def _default_stem(source: str, density: float) -> str:
    pct = f"{density * 100:.4g}".replace(".", "p")
    return f"{source}-k{pct}"


def _pack_loaded(loaded: LoadedAdapter, *, density, alpha, scope, method, encoding, base, source_digest) -> Pack:
    return pack_adapter(loaded.lora, density=density, alpha=alpha, scope=scope, method=method, encoding=encoding,
                        base=base, source_digest=source_digest, recovery_state=loaded.recovery_state,
                        recovery_config=loaded.recovery_config.to_dict() if loaded.recovery_state else None)


class _Evaluator:
    """The source's stack (base or its variant) loaded once, adapter weights swapped in."""

    def __init__(self, reg: Registry, base: BaseModel, variant: Variant | None, first: LoadedAdapter,
                 opts: PackOptions):
        self.dataset = load_dataset(opts.eval_data, "validation")
        self.metric = resolve_metric(opts.alpha_metric, self.dataset.is_task)
        self.max_tokens, self.max_examples = opts.max_tokens, opts.max_examples
        model, self.tokenizer = load_stack(reg, StackSpec(base=base, variant=variant), opts.device)
        self.slot = AdapterSlot(model, first)

    def __call__(self, adapter: LoadedAdapter) -> dict[str, float]:
        self.slot.set(adapter)
        return evaluate_for_search(self.slot.model, self.tokenizer, self.dataset, self.metric,
                                   self.max_tokens, self.max_examples)


def _search_budget(is_task: bool, max_tokens: int | None, max_examples: int | None) -> dict:
    """What the alpha search scored: tokens of text, or the first examples of a task."""
    if is_task:
        return {"max_tokens": None, "window": None, "max_examples": max_examples}
    return {"max_tokens": max_tokens, "window": SEARCH_WINDOW, "max_examples": None}


def _pack_source(reg: Registry, adapter_ref: str) -> tuple[Artifact, BaseModel, Variant | None, str]:
    """(source artefact, its base, its variant, the digest of its weights file), checked packable."""
    with reg.session() as s:
        src = reg.resolve(s, adapter_ref, "artifact")
        if src.kind not in ADAPTER_KINDS:
            raise UsageError(f"{src.name!r} is a {src.kind}, not an adapter")
        if src.kind not in LORA_KINDS:
            raise UsageError(f"{src.name!r} is already a pack; pack its source instead")
        base = s.get(BaseModel, src.base_id)
        variant = s.get(Variant, src.variant_id) if src.variant_id else None
    source_digest = (src.files or {}).get(WEIGHTS_NAME)
    if not source_digest:
        raise UsageError(f"{src.name!r} has no {WEIGHTS_NAME}")
    return src, base, variant, source_digest


class _Packing:
    """One pack command's state: the options, the loaded source and, with eval data, its evaluator."""

    def __init__(self, opts: PackOptions, loaded: LoadedAdapter, label: str, source_digest: str):
        self.opts, self.loaded = opts, loaded
        self.kw = dict(density=opts.density, scope=opts.scope, method=opts.method, encoding=opts.encoding,
                       base=label, source_digest=source_digest)
        self.evaluator: _Evaluator | None = None
        self.reference: dict | None = None

    def load_evaluator(self, reg: Registry, base: BaseModel, variant: Variant | None, progress) -> None:
        """The source's stack loaded once for the alpha search / quality, and the unpacked reference."""
        if progress:
            progress("loading model", 0, 1)
        self.evaluator = _Evaluator(reg, base, variant, self.loaded, self.opts)
        if progress:
            progress("loading model", 1, 1)
        self.reference = self.evaluator(self.loaded)

    def pack(self, alpha: float) -> Pack:
        return _pack_loaded(self.loaded, alpha=alpha, **self.kw)

    def search(self, folder: Path, title: str, progress) -> dict:
        """``--alpha auto``: every alpha of the method's grid scored, the curve drawn into ``folder``."""
        o, ev = self.opts, self.evaluator
        grid = search_grid(o.method)
        best, curve = search_alpha(lambda a: ev(loaded_from_pack(self.pack(a))), ev.metric, grid, progress)
        plot_alpha_curve(curve, folder / CURVE_FILE, ev.metric, best, self.reference, title=title)
        return {"data": o.eval_data, "split": "validation", "metric": ev.metric, "grid": list(grid), "best": best,
                "curve": curve, "unpacked": self.reference,
                **_search_budget(ev.dataset.is_task, o.max_tokens, o.max_examples)}

    def quality(self, pack: Pack, alpha: float, search: dict | None) -> dict | None:
        """Pack vs unpacked on the validation split (None without eval data)."""
        if self.evaluator is None:
            return None
        packed = (next(p for p in search["curve"] if p["alpha"] == alpha) if search
                  else self.evaluator(loaded_from_pack(pack)))
        return {"data": self.opts.eval_data, "split": "validation", "metric": self.evaluator.metric,
                "unpacked": self.reference, "pack": {k: v for k, v in packed.items() if k != "alpha"}}


def _pack_config(reg: Registry, src: Artifact, job: _Packing, pack: Pack, stats: dict, pack_file: Path,
                 search: dict | None) -> dict:
    """The pack artefact's config: its parameters, provenance, sizes and the alpha search."""
    o, loaded, t = job.opts, job.loaded, stats["totals"]
    fp16, pack_bytes = _fp16_bytes(loaded), pack_file.stat().st_size
    return {
        "density": o.density, "alpha": float(pack.alpha), "alpha_auto": search is not None,
        "scope": o.scope, "encoding": o.encoding, "method": o.method, "format_file": PACK_FILE,
        "source": src.name, "source_kind": src.kind, "source_digest": job.kw["source_digest"],
        "source_recovery_digest": (src.files or {}).get("recovery.safetensors"),
        "pack_digest": stats["pack_digest"], "base": job.kw["base"],
        "recovery": loaded.recovery_state is not None,
        "recovery_config": stats.get("recovery_config"),
        "params": t["numel"], "nnz": t["nnz"], "raw_bytes": stats["raw_bytes"],
        "pack_bytes": pack_bytes, "fp16_bytes": fp16,
        "source_bytes": sum(reg.blobs.path_for(d).stat().st_size for d in (src.files or {}).values()),
        "ratio_vs_fp16": fp16 / pack_bytes,
        "bits_per_param": t["bits_per_param"], "entropy_bits_per_param": t["entropy_bits_per_param"],
        "ratio_to_bound": t["ratio_to_bound"], "null_modules": _null_modules(loaded_from_pack(pack)),
        "alpha_search": search,
    }


def _quality_metrics(quality: dict | None) -> dict:
    if not quality:
        return {}
    metrics = {f"validation_{k}": v for k, v in quality["pack"].items()}
    metrics.update({f"unpacked_validation_{k}": v for k, v in quality["unpacked"].items()})
    return metrics


def _run_output(report: dict, search: dict | None) -> dict:
    """What the run row keeps: the report, the curve keyed by alpha (run outputs keep dicts, not lists)."""
    output = {k: v for k, v in report.items() if k not in ("recovery_config", "alpha_search")}
    if search is not None:
        output["alpha_search"] = {**{k: v for k, v in search.items() if k != "curve"},
                                  "curve": {f"{p['alpha']:g}": {k: v for k, v in p.items() if k != "alpha"}
                                            for p in search["curve"]}}
    return output


def pack_artifact(reg: Registry, adapter_ref: str, options: PackOptions | None = None, *, name: str | None = None,
                  progress=None, **fields: Any) -> tuple[Artifact, dict]:
    """Pack an adapter artefact (lora, recovered-lora, merged, composed) and register it.

    ``options``: a ``PackOptions`` (``fields`` set single fields of it, by the same names:
    ``density=0.1``, ``alpha="auto"``, …). ``method``: ``delta-fit`` (default,
    :mod:`adapterhub_c.packing.deltafit`; ``alpha`` is a gain on the fitted update),
    ``compeft`` (the paper's alpha·std) or ``stc``.
    ``alpha="auto"`` evaluates the method's grid (:func:`.alpha.search_grid`) on the validation split of
    ``eval_data`` (see :mod:`.alpha` for the criterion), keeps the best, stores the curve in
    the artefact config and the run output and draws it as ``alpha_curve.png``. With a
    number and ``eval_data``, the pack and its source are both evaluated. The model is
    built once in both cases. Returns (artefact, report).
    """
    opts = _pack_options(options, fields)
    check_params(opts.density, 1.0, opts.scope, opts.method)
    if opts.alpha == "auto":
        search_grid(opts.method)  # an unknown grid fails here, before anything is loaded
    if opts.eval_data:
        resolve_metric(opts.alpha_metric, load_dataset(opts.eval_data, "validation").is_task)
    src, base, variant, source_digest = _pack_source(reg, adapter_ref)
    check_new_name(reg, name, command="pack")
    params = {"adapter": src.name, "name": name, **opts.params()}
    t0 = time.monotonic()
    if (earlier := earlier_result(reg, name, "pack", params)) is not None:
        return earlier, already_done_report(earlier)
    with record_run(reg, "pack", params) as run:
        job = _Packing(opts, load_adapter_artifact(reg, src), base_label(base), source_digest)
        if opts.eval_data:
            job.load_evaluator(reg, base, variant, progress)
        with reg.staging("pack") as tmp:
            folder = Path(tmp) / "pack"
            folder.mkdir()
            search = None
            if opts.alpha == "auto":
                search = job.search(folder, f"{src.name} packed at k = {opts.density:g} ({opts.eval_data}, "
                                            "validation)", progress)
            alpha = search["best"] if search else opts.alpha
            pack = job.pack(alpha)
            write_pack(pack, folder / PACK_FILE)
            stats = inspect_pack(folder / PACK_FILE, expected_base=job.kw["base"])  # read back and verified
            quality = job.quality(pack, alpha, search)
            config = _pack_config(reg, src, job, pack, stats, folder / PACK_FILE, search)
            art = register_artifact(reg, kind="pack", name=name,
                                    stem=None if name else _default_stem(src.name, opts.density), base_id=src.base_id,
                                    folder=folder, variant_id=src.variant_id, source=f"packed from {src.name}",
                                    source_sha=source_digest, config=config, metrics=_quality_metrics(quality),
                                    parents=[(src, "packed-from")], run_id=run.id)
        curve_png = str(reg.materialize(art) / CURVE_FILE) if search is not None else None
        report = {"name": art.name, "id": art.id, **{k: v for k, v in config.items() if k != "alpha_search"},
                  "quality": quality, "alpha_search": search, "alpha_curve_png": curve_png,
                  "seconds": round(time.monotonic() - t0, 2),
                  "warnings": _pack_warnings(config["null_modules"], opts.scope)}
        for message in report["warnings"]:
            warnings.warn(message, AdaptWarning, stacklevel=2)
        run.output = _run_output(report, search)
    return art, report


# ---- unpack and inspect --------------------------------------------------------------------
def _pack_row(reg: Registry, ref: str) -> Artifact:
    art = reg.get(ref, "artifact")
    if art.kind not in PACK_KINDS:
        raise UsageError(f"{art.name!r} is a {art.kind}, not a pack")
    return art


def unpack_artifact(reg: Registry, pack_ref: str, out: str | Path | None = None) -> Path:
    """Decode a pack artefact into a PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``, plus ``recovery.safetensors`` for converted adapters and
    ``adapterhub_c.json`` with the provenance). Default ``out``: ``./<pack name>``; an
    existing non-empty folder is refused."""
    art = _pack_row(reg, pack_ref)
    out = Path(out) if out is not None else _default_unpack_dir(art.name)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"{out} already exists and is not an empty folder")
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror or e}") from None
    loaded = load_adapter_artifact(reg, art)
    cfg = art.config or {}
    info = {"unpacked_from": art.name, "pack_id": art.id, "pack_digest": cfg.get("pack_digest"),
            "source": cfg.get("source"), "source_digest": cfg.get("source_digest"),
            **{k: cfg.get(k) for k in ("density", "alpha", "scope", "encoding", "method", "base")}}
    extra = {INFO_FILE: (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()}
    if loaded.recovery_state:
        extra[FILE_NAME] = recovery_file_bytes(loaded.recovery_state, loaded.recovery_config)
    try:
        return loaded.lora.to_folder(out, extra_files=extra)
    except OSError as e:
        raise UsageError(f"cannot write --out {out}: {e.strerror or e}") from None


def _default_unpack_dir(name: str) -> Path:
    """``./<name>``, kept inside the working directory: a namespaced name (``owner/x``) uses
    its last part; a name that would still leave cwd (old rows, before the name rule) is refused."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    cwd = Path.cwd()
    out = cwd / last
    if not last or last in (".", "..") or any(ord(c) < 32 for c in last) or out.resolve().parent != cwd.resolve():
        raise UsageError(f"pack name {ascii(name)} is not a safe folder name; give --out")
    return out


def inspect_pack_ref(reg: Registry | None, pack_ref_or_path: str | Path) -> dict:
    """Describe a pack (a file path, or a registered pack by name/id), verified.

    Per tensor: shape, density, scale, Golomb parameter, bits per parameter, the entropy
    bound H(k) at its own density and the ratio to it; totals, file size and the ratio
    vs fp16. A registered pack is also checked against its base.
    """
    path = Path(pack_ref_or_path)
    if path.is_file():
        stats = inspect_pack(path)
        stats["path"] = str(path)
        return stats
    if reg is None:
        raise UsageError(f"{pack_ref_or_path}: no such pack file")
    art = _pack_row(reg, str(pack_ref_or_path))
    folder = reg.materialize(art)
    if not (folder / PACK_FILE).is_file():
        raise IntegrityError(f"pack {art.name!r} has no {PACK_FILE}")
    stats = inspect_pack(folder / PACK_FILE, expected_base=base_label(base_of(reg, art)))
    stats["name"], stats["path"] = art.name, str(folder / PACK_FILE)
    return stats
