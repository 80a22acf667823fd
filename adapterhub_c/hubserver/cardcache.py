"""Model-card metadata for the local Hub: README front matter parsed once per commit.

A hostile card (alias bombs, deep nesting, broken YAML) has no metadata: it never breaks a
listing. ``yaml_problem`` answers ``/api/validate-yaml``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from adapterhub_c.hub.cards import parse_front_matter
from adapterhub_c.hubserver.store import RepoStore

CARD_MAX_BYTES = 1 << 20            # README bytes read for card metadata / validate-yaml
CARD_CACHE_SIZE = 1024


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
        entry = commit.files.get("README.md")
        if entry is None:
            return {}
        try:
            text = self.store.read(entry, max_bytes=CARD_MAX_BYTES).decode("utf-8", "replace")
            return parse_front_matter(text)
        except Exception:  # a broken card has no metadata; it must not break listings
            return {}


def yaml_problem(content: str) -> str | None:
    """Why a README's front matter is invalid, or None if it is fine."""
    try:
        parse_front_matter(content)
    except Exception as e:  # yaml errors, RecursionError on deep nesting, not a mapping
        return f"invalid YAML: {e}"
    return None
