from __future__ import annotations

from typing import Any

from adapterhub_c.errors import UsageError
from adapterhub_c.packing.compeft import check_params


def parse_density(value: Any) -> float:
    """A density from ``0.1``, ``"0.1"`` or ``"10%"``; UsageError unless in (0, 1]."""
    text = str(value).strip()
    try:
        k = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"density must be a number in (0, 1] or a percentage, got {value!r}") from None
    check_params(k)
    return k


def parse_alpha(value: Any) -> float | str:
    """``"auto"`` or a positive number."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"alpha must be a positive number or 'auto', got {value!r}") from None
    check_params(1.0, a)
    return a
