"""Knowledge written once: each of these names is defined in one module and imported elsewhere.

A grep over the package's own source, so a second definition fails here the day it is written.
"""
from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapterhub_c"

# (what, the pattern of a definition, the one module allowed to hold it)
SINGLE_SOURCES = [
    ("the progress callback type", r"^\s*Progress\s*=", "progress.py"),
    ("the default corpus name", r"""["']builtin:pydoc["']""", "options/corpus.py"),
]


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" not in path.parts:
            yield path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")


def _holders(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return [rel for rel, text in _sources() if rx.search(text)]


def test_each_piece_of_knowledge_has_one_home():
    for what, pattern, home in SINGLE_SOURCES:
        assert _holders(pattern) == [home], f"{what} is defined outside {home}"


def test_the_check_finds_a_second_definition(tmp_path):
    """The scan above is not vacuous: it sees the real definitions."""
    assert _holders(r"^\s*Progress\s*=") == ["progress.py"]
    assert _holders(r"^DEFAULT_CORPUS\s*=") == ["options/corpus.py"]
