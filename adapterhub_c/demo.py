"""``adapt demo``: the main flow on the embedded defaults, one section per step.

``run_demo`` yields ``(title, rows)`` sections as they complete so the CLI can print them
while the next step runs. Each capability adds its step here.
"""
from __future__ import annotations

from typing import Iterator

from .evals.ops import run_eval
from .models.builtin import SMOLLM2
from .models.ops import add_builtin_base
from .registry.store import Registry

DEMO_DATA = "builtin:pydoc"
DEMO_MAX_TOKENS = 8192


def run_demo(reg: Registry, base: str = SMOLLM2, max_tokens: int = DEMO_MAX_TOKENS,
             progress=None) -> Iterator[tuple[str, list[dict]]]:
    """Run the demo flow on ``base``; yields (section title, table rows)."""
    b, created = add_builtin_base(reg, base, progress=progress)
    yield "base", [{"base": b.name, "params": b.params, "registered": "now" if created else "already"}]
    row = run_eval(reg, b.name, DEMO_DATA, "test", max_tokens=max_tokens, progress=progress)
    yield f"perplexity on {DEMO_DATA} test (first {max_tokens} tokens)", [
        {"model": b.name, "perplexity": row["perplexity"]}]
