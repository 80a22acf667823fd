"""Synthetic instruction tasks with exact answers (``builtin:task/<name>``).

Each task draws prompt/completion pairs from a seeded generator; the splits use
different seeds, so no test prompt is a training prompt by construction of the seed
(duplicates across splits are removed). Completions start with a space and end without
a newline; exact match compares stripped strings.
"""
from __future__ import annotations

import json
import random
from typing import Callable

from adapterhub_c.errors import NotFoundError

WORDS = ("apple river stone cloud tiger lamp green seven orange piano forest candle "
         "silver window rocket garden violet marble thunder pencil").split()
SPLIT_SIZES = {"train": 2000, "validation": 100, "test": 100}
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the words: {' '.join(words)}\nAnswer:", " " + " ".join(reversed(words))


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return f"Sort ascending: {' '.join(map(str, nums))}\nAnswer:", " " + " ".join(map(str, sorted(nums)))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Uppercase: {' '.join(words)}\nAnswer:", " " + " ".join(words).upper()


def _add_numbers(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"Add: {a} + {b}\nAnswer:", f" {a + b}"


def _json_field(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(["name", "color", "city", "animal", "food"], 3)
    obj = {k: rng.choice(WORDS) for k in keys}
    key = rng.choice(keys)
    return f"Extract the field \"{key}\" from {json.dumps(obj)}\nAnswer:", f" {obj[key]}"


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse-words": _reverse_words,
    "sort-numbers": _sort_numbers,
    "uppercase": _uppercase,
    "add-numbers": _add_numbers,
    "json-field": _json_field,
}


def task_pairs(name: str, split: str) -> list[tuple[str, str]]:
    """The deterministic prompt/completion pairs of a task split."""
    if name not in TASKS:
        raise NotFoundError("task", name, TASKS)
    taken: set[str] = set()
    for other in ("test", "validation", "train"):
        if other == split:
            break
        taken |= {p for p, _ in _draw(name, other)}
    return [(p, c) for p, c in _draw(name, split) if p not in taken]


def _draw(name: str, split: str) -> list[tuple[str, str]]:
    rng = random.Random(f"{name}/{SPLIT_SEEDS[split]}")
    seen, out = set(), []
    for _ in range(SPLIT_SIZES[split] * 3):
        p, c = TASKS[name](rng)
        if p not in seen:
            seen.add(p)
            out.append((p, c))
        if len(out) == SPLIT_SIZES[split]:
            break
    return out
