"""Registry operations on the Hub: pull adapters, add Hub bases, search, push artefacts.

The network side lives in :mod:`adapterhub_c.hub.client` (retries, offline mode, unsafe
names, pickles); this module turns what it fetches into registry rows and back:

- ``pull_adapter``: download → validate (LoRA config, safetensors header, shapes against
  ``r`` / ``rank_pattern`` / ``target_modules`` and, when its weights are stored, the base)
  → blobs → one ``lora`` artefact with source ``repo@sha``, linked to its base (a reference
  row until its weights are fetched). The same repo@sha pulled again returns the existing row.
- ``add_hub_base``: a base model's safetensors (and tokenizer) from the Hub, completing a
  reference row left by a pull.
- ``search_adapters_for``: ``list_models(filter="base_model:adapter:<base>")``, marking what
  is already pulled.
- ``push_artifact``: any adapter artefact as a PEFT folder + ``adapterhub_c.json`` + model
  card, built deterministically so an unchanged artefact pushed again uploads nothing.

Tokens are passed through to the client and nowhere else: never into runs, rows or messages.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import select

from adapterhub_c.adapters.lora import CONFIG_NAME, PREFIX, WEIGHTS_NAME, canonical_tensors
from adapterhub_c.errors import AdaptError, IntegrityError, UsageError
from adapterhub_c.fsutil import read_safetensors_header
from adapterhub_c.httpserve import is_loopback
from adapterhub_c.hub import client
from adapterhub_c.hub.cards import model_card, variant_card
from adapterhub_c.hub.store import StoreError, check_repo_id, valid_name_part
from adapterhub_c.hub.validate import PICKLE_WEIGHTS, kohya_message, validate_lora_folder
from adapterhub_c.models.arch import stored_layout_is_in_out
from adapterhub_c.models.builtin import builtin_for
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import check_name_syntax, check_new_name, insert_named, name_taken
from adapterhub_c.registry.kinds import ADAPTER_KINDS, PACK_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel, Evaluation, Variant
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.registry.views import lineage_tree
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.training.recovery import FILE_NAME, recovery_file_bytes
from adapterhub_c.workflows.bases import add_builtin_base, register_base_folder
from adapterhub_c.workflows.exports import write_export
from adapterhub_c.workflows.variants import variant_summary

META_NAME = "adapterhub_c.json"
CARD_NAME = "README.md"
META_FORMAT = 1
PUSH_FORMATS = ("peft", "pack", "both")
PULL_ROLE = "adapter-of"
BASE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.bin"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
                "bias", "modules_to_save", "base_model_name_or_path", "revision", "task_type")


# ---- small helpers ------------------------------------------------------------------------
def split_repo(repo: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"owner/name@rev"`` → (``owner/name``, ``rev``); ``revision`` must agree with ``@rev``."""
    repo = (repo or "").strip()
    repo_id, at, rev = repo.partition("@")
    if not repo_id:
        raise UsageError("give a hub repo id such as owner/name[@revision]")
    if at and not rev:
        raise UsageError(f"{repo!r}: empty revision after '@'")
    if rev and revision and rev != revision:
        raise UsageError(f"{repo!r} names revision {rev!r} but --revision says {revision!r}")
    return repo_id, (rev or revision or None)


def hub_label(base: BaseModel) -> str:
    """The base's name on the Hub (its hub id; the registry name for bases that have none)."""
    return base.hub_id or base.name


def _as_list(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    out = [patterns] if isinstance(patterns, str) else [p for p in patterns if p]
    return out or None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _relabel(message: str, folder: Path, label: str) -> str:
    return message.replace(str(folder), label)


def _load_pickle_tensors(path: Path, what: str) -> dict:
    """Tensors of a pickle file via torch's restricted ``weights_only`` loader (opt-in only)."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"{what}: cannot read pickle weights {path.name} with the safe loader "
                         f"({reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{what}: {path.name} is not a flat dict of tensors")
    # safetensors refuses shared storage; clone so tied tensors are written separately
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _stage(src: Path, names: Iterable[str], dest: Path) -> None:
    """Link ``names`` from ``src`` into ``dest`` (symlinks; the blob store copies content)."""
    for rel in names:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((src / rel).resolve(), target)


# ---- base checks ----------------------------------------------------------------------------
def _base_weight_shapes(reg: Registry, base: BaseModel) -> dict[str, list[int]]:
    """{tensor name: shape} of a stored base, from its safetensors headers (no tensor loaded)."""
    shapes: dict[str, list[int]] = {}
    for rel, digest in sorted((base.files or {}).items()):
        if rel.endswith(".safetensors"):
            header = read_safetensors_header(reg.blobs.path_for(digest))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _shape_problems(shapes: dict[str, list[int]], model_type: str | None, adapter) -> tuple[list[str], int]:
    """(what does not fit, how many adapter modules / tensors were checked) against base shapes."""
    if not shapes:
        return [], 0
    in_out = stored_layout_is_in_out(model_type, bool(adapter.config.get("fan_in_fan_out")))
    problems, checked = [], 0
    for module, layer in sorted(adapter.layers().items()):
        checked += 1
        key = f"{module}.weight"
        if key not in shapes:
            if module.endswith("lm_head") and "lm_head.weight" not in shapes:
                continue  # tied to the embeddings
            problems.append(f"adapts module {module!r}, which is not in base")
            continue
        shape = shapes[key]
        want = [int(layer.B.shape[0]), int(layer.A.shape[-1])]
        stored = want[::-1] if in_out and not module.endswith("lm_head") else want
        if len(shape) != 2 or list(shape) != stored:
            problems.append(f"module {module!r} is {want[0]}x{want[1]} (out x in) in the adapter but {shape} "
                            "in base" + (" (stored [in, out], Conv1D)" if in_out else ""))
    for module, layer in sorted(adapter.embedding_layers().items()):
        checked += 1
        want = [int(layer.A.shape[1]), int(layer.B.shape[0])]
        if shapes.get(f"{module}.weight") != want:
            problems.append(f"embedding LoRA {module!r} is {want[0]}x{want[1]} (vocab x hidden) but "
                            f"{shapes.get(f'{module}.weight')} in base")
    for key, tensor in sorted(adapter.full_tensors().items()):
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".base_layer.", ".")
        if name not in shapes:
            continue  # e.g. a tied lm_head
        checked += 1
        if list(tensor.shape) != list(shapes[name]):
            problems.append(f"full tensor {name!r} (modules_to_save) is {list(tensor.shape)} but "
                            f"{shapes[name]} in base")
    return problems, checked


def check_adapter_against_base(reg: Registry, base: BaseModel, adapter, label: str) -> None:
    """Every adapted module exists in the base with matching in/out features (stored bases only).

    A base whose block linears are Conv1D (GPT-2; ``models.arch``) stores them ``[in, out]``.
    Embedding LoRAs and ``modules_to_save`` tensors are checked against the base's tensors too.
    IntegrityError names the first problem and the nearest registered base by shape.
    """
    if base.is_reference:
        return
    problems, _ = _shape_problems(_base_weight_shapes(reg, base), (base.config or {}).get("model_type"), adapter)
    if problems:
        raise IntegrityError(f"{label}: {problems[0]} {base.name!r}" + _nearest_hint(reg, adapter, base.name))


def nearest_bases(reg: Registry, adapter) -> list[tuple[str, int, int]]:
    """Stored bases ranked by how much of the adapter fits their shapes: [(name, fitting, checked)]."""
    with reg.session() as s:
        bases = [b for b in s.scalars(select(BaseModel)) if not b.is_reference]
    ranked = []
    for b in bases:
        shapes = _base_weight_shapes(reg, b)
        problems, checked = _shape_problems(shapes, (b.config or {}).get("model_type"), adapter)
        total = len(adapter.layers()) + len(adapter.embedding_layers())
        ranked.append((b.name, max(0, (checked or total) - len(problems)), checked or total))
    return sorted(ranked, key=lambda t: (-t[1] / max(t[2], 1), t[0]))


def _nearest_hint(reg: Registry, adapter, exclude: str | None = None) -> str:
    ranked = [r for r in nearest_bases(reg, adapter) if r[0] != exclude]
    if not ranked:
        return "; no other registered base to compare with"
    name, fit, total = ranked[0]
    if fit == total:
        return f"; base {name!r} fits every module: pull with --base {name}"
    return f"; nearest registered base by shape: {name!r} ({fit}/{total} modules fit)"


def _find_or_reference_base(s, reg: Registry, base_name: str, revision: str | None,
                            run_id: str | None) -> tuple[BaseModel, bool]:
    """The base row an adapter names: an existing base (by name or hub id), or a new reference.

    A name that is a built-in's hub id (or name) becomes a reference under the built-in's
    name, so that ``adapt base add`` builds it offline and attaches it to the same row.
    """
    base = reg.find_base(s, base_name)
    builtin = builtin_for(base_name)
    if base is None and builtin is not None:
        base = reg.find_base(s, builtin.name)
    if base is not None:
        return base, False
    if builtin is not None:
        base = BaseModel(name=builtin.name, hub_id=builtin.hub_id, files={}, config={}, run_id=run_id)
    else:
        base = BaseModel(name=base_name, hub_id=base_name, revision=revision, files={}, config={},
                         run_id=run_id)
    s.add(base)
    s.flush()
    return base, True


def _with_base_weights(reg: Registry, base_name: str, revision: str | None, allow_pickle: bool,
                       token: str | None, endpoint: str | None, progress: Progress | None) -> BaseModel:
    builtin = builtin_for(base_name)
    if builtin is not None:
        return add_builtin_base(reg, builtin.name, progress=progress)[0]
    return add_hub_base(reg, base_name, revision=revision, allow_pickle=allow_pickle, token=token,
                        progress=progress, endpoint=endpoint)[0]


# ---- pull -----------------------------------------------------------------------------------
def _existing_pull(reg: Registry, repo_id: str, sha: str) -> Artifact | None:
    with reg.session() as s:
        return s.scalar(select(Artifact).where(Artifact.source == f"{repo_id}@{sha}",
                                               Artifact.source_sha == sha).order_by(Artifact.created_at))


def _default_pull_stem(repo_id: str, revision: str | None) -> str:
    return repo_id if not revision or revision == "main" else f"{repo_id}@{revision}"


def _prepare_pulled_folder(got: client.DownloadedRepo, dest: Path, allow_pickle: bool,
                           label: str) -> tuple[list[str], str | None]:
    """Stage the downloaded files in ``dest``; with ``allow_pickle``, convert pickle weights.

    Returns (staged names, the pickle file converted or None). Pickle files themselves are
    never stored: only their safetensors conversion is.
    """
    from safetensors.torch import save_file

    names = [n for n in got.files if not n.lower().endswith(_PICKLE_SUFFIXES)]
    converted = None
    if WEIGHTS_NAME not in got.files:
        pickles = [p for p in PICKLE_WEIGHTS if p in got.files]
        if pickles and not allow_pickle:
            raise UsageError(f"{label}: only pickle weights ({', '.join(pickles)}); pass "
                             "--allow-pickle to convert them with the safe loader")
        if pickles:
            converted = pickles[0]
            tensors = _load_pickle_tensors(got.path / converted, label)
            save_file(tensors, str(dest / WEIGHTS_NAME), metadata={"format": "pt"})
    _stage(got.path, names, dest)
    staged = sorted(names + ([WEIGHTS_NAME] if converted else []))
    return staged, converted


def pull_adapter(reg: Registry, repo: str, *, revision: str | None = None,
                 include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
                 name: str | None = None, allow_pickle: bool = False, token: str | None = None,
                 with_base: bool = False, progress: Progress | None = None,
                 endpoint: str | None = None, base: str | None = None) -> tuple[Artifact, bool]:
    """Pull a LoRA from the Hub into the registry; returns (artefact, created now).

    ``repo`` is ``owner/name[@revision]``. Nothing is registered unless the adapter passes
    validation; non-LoRA PEFT types and Kohya-style files are refused (UsageError). Its base (from
    ``base_model_name_or_path``) is registered as a reference row, with weights only when
    ``with_base``. ``base``: attach to this registered base (with weights) instead,
    whatever the config names (null, a ``…-bnb-4bit`` / GPTQ / AWQ copy, another id);
    the shape check decides. A config naming no base, or a quantized copy that is not
    registered, needs ``base``. Keys with an adapter name inside (``.default.``) or without
    ``base_model.model.`` are stored renamed as PEFT saves them. Pulling a repo@sha
    already in the registry returns that artefact.
    """
    repo_id, revision = split_repo(repo, revision)
    include, exclude = _as_list(include), _as_list(exclude)
    if base is not None:
        _explicit_base(reg, base)  # before any download
    if name is not None:
        check_name_syntax(name)
        if name_taken(reg, name):
            existing = reg.get(name, "artifact")
            if existing.source_sha is None or not (existing.source or "").startswith(f"{repo_id}@"):
                raise UsageError(f"an artefact named {name!r} already exists; pick another --name")
    got = client.download_repo(repo_id, revision=revision, include=include, exclude=exclude,
                               allow_pickle=allow_pickle, token=token, endpoint=endpoint,
                               progress=progress)
    existing = _existing_pull(reg, repo_id, got.commit_sha)
    if existing is not None:
        return existing, False
    check_new_name(reg, name)
    label = f"{repo_id}@{got.commit_sha[:12]}"
    params = dict(repo=repo_id, revision=revision, include=include, exclude=exclude, name=name,
                  allow_pickle=allow_pickle, with_base=with_base, base=base,
                  endpoint=client.public_endpoint(endpoint))
    with record_run(reg, "pull", params) as run, \
            reg.staging("pull") as tmp:
        staging = Path(tmp)
        if CONFIG_NAME not in got.files:
            _refuse_kohya_repo(got, label)
            raise UsageError(f"{label}: no {CONFIG_NAME}; not a PEFT adapter"
                             + (" (or --include/--exclude left it out)" if include or exclude else ""))
        staged, converted = _prepare_pulled_folder(got, staging, allow_pickle, label)
        try:
            adapter = validate_lora_folder(staging)
        except IntegrityError as e:  # the repo's content is at fault: bad input, not a failure
            raise UsageError(f"{label} is not a valid LoRA: {_relabel(str(e), staging, label)}") from None
        except UsageError as e:
            raise UsageError(_relabel(str(e), staging, label)) from None
        renamed = _canonical_weights(staging)
        declared = adapter.config.get("base_model_name_or_path")
        if base is not None:
            base_row = _explicit_base(reg, base)
            base_name, base_rev = base_row.name, base_row.revision
        else:
            if not isinstance(declared, str) or not declared.strip():
                raise UsageError(f"{label}: adapter_config.json does not name its base "
                                 "(base_model_name_or_path); pass --base NAME to attach it to a registered base"
                                 + _nearest_hint(reg, adapter))
            if not is_model_id(declared):
                raise UsageError(f"{label}: its base_model_name_or_path {_shown_name(declared)} is not a Hub model "
                                 "id (a local path, or characters the Hub refuses); pass --base NAME to attach it "
                                 "to a registered base" + _nearest_hint(reg, adapter))
            base_name, base_rev = declared, adapter.config.get("revision") or None
            if with_base:
                _with_base_weights(reg, base_name, base_rev, allow_pickle, token, endpoint, progress)
            with reg.session() as s:
                base_row = reg.find_base(s, base_name)
            if base_row is None and QUANTIZED_COPY.search(base_name):
                raise UsageError(f"{label}: its base {base_name!r} is a quantized copy; pass --base NAME to "
                                 "attach it to the registered full-precision base" + _nearest_hint(reg, adapter))
        if base_row is not None:
            try:
                check_adapter_against_base(reg, base_row, adapter, label)
            except IntegrityError as e:
                raise UsageError(str(e)) from None
        if progress is not None:
            progress("storing blobs", 0, len(staged))
        files = {rel: reg.blobs.put_file(staging / rel) for rel in staged}
        size = sum(reg.blobs.path_for(d).stat().st_size for d in files.values())
        config = {"hub": {"repo": repo_id, "revision": revision, "commit": got.commit_sha,
                          "endpoint": client.public_endpoint(endpoint), "include": include,
                          "exclude": exclude},
                  "peft": {k: adapter.config[k] for k in _CONFIG_KEYS if k in adapter.config}}
        if converted:
            config["converted_from_pickle"] = converted
        if renamed:
            config["renamed_keys"] = renamed
        if base is not None:
            config["attached_to"] = {"base": base_name, "declared_base": declared}
        metrics = {"parameters": adapter.num_parameters(), "modules": len(adapter.layers())}

        def insert(s, art_name: str):
            base, base_created = _find_or_reference_base(s, reg, base_name, base_rev, run.id)
            art = Artifact(kind="lora", name=art_name, base_id=base.id, source=f"{repo_id}@{got.commit_sha}",
                           source_sha=got.commit_sha, files=files, config=config, metrics=metrics,
                           size_bytes=size, run_id=run.id)
            s.add(art)
            s.flush()
            reg.add_lineage(s, base, art, PULL_ROLE)
            return art, base.name, base_created

        art, base_label, base_created = insert_named(reg, name, None if name else _default_pull_stem(repo_id, revision),
                                                     insert)
        run.output = {"artifact": art.name, "id": art.id, "base": base_label,
                      "base_reference_created": base_created, "commit": got.commit_sha,
                      "files": sorted(files)}
        if progress is not None:
            progress("storing blobs", len(staged), len(staged))
        return art, True


def is_model_id(name: str) -> bool:
    """A base name an adapter may declare: a Hub model id (``name`` or ``namespace/name``, the Hub's
    character and length rules) or a built-in's name; never a path, control or bidi characters."""
    if builtin_for(name) is not None:
        return True
    parts = name.split("/")
    return len(parts) <= 2 and all(valid_name_part(p) for p in parts)


def _shown_name(name: str, limit: int = 60) -> str:
    text = ascii(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


QUANTIZED_COPY = re.compile(r"(?i)[-_.](bnb[-_]?(4|8)bit|(4|8)bit|gptq|awq|int[48]|nf4|gguf)([-_.]|$)")


def _explicit_base(reg: Registry, name: str) -> BaseModel:
    """The registered base ``--base`` names; it must have its weights (the shape check needs them)."""
    row = reg.get(name, "base")
    if row.is_reference:
        raise UsageError(f"--base {row.name}: only a reference; fetch its weights first with "
                         f"`adapt base add {row.name}`")
    return row


def _canonical_weights(folder: Path) -> int:
    """Rewrite ``adapter_model.safetensors`` under PEFT's key names if needed; returns keys renamed."""
    from safetensors.torch import load_file, save_file

    path = folder / WEIGHTS_NAME
    tensors, renamed = canonical_tensors(load_file(str(path)))
    if renamed:
        path.unlink()  # a link into the download cache: replace, never write through
        save_file(tensors, str(path), metadata={"format": "pt"})
    return renamed


def _refuse_kohya_repo(got: client.DownloadedRepo, label: str) -> None:
    for name in got.files:
        if name.endswith(".safetensors"):
            try:
                header = read_safetensors_header(got.path / name)
            except IntegrityError:
                continue
            if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in header):
                raise UsageError(kohya_message(f"{label}: {name}"))


# ---- base add ---------------------------------------------------------------------------------
def _prepare_base_folder(got: client.DownloadedRepo, dest: Path, allow_pickle: bool,
                         label: str) -> str | None:
    """Stage a base model's files; pickle weights (opt-in) become one ``model.safetensors``."""
    from safetensors.torch import save_file

    names = [n for n in got.files if not n.lower().endswith(_PICKLE_SUFFIXES)
             and not n.endswith(".bin.index.json")]
    if "config.json" not in names:
        raise UsageError(f"{label}: no config.json; not a transformers model repo")
    weights = [n for n in names if n.endswith(".safetensors")]
    converted = None
    if not weights:
        pickles = sorted(n for n in got.files if n.lower().endswith(_PICKLE_SUFFIXES)
                         and "/" not in n and not n.startswith("training_args"))
        if not pickles:
            raise UsageError(f"{label}: no safetensors weights")
        if not allow_pickle:
            raise UsageError(f"{label}: only pickle weights ({', '.join(pickles[:3])}); pass "
                             "--allow-pickle to convert them with the safe loader")
        state: dict = {}
        for p in pickles:
            state.update(_load_pickle_tensors(got.path / p, label))
        save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
        converted = ",".join(pickles)
    for n in weights:
        try:
            read_safetensors_header(got.path / n)
        except IntegrityError as e:
            raise UsageError(f"{label} is not a valid model: "
                             f"{_relabel(str(e), got.path, label)}") from None
    _stage(got.path, names, dest)
    return converted


def add_hub_base(reg: Registry, repo: str, revision: str | None = None, allow_pickle: bool = False,
                 token: str | None = None, progress: Progress | None = None,
                 endpoint: str | None = None) -> tuple[BaseModel, bool]:
    """Fetch a base model from the Hub (safetensors; pickles only with ``allow_pickle``).

    Completes a reference row left by ``pull_adapter`` (same hub id) or adds a new base named
    by the repo id. Returns (base, whether weights were stored now); the same commit already
    stored is a no-op.
    """
    repo_id, revision = split_repo(repo, revision)
    got = client.download_repo(repo_id, revision=revision, include=BASE_PATTERNS,
                               allow_pickle=allow_pickle, token=token, endpoint=endpoint,
                               progress=progress)
    with reg.session() as s:
        row = reg.find_base(s, repo_id)
    if row is not None and not row.is_reference and row.commit_sha == got.commit_sha:
        return row, False
    if row is not None and not row.is_reference and row.hub_id != repo_id:
        raise UsageError(f"a base named {repo_id!r} already exists with other weights")
    label = f"{repo_id}@{got.commit_sha[:12]}"
    params = dict(name=repo_id, revision=revision, allow_pickle=allow_pickle,
                  endpoint=client.public_endpoint(endpoint))
    with record_run(reg, "base add", params) as run, \
            reg.staging("base") as tmp:
        converted = _prepare_base_folder(got, Path(tmp), allow_pickle, label)
        if progress is not None:
            progress(f"storing {repo_id}", 0, 1)
        name = row.name if row is not None else repo_id
        base, created = register_base_folder(reg, name, Path(tmp), repo_id, revision, got.commit_sha,
                                             run.id)
        if converted:
            with reg.session() as s:
                b = s.get(BaseModel, base.id)
                b.config = {**(b.config or {}), "_adapterhub_converted_from_pickle": converted}
        run.output = {"base": base.name, "id": base.id, "params": base.params,
                      "commit": got.commit_sha, "completed_reference": row is not None}
        if progress is not None:
            progress(f"storing {repo_id}", 1, 1)
        return base, True


# ---- search -----------------------------------------------------------------------------------
def search_adapters_for(reg: Registry, base: str, limit: int = 50, token: str | None = None,
                        endpoint: str | None = None) -> list[dict]:
    """Adapters of ``base`` on the Hub, each marked ``pulled`` (and as what) if in the registry.

    ``base`` may be a registered base (its hub id is searched) or any hub id.
    """
    if limit is None or limit < 1:
        raise UsageError("--limit must be at least 1")
    with reg.session() as s:
        row = reg.find_base(s, base)
        hub_base = hub_label(row) if row is not None else base
        pulled: dict[str, list[tuple[str, str]]] = {}
        for art in s.scalars(select(Artifact).where(Artifact.source_sha.isnot(None))):
            repo_id, _, sha = (art.source or "").partition("@")
            if sha == art.source_sha:
                pulled.setdefault(repo_id, []).append((art.name, sha))
    found = client.search_adapters(hub_base, limit=limit, token=token, endpoint=endpoint)
    for m in found:
        mine = pulled.get(m["id"], [])
        m["pulled"] = bool(mine)
        m["pulled_as"] = [n for n, _ in mine]
        m["pulled_latest"] = any(sha == m.get("sha") for _, sha in mine)
    return found


# ---- push -------------------------------------------------------------------------------------
def _evaluations(s, art: Artifact) -> tuple[list[dict], list[dict]]:
    """(this artefact's latest measurements, the same datasets measured without it)."""
    names = {v.id: v.name for v in s.scalars(select(Variant))}
    rows = s.scalars(select(Evaluation).where(Evaluation.artifact_id == art.id)
                     .order_by(Evaluation.created_at, Evaluation.id)).all()
    latest: dict[tuple, dict] = {}
    for e in rows:
        key = (e.dataset, e.split, e.metric, names.get(e.variant_id), e.prompt_id is not None)
        latest[key] = {"dataset": e.dataset, "split": e.split, "metric": e.metric, "value": e.value,
                       "variant": names.get(e.variant_id), "with_prompt": e.prompt_id is not None}
    datasets = {(k[0], k[1], k[2], k[3]) for k in latest}
    base_rows = s.scalars(select(Evaluation).where(Evaluation.base_id == art.base_id,
                                                   Evaluation.artifact_id.is_(None),
                                                   Evaluation.prompt_id.is_(None))
                          .order_by(Evaluation.created_at, Evaluation.id)).all()
    baseline: dict[tuple, dict] = {}
    for e in base_rows:
        key = (e.dataset, e.split, e.metric, names.get(e.variant_id))
        if key in datasets:
            baseline[key] = {"dataset": e.dataset, "split": e.split, "metric": e.metric,
                             "value": e.value, "variant": names.get(e.variant_id)}
    order = lambda d: (d["dataset"], d["split"], d["metric"], d["variant"] or "")  # noqa: E731
    return sorted(latest.values(), key=order), sorted(baseline.values(), key=order)


def _metric_key(m: dict, suffix: str = "") -> str:
    where = f"{m['dataset']}/{m['split']}" + (f", {m['variant']}" if m.get("variant") else "")
    return f"{m['metric']} ({where}){suffix}"


def _describe(reg: Registry, art: Artifact) -> dict[str, Any]:
    """Everything the card and ``adapterhub_c.json`` say about ``art`` (deterministic)."""
    with reg.session() as s:
        base = s.get(BaseModel, art.base_id)
        variant = s.get(Variant, art.variant_id) if art.variant_id else None
        metrics, baselines = _evaluations(s, art)
        parents = [{"role": role, "parent": p.name} for role, p in reg.parents(s, art)]
    config = {k: v for k, v in (art.config or {}).items() if k != "pushes"}
    return {
        "format_version": META_FORMAT,
        "name": art.name,
        "kind": art.kind,
        "base": {"name": base.name, "hub_id": base.hub_id, "revision": base.revision,
                 "commit_sha": base.commit_sha},
        "variant": ({"name": variant.name, "recipe": json.loads(variant.recipe)} if variant else None),
        "source": art.source,
        "source_sha": art.source_sha,
        "config": config,
        "lineage": lineage_tree(reg, art.id)["parents"],
        "parents": parents,
        "metrics": metrics,
        "baselines": baselines,
        "_base_label": hub_label(base),
    }


def _write_peft_part(reg: Registry, art: Artifact, stage: Path, base_label: str) -> list[str]:
    """The PEFT files of ``art`` in ``stage`` (packs decoded); returns the names written."""
    written = []
    if art.kind in PACK_KINDS:
        loaded = load_adapter_artifact(reg, art)
        lora = loaded.lora
        lora.config = {**lora.config, "base_model_name_or_path": base_label}
        lora.to_folder(stage / ".peft")
        for p in sorted((stage / ".peft").iterdir()):
            shutil.move(str(p), stage / p.name)
            written.append(p.name)
        (stage / ".peft").rmdir()
        if loaded.recovery_state is not None:
            (stage / FILE_NAME).write_bytes(recovery_file_bytes(loaded.recovery_state,
                                                                loaded.recovery_config))
            written.append(FILE_NAME)
        return written
    # LoRA kinds: the stored bytes as they are (bit-exact round trips), card and meta rebuilt
    for rel, digest in sorted(art.files.items()):
        if rel in (CARD_NAME, META_NAME):
            continue
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reg.blobs.verified_path(digest), target)
        written.append(rel)
    cfg_path = stage / CONFIG_NAME
    if not cfg_path.is_file():
        raise IntegrityError(f"artefact {art.name!r} has no {CONFIG_NAME}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("base_model_name_or_path") != base_label:
        cfg["base_model_name_or_path"] = base_label
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return written


def build_push_folder(reg: Registry, art: Artifact, dest: str | Path, fmt: str = "peft") -> list[dict]:
    """Write what ``push`` uploads for ``art`` into the empty folder ``dest``.

    ``fmt``: ``peft`` (PEFT folder), ``pack`` (the pack file only; pack artefacts),
    ``both`` (PEFT folder and pack file). Always adds ``adapterhub_c.json`` and README.md.
    Content is a function of the registry rows only (no timestamps), so an unchanged
    artefact gives byte-identical files. Returns [{path, size, sha256}] sorted by path.
    """
    if fmt not in PUSH_FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; pick one of {', '.join(PUSH_FORMATS)}")
    if art.kind not in ADAPTER_KINDS:
        raise UsageError(f"{art.name!r} is a {art.kind}; only adapters "
                         f"({', '.join(ADAPTER_KINDS)}) can be pushed")
    if fmt != "peft" and art.kind not in PACK_KINDS:
        raise UsageError(f"--format {fmt} needs a pack artefact; {art.name!r} is a {art.kind}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    info = _describe(reg, art)
    base_label = info.pop("_base_label")
    written = []
    if fmt in ("peft", "both"):
        written += _write_peft_part(reg, art, dest, base_label)
    if fmt in ("pack", "both"):
        for rel, digest in sorted(art.files.items()):
            if rel in (CARD_NAME, META_NAME):
                continue
            if (dest / rel).exists():
                raise IntegrityError(f"pack file {rel!r} of {art.name!r} collides with a PEFT file")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reg.blobs.verified_path(digest), dest / rel)
            written.append(rel)
    info["format"] = fmt
    info["files"] = {rel: _sha256(dest / rel) for rel in sorted(written)}
    (dest / META_NAME).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    card_metrics = {_metric_key(m): m["value"] for m in info["metrics"]}
    card_metrics.update({_metric_key(m, " without adapter"): m["value"] for m in info["baselines"]})
    lineage = info["parents"] or ([{"role": "pulled-from", "parent": info["source"]}]
                                  if info["source"] else [])
    recipe = info["variant"]["recipe"] if info["variant"] else None
    card = model_card(base_label, art.name, recipe=recipe, lineage=lineage, metrics=card_metrics,
                      extra_tags=(art.kind,), peft_loadable=fmt != "pack")
    (dest / CARD_NAME).write_text(card)
    return [{"path": p.relative_to(dest).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(dest.rglob("*")) if p.is_file()]


def push_artifact(reg: Registry, name: str, repo_id: str, *, private: bool = False, fmt: str = "peft",
                  commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
                  progress: Progress | None = None, endpoint: str | None = None) -> dict:
    """Push an adapter artefact (or a variant: see `push_variant`) to ``repo_id``; returns what happened.

    The result has ``repo_id``, ``files`` ([{path, size, sha256}]) and, unless ``dry_run``,
    ``commit_sha``, ``url`` and ``uploaded`` (False when the repo already held this content:
    no commit is made then). The pushed repo and commit are recorded in the artefact's
    config under ``pushes``.
    """
    art = _artifact_or_variant(reg, name)
    if isinstance(art, Variant):
        if fmt not in ("peft", "hf"):
            raise UsageError(f"{art.name!r} is a variant: it is pushed as its hf export (--format {fmt} is for "
                             "adapters)")
        return push_variant(reg, art, repo_id, private=private, commit_message=commit_message, dry_run=dry_run,
                            token=token, progress=progress, endpoint=endpoint)
    repo_id = (repo_id or "").strip()
    try:
        check_repo_id(repo_id)
    except StoreError as e:
        raise UsageError(str(e)) from None
    params = dict(artifact=art.name, repo_id=repo_id, private=private, format=fmt,
                  commit_message=commit_message, endpoint=client.public_endpoint(endpoint))
    with reg.staging("push") as tmp:
        stage = Path(tmp) / "repo"
        if dry_run:
            files = build_push_folder(reg, art, stage, fmt)
            return {"artifact": art.name, "repo_id": repo_id, "format": fmt, "dry_run": True,
                    "files": files}
        with record_run(reg, "push", params) as run:
            files = build_push_folder(reg, art, stage, fmt)
            res = client.push_folder(stage, repo_id, private=private, commit_message=commit_message,
                                     token=token, endpoint=endpoint, progress=progress)
            record = {"repo_id": repo_id, "commit_sha": res.commit_sha, "url": res.url,
                      "format": fmt, "endpoint": client.public_endpoint(endpoint)}
            with reg.session() as s:
                row = s.get(Artifact, art.id)
                pushes = [p for p in (row.config or {}).get("pushes", [])
                          if (p.get("repo_id"), p.get("commit_sha"), p.get("endpoint"))
                          != (repo_id, res.commit_sha, record["endpoint"])]
                row.config = {**(row.config or {}), "pushes": pushes + [record]}
            out = {"artifact": art.name, "repo_id": repo_id, "format": fmt, "dry_run": False,
                   "commit_sha": res.commit_sha, "url": res.url, "uploaded": res.uploaded,
                   "files": files}
            run.output = {k: v for k, v in out.items() if k != "files"} | {
                "files": [f["path"] for f in files]}
            return out


def _artifact_or_variant(reg: Registry, name: str):
    """The artefact named ``name``, else the variant (artefacts first: names are unique per kind)."""
    from adapterhub_c.errors import NotFoundError

    try:
        return reg.get(name, "artifact")
    except NotFoundError:
        try:
            return reg.get(name, "variant")
        except NotFoundError:
            pass
    with reg.session() as s:
        known = [n for cls in (Artifact, Variant) for n in s.scalars(select(cls.name))]
    raise NotFoundError("adapter or variant", name, known)


def build_variant_push_folder(reg: Registry, row: Variant, dest: str | Path) -> list[dict]:
    """Write what ``push`` uploads for a variant into the empty folder ``dest``: its hf export + README.md.

    Returns [{path, size, sha256}] sorted by path.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with reg.session() as s:
        base = s.get(BaseModel, row.base_id)
    write_export(reg, row, base, dest, "hf")
    summary = variant_summary(row, base)
    weights = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    sizes = {"stored_bytes": summary["stored_bytes"], "loaded_bytes": summary["loaded_bytes"],
             "export_bytes": weights, "base_fp16_bytes": summary["base_fp16_bytes"]}
    st = row.stats or {}
    metrics = {}
    if st.get("perplexity") is not None:
        label = f"perplexity ({st.get('eval_data', 'builtin:pydoc:test')}, {st.get('eval_tokens')} tokens)"
        metrics[label] = st["perplexity"]
        if st.get("base_perplexity") is not None:
            metrics[label.replace("perplexity", "base perplexity", 1)] = st["base_perplexity"]
    recipe = summary["recipe_json"]
    tags = [f"quant:{recipe['quant']}"] if recipe["quant"] != "none" else []
    tags += [f"prune:{recipe['prune']}"] if recipe["prune"] != "none" else []
    card = variant_card(hub_label(base), row.name, recipe, quantized=recipe["quant"] != "none", sizes=sizes,
                        metrics=metrics, extra_tags=tags)
    (dest / CARD_NAME).write_text(card)
    return [{"path": p.relative_to(dest).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(dest.rglob("*")) if p.is_file()]


def push_variant(reg: Registry, variant: str | Variant, repo_id: str, *, private: bool = False,
                 commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
                 progress: Progress | None = None, endpoint: str | None = None) -> dict:
    """Push a variant's `hf` export with a model card to ``repo_id`` (created if needed).

    Same result shape as `push_artifact` (``variant`` instead of ``artifact``); the push is
    recorded in the variant's stats under ``pushes``.
    """
    row = variant if isinstance(variant, Variant) else reg.get(variant, "variant")
    repo_id = (repo_id or "").strip()
    try:
        check_repo_id(repo_id)
    except StoreError as e:
        raise UsageError(str(e)) from None
    params = dict(variant=row.name, repo_id=repo_id, private=private, format="hf", commit_message=commit_message,
                  endpoint=client.resolve_endpoint(endpoint))
    with reg.staging("push") as tmp:
        stage = Path(tmp) / "repo"
        if dry_run:
            files = build_variant_push_folder(reg, row, stage)
            return {"variant": row.name, "repo_id": repo_id, "format": "hf", "dry_run": True, "files": files}
        with record_run(reg, "push", params) as run:
            files = build_variant_push_folder(reg, row, stage)
            res = client.push_folder(stage, repo_id, private=private, commit_message=commit_message,
                                     token=token, endpoint=endpoint, progress=progress)
            record = {"repo_id": repo_id, "commit_sha": res.commit_sha, "url": res.url, "format": "hf",
                      "endpoint": client.resolve_endpoint(endpoint)}
            with reg.session() as s:
                r = s.get(Variant, row.id)
                pushes = [p for p in (r.stats or {}).get("pushes", [])
                          if (p.get("repo_id"), p.get("commit_sha"), p.get("endpoint"))
                          != (repo_id, res.commit_sha, record["endpoint"])]
                r.stats = {**(r.stats or {}), "pushes": pushes + [record]}
            out = {"variant": row.name, "repo_id": repo_id, "format": "hf", "dry_run": False,
                   "commit_sha": res.commit_sha, "url": res.url, "uploaded": res.uploaded, "files": files}
            run.output = {k: v for k, v in out.items() if k != "files"} | {"files": [f["path"] for f in files]}
            return out


# ---- serve ------------------------------------------------------------------------------------
def serve_hub(root: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
              ready: Callable[[str], None] | None = None,
              warn: Callable[[str], None] | None = None, max_body_bytes: int | None = None,
              max_upload_bytes: int | None = None) -> None:
    """Run the local Hub-compatible server on ``root`` until interrupted (blocking).

    ``ready(endpoint)`` is called once listening. Binding a non-loopback interface without a
    token is allowed but reported through ``warn``: anyone who can connect could write.
    ``max_body_bytes`` (JSON bodies) / ``max_upload_bytes`` (commits): request size limits,
    answered with 413 (defaults: the server's).
    """
    from adapterhub_c.hub.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_UPLOAD_BYTES, serve

    limits = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes,
              "max_upload_bytes": DEFAULT_MAX_UPLOAD_BYTES if max_upload_bytes is None else max_upload_bytes}
    for flag, value in limits.items():
        if not isinstance(value, int) or value < 1024:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: must be at least 1024 bytes")

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--root {root}: not a folder")
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"--port {port}: out of range")
    if not is_loopback(host) and not token and warn is not None:
        warn(f"serving on {host} without a token: anyone who can reach it can create and push repos")
    root.mkdir(parents=True, exist_ok=True)
    try:
        serve(root, host=host, port=int(port), token=token or None, ready=ready, **limits)
    except OSError as e:
        raise AdaptError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


__all__ = ["pull_adapter", "add_hub_base", "search_adapters_for", "push_artifact",
           "build_push_folder", "split_repo", "check_adapter_against_base", "serve_hub"]
