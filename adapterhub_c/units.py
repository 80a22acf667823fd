"""How figures are written for people: one spelling of a size for the CLI tables and the web page."""
from __future__ import annotations


def human_bytes(n: int | float | None) -> str:
    """``n`` bytes in 1024-based units with one decimal (``"-"`` for unknown)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


__all__ = ["human_bytes"]
