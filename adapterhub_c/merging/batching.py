"""Grouping modules of one shape into memory-bounded chunks, for batched tensor work."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Hashable, Iterator, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_CHUNK_BYTES = 256 << 20


def chunks_by_key(items: Sequence[T], key: Callable[[T], Hashable], cost: Callable[[T], int],
                  budget: int = DEFAULT_CHUNK_BYTES) -> Iterator[list[T]]:
    """Yield lists of items with equal ``key`` whose summed ``cost`` stays within ``budget``
    (a single item over budget gets a chunk of its own)."""
    groups: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    for group in groups.values():
        chunk, used = [], 0
        for item in group:
            c = cost(item)
            if chunk and used + c > budget:
                yield chunk
                chunk, used = [], 0
            chunk.append(item)
            used += c
        if chunk:
            yield chunk
