"""The benchmark scripts run with their folder first on ``sys.path`` (Python puts a script's
folder there), so a script named like an installed package would shadow it for every other
benchmark: ``benchmarks/gguf.py`` once broke each script that reads a GGUF."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_importable_module():
    here = {str(BENCHMARKS), str(BENCHMARKS.resolve())}
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) not in here]
    try:
        clashes = [p.name for p in sorted(BENCHMARKS.glob("*.py"))
                   if p.stem in sys.stdlib_module_names or importlib.util.find_spec(p.stem) is not None]
    finally:
        sys.path[:] = saved
    assert clashes == []
