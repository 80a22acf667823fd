"""The progress callback every long-running library function takes.

``progress(description, completed, total)``: ``total`` is None when the amount of work is
unknown. The library never prints; the CLI draws these calls as a progress bar.
"""
from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, "int | None"], None]

__all__ = ["Progress"]
