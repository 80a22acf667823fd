"""The Hub client side: pull a repo into the HF cache, push a folder, search adapters of a base.

Everything goes through the real ``huggingface_hub`` client, so it works against
huggingface.co and against the local server (:mod:`adapterhub_c.hubserver`) alike.
``endpoint`` / ``token`` are passed explicitly; when left out, HF_ENDPOINT, HF_TOKEN,
HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE are read at call time (not only at import).
Tokens never appear in messages or return values.
"""
from __future__ import annotations

import glob
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from adapterhub_c.errors import AdaptError, UsageError
from adapterhub_c.fsutil import atomic_write_bytes, redact_url
from adapterhub_c.hub.cards import model_card  # noqa: F401  (re-exported: part of the client API)
from adapterhub_c.hub.names import git_blob_oid, shown
from adapterhub_c.hub.validate import validate_lora_folder  # noqa: F401  (re-exported)
from adapterhub_c.progress import Progress

SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_SKIP_DIRS = (".git", ".cache")
DEFAULT_TRIES = 5


@dataclass
class DownloadedRepo:
    """A repo snapshot in the local HF cache."""

    path: Path
    commit_sha: str
    files: list[str] = field(default_factory=list)


@dataclass
class PushResult:
    """The outcome of a push: the repo's head commit, whether bytes were sent, the repo URL."""

    commit_sha: str
    uploaded: bool
    url: str


# ---- environment ----------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def public_endpoint(endpoint: str | None = None) -> str:
    """:func:`resolve_endpoint` without any ``user:password@``: the form to store or print."""
    return redact_url(resolve_endpoint(endpoint))


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else HF_ENDPOINT, else huggingface_hub's default (no trailing slash)."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default cache."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def _api(endpoint: str, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="adapterhub-c")


# ---- errors and retries -------------------------------------------------------------------------
def _scrub(text: str, token: str | None) -> str:
    text = redact_url(text.splitlines()[0]) if text else text
    if token:
        text = text.replace(token, "***")
    return text


def _transient(exc: BaseException) -> str | None:
    """A short reason if ``exc`` (or its cause) is worth retrying: 429, 5xx, network trouble."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
            return None
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status == 429:
                return "rate limited (HTTP 429)"
            if status in (408, 500, 502, 503, 504):
                return f"server error (HTTP {status})"
            return None
        if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return f"connection problem ({type(exc).__name__})"
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            return "incomplete transfer"
        exc = exc.__cause__ or exc.__context__
    return None


def _with_retries(fn: Callable[[], object], what: str, endpoint: str, tries: int,
                  base_delay: float, progress: Progress | None, max_delay: float = 8.0):
    """Run ``fn``; retry transient failures with exponential backoff, then a clear AdaptError."""
    tries = max(1, tries)
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as e:  # classified below; anything else propagates unchanged
            reason = _transient(e)
            if reason is None:
                raise
            if attempt == tries:
                raise AdaptError(f"{what} failed: {reason} from {redact_url(endpoint)} "
                                 f"after {tries} tries") from None
            if progress is not None:
                progress(f"retrying ({reason})", attempt, tries)
            time.sleep(min(max_delay, base_delay * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


def _translate(e: Exception, repo_id: str, revision: str | None, endpoint: str,
               token: str | None) -> Exception:
    """huggingface_hub errors → our one-line UsageError / AdaptError."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, RevisionNotFoundError):
        return UsageError(f"revision {shown(revision)} not found in hub repo {shown(repo_id)}")
    if isinstance(e, RepositoryNotFoundError):
        return UsageError(f"hub repo {shown(repo_id)} not found at {redact_url(endpoint)} "
                          "(or it is private and no valid token was given)")
    if isinstance(e, HFValidationError):
        return UsageError(f"invalid hub repo id {shown(repo_id)}: {_scrub(str(e), token)}")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status in (401, 403):
            return AdaptError(f"the hub at {redact_url(endpoint)} refused the token (HTTP {status}) "
                              f"for {shown(repo_id)}; check HF_TOKEN / --token")
        return AdaptError(f"hub request for {shown(repo_id)} failed (HTTP {status}): "
                          f"{_scrub(e.server_message or '', token)}".rstrip(": "))
    return AdaptError(f"hub request for {shown(repo_id)} failed: {_scrub(str(e), token)}")


# ---- file selection ----------------------------------------------------------------------------
def unsafe_repo_path(name: str) -> bool:
    """True for names that could escape the download folder (absolute, ``..``, backslashes)."""
    return (not name or name.startswith(("/", "\\")) or "\\" in name or "\0" in name
            or (len(name) > 1 and name[1] == ":")
            or any(part in ("..", ".") for part in name.split("/")))


def select_files(names: Iterable[str], include=None, exclude=None,
                 allow_pickle: bool = False, repo_id: str = "") -> list[str]:
    """The files to download: names filtered by include/exclude; pickles refused or skipped.

    A repo whose only weights are pickles (.bin/.pt/.pkl/.ckpt) is refused unless
    ``allow_pickle``; when safetensors weights exist, pickle files are simply not fetched.
    """
    from huggingface_hub.utils import filter_repo_objects

    names = list(names)
    bad = [n for n in names if unsafe_repo_path(n)]
    if bad:
        raise UsageError(f"hub repo {shown(repo_id)} lists unsafe file names {bad[:3]!r}; refusing "
                         "to download")
    chosen = list(filter_repo_objects(names, allow_patterns=include, ignore_patterns=exclude))
    pickles = [n for n in chosen if n.lower().endswith(PICKLE_WEIGHTS)]
    safe = [n for n in chosen if n.lower().endswith(SAFE_WEIGHTS)]
    if pickles and not allow_pickle:
        if not safe:
            raise UsageError(f"hub repo {shown(repo_id)} has only pickle weights "
                             f"({', '.join(pickles[:3])}); pass allow_pickle to fetch them "
                             "(they are never unpickled)")
        chosen = [n for n in chosen if n not in pickles]
    return sorted(chosen)


# ---- progress -----------------------------------------------------------------------------------
def _tqdm_bridge(progress: Progress):
    """A silent tqdm class that forwards updates to ``progress(description, completed, total)``."""
    from tqdm.auto import tqdm

    class _Bridge(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._desc = kwargs.get("desc") or "download"
            self.n = kwargs.get("initial", 0) or 0
            self.total = kwargs.get("total")

        def update(self, n=1):
            self.n += n or 0
            progress(self._desc, int(self.n), int(self.total) if self.total else None)

        def set_description(self, desc=None, refresh=True):
            self._desc = desc or self._desc

        set_description_str = set_description

        def set_postfix_str(self, *args, **kwargs):
            pass

        def refresh(self, *args, **kwargs):
            pass

        @property
        def format_dict(self):
            return {"n": self.n, "total": self.total, "rate": None}

    return _Bridge


# ---- pull --------------------------------------------------------------------------------------
def download_repo(repo_id: str, revision: str | None = None, include=None, exclude=None,  # noqa: PLR0913 - mirrors huggingface_hub's snapshot_download keywords
                  allow_pickle: bool = False, token: str | None = None,
                  endpoint: str | None = None, progress: Progress | None = None, *,
                  cache_dir: str | Path | None = None, tries: int = DEFAULT_TRIES,
                  base_delay: float = 1.0) -> DownloadedRepo:
    """Download a repo snapshot into the HF cache and return where it is.

    The file list is checked first: unsafe names are refused, pickle-only repos refused
    unless ``allow_pickle``. Not found → UsageError; 429 / 5xx / network errors are retried
    ``tries`` times with exponential backoff from ``base_delay`` seconds, then AdaptError.
    With HF_HUB_OFFLINE=1 the cached snapshot is used, or AdaptError if there is none.
    """
    endpoint = resolve_endpoint(endpoint)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if is_offline():
        return _download_offline(repo_id, revision, include, exclude, allow_pickle, cache)
    api = _api(endpoint, token)
    tqdm_class = _tqdm_bridge(progress) if progress is not None else None

    def attempt() -> DownloadedRepo:
        from huggingface_hub import snapshot_download

        if progress is not None:
            progress(f"listing {repo_id}", 0, None)
        info = api.model_info(repo_id, revision=revision)
        names = [s.rfilename for s in (info.siblings or [])]
        chosen = select_files(names, include, exclude, allow_pickle, repo_id)
        path = snapshot_download(repo_id, revision=info.sha, cache_dir=cache, endpoint=endpoint,
                                 token=token, allow_patterns=[glob.escape(n) for n in chosen],
                                 tqdm_class=tqdm_class, max_workers=4,
                                 library_name="adapterhub-c")
        missing = [n for n in chosen if not (Path(path) / n).is_file()]
        if missing:
            raise AdaptError(f"download of {shown(repo_id)} is incomplete: missing {missing[:3]}")
        _write_ref(cache, repo_id, revision or "main", info.sha)
        return DownloadedRepo(Path(path), info.sha, chosen)

    try:
        return _with_retries(attempt, f"download of {shown(repo_id)}", endpoint, tries, base_delay,
                             progress)
    except (AdaptError, UsageError):
        raise
    except Exception as e:
        raise _translate(e, repo_id, revision, endpoint, token) from None


def repo_exists(repo_id: str, revision: str | None = None, token: str | None = None,
                endpoint: str | None = None) -> bool | None:
    """Whether the Hub has model repo ``repo_id`` (at ``revision``): True, False when it answers
    "not found", None when it cannot tell (offline, network trouble, other errors)."""
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if is_offline():
        return None
    try:
        _api(resolve_endpoint(endpoint), token).model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        return False
    except Exception:  # noqa: BLE001 - cannot tell: the caller decides without the answer
        return None
    return True


def _write_ref(cache: Path, repo_id: str, revision: str, sha: str) -> None:
    """Record ``revision → sha`` in the cache's refs/ so offline use finds the snapshot."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    if REGEX_COMMIT_HASH.fullmatch(revision) or unsafe_repo_path(revision):
        return
    ref = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    if not ref.is_file() or ref.read_text() != sha:
        atomic_write_bytes(ref, sha.encode())


def _download_offline(repo_id, revision, include, exclude, allow_pickle, cache) -> DownloadedRepo:
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    rev = revision or "main"
    where = f"{repo_id}@{rev}"
    try:
        names = [f.path for f in get_cached_repo_tree(repo_id, revision=rev, cache_dir=cache)]
        patterns = [glob.escape(n) for n in
                    select_files(names, include, exclude, allow_pickle, repo_id)]
    except CachedRepoTreeNotFoundError:
        patterns = None
    try:
        path = Path(snapshot_download(repo_id, revision=rev, cache_dir=cache,
                                      local_files_only=True, allow_patterns=patterns))
    except Exception:
        raise AdaptError(f"offline mode (HF_HUB_OFFLINE=1) and {where} is not (fully) in the "
                         f"cache at {cache}; pull it once online first") from None
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    chosen = select_files(files, include, exclude, allow_pickle, repo_id)
    return DownloadedRepo(path, path.name, chosen)


# ---- push --------------------------------------------------------------------------------------
def _local_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in _SKIP_DIRS:
            out[rel.as_posix()] = p
    return out


def _same(local: Path, remote) -> bool:
    """Whether a local file equals a remote RepoFile (sha256 for LFS files, git oid otherwise)."""
    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        h = hashlib.sha256()
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest() == remote.lfs.sha256
    return git_blob_oid(local.read_bytes()) == remote.blob_id


def _pushable_files(folder: Path) -> dict[str, Path]:
    """The files of ``folder`` to push, by repo path (UsageError if none, or an unsafe name)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    local = _local_files(folder)
    if not local:
        raise UsageError(f"{folder}: nothing to push (empty folder)")
    bad = [p for p in local if unsafe_repo_path(p)]
    if bad:
        raise UsageError(f"{folder}: unsafe file names {bad[:3]!r}")
    return local


def push_folder(folder: str | Path, repo_id: str, private: bool = False,
                commit_message: str | None = None, token: str | None = None,
                endpoint: str | None = None, progress: Progress | None = None, *,
                tries: int = DEFAULT_TRIES, base_delay: float = 1.0) -> PushResult:
    """Create ``repo_id`` if needed and commit the folder's files that differ from the remote.

    Files whose content already matches the remote are not re-sent; if nothing differs, no
    commit is made and ``uploaded`` is False. A rejected token → AdaptError (token not shown).
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    local = _pushable_files(Path(folder))
    endpoint = resolve_endpoint(endpoint)
    if is_offline():
        raise AdaptError(f"cannot push {shown(repo_id)}: offline mode (HF_HUB_OFFLINE=1)")
    api = _api(endpoint, token)
    first_sha: list[str] = []

    def attempt() -> PushResult:
        url = f"{endpoint}/{repo_id}"
        try:
            url = str(api.create_repo(repo_id, private=private, exist_ok=False))
        except HfHubHTTPError as e:
            if e.response is None or e.response.status_code != 409:
                raise
        head = api.model_info(repo_id).sha
        first_sha.append(head)
        remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=head)
                  if hasattr(f, "blob_id")}
        changed = [p for p, lp in local.items() if p not in remote or not _same(lp, remote[p])]
        if progress is not None:
            progress(f"comparing with {repo_id}", len(local) - len(changed), len(local))
        if not changed:
            return PushResult(head, head != first_sha[0], redact_url(url))
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local[p])) for p in changed]
        info = api.create_commit(repo_id, operations=ops, parent_commit=head,
                                 commit_message=commit_message
                                 or f"Upload {len(changed)} file(s) with adapterhub-c")
        if progress is not None:
            progress(f"pushed {repo_id}", len(local), len(local))
        return PushResult(info.oid, info.oid != first_sha[0], redact_url(url))

    try:
        return _with_retries(attempt, f"push to {shown(repo_id)}", endpoint, tries, base_delay,
                             progress)
    except (AdaptError, UsageError):
        raise
    except Exception as e:
        raise _translate(e, repo_id, None, endpoint, token) from None


# ---- search ------------------------------------------------------------------------------------
def search_adapters(base: str, limit: int = 50, token: str | None = None,
                    endpoint: str | None = None, *, tries: int = DEFAULT_TRIES,
                    base_delay: float = 1.0) -> list[dict]:
    """Adapters of ``base`` on the Hub (``list_models(filter="base_model:adapter:<base>")``)."""
    endpoint = resolve_endpoint(endpoint)
    if is_offline():
        raise AdaptError("cannot search the hub: offline mode (HF_HUB_OFFLINE=1)")
    api = _api(endpoint, token)

    def attempt() -> list[dict]:
        out = []
        for m in api.list_models(filter=f"base_model:adapter:{base}", limit=limit, cardData=True):
            out.append({"id": m.id, "sha": m.sha, "private": m.private, "tags": list(m.tags or []),
                        "library_name": m.library_name,
                        "last_modified": m.last_modified.isoformat() if m.last_modified else None,
                        "base_model": base})
        return out

    try:
        return _with_retries(attempt, f"search for adapters of {shown(base)}", endpoint, tries,
                             base_delay, None)
    except (AdaptError, UsageError):
        raise
    except Exception as e:
        raise _translate(e, base, None, endpoint, token) from None
