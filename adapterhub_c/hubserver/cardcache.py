"""Model-card metadata for the local Hub: README front matter parsed once per commit.

A hostile card (alias bombs, deep nesting, broken YAML, values JSON cannot carry: ``.nan``,
``.inf``, ``!!binary``) has no metadata: it never breaks a listing or another repo's answer.
Commits refuse such a README (``readme_problem``, 400); ``yaml_problem`` answers
``/api/validate-yaml`` with the same checks.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from adapterhub_c.hub.cards import json_card, parse_front_matter
from adapterhub_c.hubserver.store import RepoStore

CARD_MAX_BYTES = 1 << 20            # README bytes read for card metadata / validate-yaml
CARD_CACHE_SIZE = 1024
README = "README.md"


def card_metadata(text: str) -> dict:
    """The front matter of README ``text`` as JSON data (``{}`` if none); raises on YAML errors, aliases,
    nesting and values JSON cannot carry (``hub.cards.CardDataError``)."""
    return json_card(parse_front_matter(text))


def readme_text(data: bytes) -> str:
    """The part of a README's bytes its metadata is read from (the first CARD_MAX_BYTES)."""
    return data[:CARD_MAX_BYTES].decode("utf-8", "replace")


class CardCache:
    """README front matter by (repo, commit), least recently used dropped past ``size`` (thread-safe)."""

    def __init__(self, store: RepoStore, size: int = CARD_CACHE_SIZE):
        self.store, self.size = store, size
        self._cards: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, repo_id: str, commit) -> dict:
        """The README front matter at ``commit`` ({} if none or invalid), parsed once per commit."""
        key = (repo_id, commit.id)
        with self._lock:
            if key in self._cards:
                self._cards.move_to_end(key)
                return self._cards[key]
        data = self._parse(commit)
        with self._lock:
            self._cards[key] = data
            while len(self._cards) > self.size:
                self._cards.popitem(last=False)
        return data

    def _parse(self, commit) -> dict:
        entry = commit.files.get(README)
        if entry is None:
            return {}
        try:
            return card_metadata(readme_text(self.store.read(entry, max_bytes=CARD_MAX_BYTES)))
        except Exception:  # a broken card has no metadata; it must not break listings
            return {}


def yaml_problem(content: str) -> str | None:
    """Why a README's front matter is invalid, or None if it is fine."""
    try:
        card_metadata(content)
    except Exception as e:  # yaml errors, RecursionError on deep nesting, not a mapping, not JSON-safe
        return f"invalid YAML: {e}"
    return None


def readme_problem(data: bytes) -> str | None:
    """Why a README about to be committed has metadata no Hub answer could carry, or None."""
    problem = yaml_problem(readme_text(data))
    return f"{README}: {problem}" if problem else None
