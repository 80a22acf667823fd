"""The benchmark scripts run with their folder first on ``sys.path`` (Python puts a script's
folder there), so a script named like an installed package would shadow it for every other
benchmark: ``benchmarks/gguf.py`` once broke each script that reads a GGUF."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# run apart from the suite: tests put benchmarks/ on sys.path and import its scripts (zoo, …)
PROBE = """
import importlib.util, json, sys
names = json.loads(sys.argv[1])
print(json.dumps([n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n) is not None]))
"""


def test_no_benchmark_script_shadows_an_importable_module(tmp_path):
    stems = [p.stem for p in sorted(BENCHMARKS.glob("*.py"))]
    assert "zoo" in stems  # the probe looks at the real folder
    out = subprocess.run([sys.executable, "-P", "-c", PROBE, json.dumps(stems)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
