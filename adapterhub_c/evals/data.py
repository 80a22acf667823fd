"""Datasets: the built-in corpus, the built-in synthetic tasks, and user files.

Names:
- ``builtin:pydoc``: the English text of Python's documentation (``pydoc_data.topics``),
  cut into chunks of whole paragraphs (at least ``CHUNK_CHARS`` characters) and split
  deterministically by a hash of (topic, chunk index): 10% test, 10% validation, 80% train.
- ``builtin:task/<name>``: synthetic instruction tasks of prompt/completion pairs with an
  exact-match metric (see ``tasks.py``).
- a path to a ``.txt`` file (one text; blank-line separated documents) or a ``.jsonl`` file
  of ``{"text": …}`` or ``{"prompt": …, "completion": …}`` lines. User files have no splits:
  every split is the whole file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.evals import tasks
from adapterhub_c.options.corpus import DEFAULT_CORPUS

SPLITS = ("train", "validation", "test")
CHUNK_CHARS = 1500


@dataclass
class Dataset:
    """Either plain texts (language modelling) or prompt/completion pairs (a task)."""

    name: str
    split: str
    texts: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def is_task(self) -> bool:
        return bool(self.pairs)

    def as_texts(self) -> list[str]:
        """Texts for language modelling (pairs are joined prompt + completion)."""
        return self.texts if self.texts else [p + c for p, c in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs else len(self.texts)


def _bucket(key: str) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def pydoc_chunks() -> dict[str, list[str]]:
    """The pydoc corpus as {split: [chunk, …]}, deterministic."""
    from pydoc_data.topics import topics

    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen: set[str] = set()

    def emit(key: str, text: str) -> None:
        if text not in seen:  # some topics repeat whole passages of others
            seen.add(text)
            out[_bucket(key)].append(text)

    for topic in sorted(topics):
        paragraphs = [p.strip() for p in topics[topic].split("\n\n") if p.strip()]
        chunk, index = [], 0
        for para in paragraphs:
            chunk.append(para)
            if sum(len(p) for p in chunk) >= CHUNK_CHARS:
                emit(f"{topic}/{index}", "\n\n".join(chunk))
                chunk, index = [], index + 1
        if chunk:
            emit(f"{topic}/{index}", "\n\n".join(chunk))
    return out


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    texts, pairs = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: expected an object with 'text' or 'prompt'/'completion'")
        if "prompt" in row and "completion" in row:
            pairs.append((str(row["prompt"]), str(row["completion"])))
        elif "text" in row:
            texts.append(str(row["text"]))
        else:
            raise UsageError(f"{path}:{lineno}: expected keys 'text' or 'prompt' and 'completion'")
    if texts and pairs:
        raise UsageError(f"{path}: mixes 'text' lines and 'prompt'/'completion' lines")
    return texts, pairs




def load_dataset(spec: str, split: str = "test") -> Dataset:
    """Load a dataset by name (see module docstring) and split."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if spec == DEFAULT_CORPUS:
        return Dataset(spec, split, texts=pydoc_chunks()[split])
    if spec.startswith("builtin:task/"):
        return Dataset(spec, split, pairs=tasks.task_pairs(spec.split("/", 1)[1], split))
    if spec.startswith("builtin:"):
        known = [DEFAULT_CORPUS] + [f"builtin:task/{t}" for t in tasks.TASKS]

        raise NotFoundError("dataset", spec, known)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"data file {spec!r} not found")
    if path.suffix == ".jsonl":
        texts, pairs = _read_jsonl(path)
    else:
        content = path.read_text(encoding="utf-8")
        texts = [d.strip() for d in content.split("\n\n\n") if d.strip()]
        pairs = []
    if not texts and not pairs:
        raise UsageError(f"data file {spec!r} is empty")
    return Dataset(spec, split, texts=texts, pairs=pairs)
