"""``adapt pull`` and ``adapt base add`` from the Hub: what the client fetches, turned into registry rows.

The network side lives in :mod:`adapterhub_c.hub.client` (retries, offline mode, unsafe
names, pickles); this module validates and registers:

- ``pull_adapter``: download → validate (LoRA config, safetensors header, shapes against
  ``r`` / ``rank_pattern`` / ``target_modules`` and, when its weights are stored, the base;
  :mod:`~adapterhub_c.workflows.basefit`) → blobs → one ``lora`` artefact with source
  ``repo@sha``, linked to its base (a reference row until its weights are fetched). The same
  repo@sha pulled again returns the existing row.
- ``add_hub_base``: a base model's safetensors (and tokenizer) from the Hub, completing a
  reference row left by a pull.

Tokens are passed through to the client and nowhere else: never into runs, rows or messages.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sqlalchemy import select

from adapterhub_c.adapters.lora import CONFIG_NAME, WEIGHTS_NAME, canonical_tensors
from adapterhub_c.errors import AdaptWarning, IntegrityError, UsageError
from adapterhub_c.fsutil import read_safetensors_header, redact_url
from adapterhub_c.hub import client
from adapterhub_c.hub.names import valid_name_part
from adapterhub_c.hub.validate import PICKLE_WEIGHTS, kohya_message, validate_lora_folder
from adapterhub_c.models.builtin import builtin_for
from adapterhub_c.progress import Progress
from adapterhub_c.registry.artifacts import check_name_syntax, check_new_name, insert_named, name_taken
from adapterhub_c.registry.models import Artifact, BaseModel
from adapterhub_c.registry.runs import record_run
from adapterhub_c.registry.store import Registry
from adapterhub_c.workflows.basefit import check_adapter_against_base, nearest_hint
from adapterhub_c.workflows.bases import add_builtin_base, register_base_folder
from adapterhub_c.workflows.hubcommon import (
    PICKLE_SUFFIXES,
    load_pickle_tensors,
    relabel,
    split_repo,
    stage_links,
)

PULL_ROLE = "adapter-of"
BASE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.bin"]
_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
                "bias", "modules_to_save", "base_model_name_or_path", "revision", "task_type")
QUANTIZED_COPY = re.compile(r"(?i)[-_.](bnb[-_]?(4|8)bit|(4|8)bit|gptq|awq|int[48]|nf4|gguf)([-_.]|$)")


@dataclass(frozen=True)
class _Pull:
    """What the caller asked ``pull_adapter`` for."""

    repo_id: str
    revision: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    name: str | None = None
    allow_pickle: bool = False
    token: str | None = None
    with_base: bool = False
    progress: Progress | None = None
    endpoint: str | None = None
    base: str | None = None

    def params(self) -> dict:
        """The run's parameters (no token; the endpoint without credentials)."""
        return dict(repo=self.repo_id, revision=self.revision, include=self.include, exclude=self.exclude,
                    name=self.name, allow_pickle=self.allow_pickle, with_base=self.with_base, base=self.base,
                    endpoint=client.public_endpoint(self.endpoint))

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress("storing blobs", done, total)


@dataclass
class _Staged:
    """A downloaded adapter staged and validated: the loaded adapter and what will be stored."""

    adapter: object
    files: list[str]
    converted: str | None
    renamed: int


def _as_list(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    out = [patterns] if isinstance(patterns, str) else [p for p in patterns if p]
    return out or None


# ---- bases an adapter names ---------------------------------------------------------------------
def is_model_id(name: str) -> bool:
    """A base name an adapter may declare: a Hub model id (``name`` or ``namespace/name``, the Hub's
    character and length rules) or a built-in's name; never a path, control or bidi characters."""
    if builtin_for(name) is not None:
        return True
    parts = name.split("/")
    return len(parts) <= 2 and all(valid_name_part(p) for p in parts)


def _shown_name(name: str, limit: int = 60) -> str:
    text = redact_url(ascii(name))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _explicit_base(reg: Registry, name: str) -> BaseModel:
    """The registered base ``--base`` names; it must have its weights (the shape check needs them)."""
    row = reg.get(name, "base")
    if row.is_reference:
        raise UsageError(f"--base {row.name}: only a reference; fetch its weights first with "
                         f"`adapt base add {row.name}`")
    return row


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


def _with_base_weights(reg: Registry, base_name: str, revision: str | None, req: _Pull) -> BaseModel:
    builtin = builtin_for(base_name)
    if builtin is not None:
        return add_builtin_base(reg, builtin.name, progress=req.progress)[0]
    return add_hub_base(reg, base_name, revision=revision, allow_pickle=req.allow_pickle, token=req.token,
                        progress=req.progress, endpoint=req.endpoint)[0]


def _declared_base(reg: Registry, adapter, label: str) -> str:
    """The base the adapter's config names, refused (with the nearest registered base) unless it is a Hub id."""
    declared = adapter.config.get("base_model_name_or_path")
    if not isinstance(declared, str) or not declared.strip():
        raise UsageError(f"{label}: adapter_config.json does not name its base "
                         "(base_model_name_or_path); pass --base NAME to attach it to a registered base"
                         + nearest_hint(reg, adapter))
    if not is_model_id(declared):
        raise UsageError(f"{label}: its base_model_name_or_path {_shown_name(declared)} is not a Hub model "
                         "id (a local path, or characters the Hub refuses); pass --base NAME to attach it "
                         "to a registered base" + nearest_hint(reg, adapter))
    return declared


def _pull_base(reg: Registry, req: _Pull, adapter, label: str) -> tuple[str, str | None, BaseModel | None]:
    """(base name, revision, registered row or None) the pulled adapter attaches to."""
    if req.base is not None:
        row = _explicit_base(reg, req.base)
        return row.name, row.revision, row
    base_name = _declared_base(reg, adapter, label)
    base_rev = adapter.config.get("revision") or None
    if req.with_base:
        _with_base_weights(reg, base_name, base_rev, req)
    with reg.session() as s:
        row = reg.find_base(s, base_name)
    if row is None and QUANTIZED_COPY.search(base_name):
        raise UsageError(f"{label}: its base {_shown_name(base_name)} is a quantized copy; pass --base NAME to "
                         "attach it to the registered full-precision base" + nearest_hint(reg, adapter))
    if row is None and builtin_for(base_name) is None:
        _check_base_on_hub(reg, req, adapter, base_name, base_rev, label)
    return base_name, base_rev, row


def _check_base_on_hub(reg: Registry, req: _Pull, adapter, base_name: str, base_rev: str | None,
                       label: str) -> None:
    """A base that would be registered as a reference: refused when the Hub says it does not exist
    (``adapt base add`` could never complete it, so the adapter could never be used)."""
    if client.repo_exists(base_name, base_rev, token=req.token, endpoint=req.endpoint) is not False:
        return
    at = f"@{base_rev}" if base_rev else ""
    raise UsageError(f"{label}: its base {_shown_name(base_name + at)} is not on the Hub at "
                     f"{client.public_endpoint(req.endpoint)}, so the adapter could never be used; pass "
                     "--base NAME to attach it to a registered base" + nearest_hint(reg, adapter))


def reference_warning(base_name: str, adapter_name: str) -> str:
    """What a pull says when its adapter's base is a reference row (no weights yet)."""
    return (f"base {base_name!r} is registered as a reference only (no weights, the adapter's shapes not "
            f"checked against it): `adapt base add {base_name}` before using {adapter_name!r} "
            "(or pull with --with-base)")


# ---- staging and validation ---------------------------------------------------------------------
def _prepare_pulled_folder(got: client.DownloadedRepo, dest: Path, allow_pickle: bool,
                           label: str) -> tuple[list[str], str | None]:
    """Stage the downloaded files in ``dest``; with ``allow_pickle``, convert pickle weights.

    Returns (staged names, the pickle file converted or None). Pickle files themselves are
    never stored: only their safetensors conversion is.
    """
    from safetensors.torch import save_file

    names = [n for n in got.files if not n.lower().endswith(PICKLE_SUFFIXES)]
    converted = None
    if WEIGHTS_NAME not in got.files:
        pickles = [p for p in PICKLE_WEIGHTS if p in got.files]
        if pickles and not allow_pickle:
            raise UsageError(f"{label}: only pickle weights ({', '.join(pickles)}); pass "
                             "--allow-pickle to convert them with the safe loader")
        if pickles:
            converted = pickles[0]
            tensors = load_pickle_tensors(got.path / converted, label)
            save_file(tensors, str(dest / WEIGHTS_NAME), metadata={"format": "pt"})
    stage_links(got.path, names, dest)
    staged = sorted(names + ([WEIGHTS_NAME] if converted else []))
    return staged, converted


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


def _stage_adapter(req: _Pull, got: client.DownloadedRepo, staging: Path, label: str) -> _Staged:
    """Stage and validate the downloaded adapter (UsageError naming ``label`` if it is not a valid LoRA)."""
    if CONFIG_NAME not in got.files:
        _refuse_kohya_repo(got, label)
        raise UsageError(f"{label}: no {CONFIG_NAME}; not a PEFT adapter"
                         + (" (or --include/--exclude left it out)" if req.include or req.exclude else ""))
    staged, converted = _prepare_pulled_folder(got, staging, req.allow_pickle, label)
    try:
        adapter = validate_lora_folder(staging)
    except IntegrityError as e:  # the repo's content is at fault: bad input, not a failure
        raise UsageError(f"{label} is not a valid LoRA: {relabel(str(e), staging, label)}") from None
    except UsageError as e:
        raise UsageError(relabel(str(e), staging, label)) from None
    return _Staged(adapter, staged, converted, _canonical_weights(staging))


# ---- registering ----------------------------------------------------------------------------------
@dataclass
class _PulledRow:
    """The artefact row a pull inserts, and the base row it links to (found or referenced)."""

    reg: Registry
    source: str
    source_sha: str
    base_name: str
    base_rev: str | None
    files: dict
    config: dict
    metrics: dict
    run_id: str

    def insert(self, s, art_name: str) -> tuple[Artifact, str, bool]:
        """Insert under ``art_name`` (``insert_named``'s callback); (artefact, base name, base created)."""
        base, base_created = _find_or_reference_base(s, self.reg, self.base_name, self.base_rev, self.run_id)
        size = sum(self.reg.blobs.path_for(d).stat().st_size for d in self.files.values())
        art = Artifact(kind="lora", name=art_name, base_id=base.id, source=self.source, source_sha=self.source_sha,
                       files=self.files, config=self.config, metrics=self.metrics, size_bytes=size,
                       run_id=self.run_id)
        s.add(art)
        s.flush()
        self.reg.add_lineage(s, base, art, PULL_ROLE)
        return art, base.name, base_created


def _pull_config(req: _Pull, got: client.DownloadedRepo, staged: _Staged, base_name: str) -> dict:
    """The artefact's config: where it came from, its PEFT settings, what was converted or renamed."""
    adapter = staged.adapter
    config = {"hub": {"repo": req.repo_id, "revision": req.revision, "commit": got.commit_sha,
                      "endpoint": client.public_endpoint(req.endpoint), "include": req.include,
                      "exclude": req.exclude},
              "peft": {k: adapter.config[k] for k in _CONFIG_KEYS if k in adapter.config}}
    if staged.converted:
        config["converted_from_pickle"] = staged.converted
    if staged.renamed:
        config["renamed_keys"] = staged.renamed
    if req.base is not None:
        config["attached_to"] = {"base": base_name, "declared_base": adapter.config.get("base_model_name_or_path")}
    return config


def _register_pull(reg: Registry, req: _Pull, got: client.DownloadedRepo, staging: Path, run) -> Artifact:
    """Validate the staged download, check it against its base, store its blobs and insert its row."""
    label = f"{req.repo_id}@{got.commit_sha[:12]}"
    staged = _stage_adapter(req, got, staging, label)
    base_name, base_rev, base_row = _pull_base(reg, req, staged.adapter, label)
    if base_row is not None:
        try:
            check_adapter_against_base(reg, base_row, staged.adapter, label)
        except IntegrityError as e:
            raise UsageError(str(e)) from None
    req.report(0, len(staged.files))
    files = {rel: reg.blobs.put_file(staging / rel) for rel in staged.files}
    metrics = {"parameters": staged.adapter.num_parameters(), "modules": len(staged.adapter.layers())}
    row = _PulledRow(reg, f"{req.repo_id}@{got.commit_sha}", got.commit_sha, base_name, base_rev, files,
                     _pull_config(req, got, staged, base_name), metrics, run.id)
    stem = None if req.name else _default_pull_stem(req.repo_id, req.revision)
    art, base_label, base_created = insert_named(reg, req.name, stem, row.insert)
    run.output = {"artifact": art.name, "id": art.id, "base": base_label, "base_reference_created": base_created,
                  "commit": got.commit_sha, "files": sorted(files)}
    if reg.get(base_label, "base").is_reference:
        run.output["warnings"] = [reference_warning(base_label, art.name)]
        warnings.warn(run.output["warnings"][0], AdaptWarning, stacklevel=3)
    req.report(len(staged.files), len(staged.files))
    return art


def _existing_pull(reg: Registry, repo_id: str, sha: str) -> Artifact | None:
    with reg.session() as s:
        return s.scalar(select(Artifact).where(Artifact.source == f"{repo_id}@{sha}",
                                               Artifact.source_sha == sha).order_by(Artifact.created_at))


def _default_pull_stem(repo_id: str, revision: str | None) -> str:
    return repo_id if not revision or revision == "main" else f"{repo_id}@{revision}"


def _check_before_download(reg: Registry, req: _Pull) -> None:
    """Refuse what is wrong whatever the repo holds: a ``--base`` without weights, a taken ``--name``."""
    if req.base is not None:
        _explicit_base(reg, req.base)
    if req.name is None:
        return
    check_name_syntax(req.name)
    if name_taken(reg, req.name):
        existing = reg.get(req.name, "artifact")
        if existing.source_sha is None or not (existing.source or "").startswith(f"{req.repo_id}@"):
            raise UsageError(f"an artefact named {req.name!r} already exists; pick another --name")


def pull_adapter(reg: Registry, repo: str, *, revision: str | None = None,  # noqa: PLR0913 - the pull command's options, as huggingface_hub's download takes them
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
    req = _Pull(repo_id, revision, _as_list(include), _as_list(exclude), name, allow_pickle, token, with_base,
                progress, endpoint, base)
    _check_before_download(reg, req)
    got = client.download_repo(repo_id, revision=revision, include=req.include, exclude=req.exclude,
                               allow_pickle=allow_pickle, token=token, endpoint=endpoint, progress=progress)
    existing = _existing_pull(reg, repo_id, got.commit_sha)
    if existing is not None:
        return existing, False
    check_new_name(reg, name)
    with record_run(reg, "pull", req.params()) as run, reg.staging("pull") as tmp:
        return _register_pull(reg, req, got, Path(tmp), run), True


# ---- base add -------------------------------------------------------------------------------------
def _base_pickles(got: client.DownloadedRepo, dest: Path, allow_pickle: bool, label: str) -> str:
    """A base with only pickle weights: converted (opt-in) into one ``model.safetensors``; returns their names."""
    from safetensors.torch import save_file

    pickles = sorted(n for n in got.files if n.lower().endswith(PICKLE_SUFFIXES)
                     and "/" not in n and not n.startswith("training_args"))
    if not pickles:
        raise UsageError(f"{label}: no safetensors weights")
    if not allow_pickle:
        raise UsageError(f"{label}: only pickle weights ({', '.join(pickles[:3])}); pass "
                         "--allow-pickle to convert them with the safe loader")
    state: dict = {}
    for p in pickles:
        state.update(load_pickle_tensors(got.path / p, label))
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return ",".join(pickles)


def _prepare_base_folder(got: client.DownloadedRepo, dest: Path, allow_pickle: bool,
                         label: str) -> str | None:
    """Stage a base model's files; pickle weights (opt-in) become one ``model.safetensors``."""
    names = [n for n in got.files if not n.lower().endswith(PICKLE_SUFFIXES)
             and not n.endswith(".bin.index.json")]
    if "config.json" not in names:
        raise UsageError(f"{label}: no config.json; not a transformers model repo")
    weights = [n for n in names if n.endswith(".safetensors")]
    converted = None if weights else _base_pickles(got, dest, allow_pickle, label)
    for n in weights:
        try:
            read_safetensors_header(got.path / n)
        except IntegrityError as e:
            raise UsageError(f"{label} is not a valid model: "
                             f"{relabel(str(e), got.path, label)}") from None
    stage_links(got.path, names, dest)
    return converted


def _store_hub_base(reg: Registry, row: BaseModel | None, got: client.DownloadedRepo, req: _Pull,
                    run_id: str, folder: Path) -> BaseModel:
    """Register the staged base ``folder`` (completing the reference ``row`` if any)."""
    label = f"{req.repo_id}@{got.commit_sha[:12]}"
    converted = _prepare_base_folder(got, folder, req.allow_pickle, label)
    if req.progress is not None:
        req.progress(f"storing {req.repo_id}", 0, 1)
    name = row.name if row is not None else req.repo_id
    base, _created = register_base_folder(reg, name, folder, req.repo_id, req.revision, got.commit_sha, run_id)
    if converted:
        with reg.session() as s:
            b = s.get(BaseModel, base.id)
            b.config = {**(b.config or {}), "_adapterhub_converted_from_pickle": converted}
    if req.progress is not None:
        req.progress(f"storing {req.repo_id}", 1, 1)
    return base


def add_hub_base(reg: Registry, repo: str, revision: str | None = None, allow_pickle: bool = False,
                 token: str | None = None, progress: Progress | None = None,
                 endpoint: str | None = None) -> tuple[BaseModel, bool]:
    """Fetch a base model from the Hub (safetensors; pickles only with ``allow_pickle``).

    Completes a reference row left by ``pull_adapter`` (same hub id) or adds a new base named
    by the repo id. Returns (base, whether weights were stored now); the same commit already
    stored is a no-op.
    """
    repo_id, revision = split_repo(repo, revision)
    req = _Pull(repo_id, revision, allow_pickle=allow_pickle, token=token, progress=progress, endpoint=endpoint)
    got = client.download_repo(repo_id, revision=revision, include=BASE_PATTERNS,
                               allow_pickle=allow_pickle, token=token, endpoint=endpoint,
                               progress=progress)
    with reg.session() as s:
        row = reg.find_base(s, repo_id)
    if row is not None and not row.is_reference and row.commit_sha == got.commit_sha:
        return row, False
    if row is not None and not row.is_reference and row.hub_id != repo_id:
        raise UsageError(f"a base named {repo_id!r} already exists with other weights")
    params = dict(name=repo_id, revision=revision, allow_pickle=allow_pickle,
                  endpoint=client.public_endpoint(endpoint))
    with record_run(reg, "base add", params) as run, reg.staging("base") as tmp:
        base = _store_hub_base(reg, row, got, req, run.id, Path(tmp))
        run.output = {"base": base.name, "id": base.id, "params": base.params,
                      "commit": got.commit_sha, "completed_reference": row is not None}
        return base, True


__all__ = ["pull_adapter", "add_hub_base", "is_model_id", "reference_warning", "PULL_ROLE"]
