"""How long the listing and showing commands take, against an empty Python start-up.

Usage: python benchmarks/cli_latency.py [--runs 7] [--out benchmarks/results/cli_latency.md]

Each command runs as a fresh process (`python -m adapterhub_c.cli.main ...`, what the `adapt`
script does) in a registry made here with a base, a variant row and an artefact row, --runs
times; the table gives the median and min wall time and the time above `python -c pass`
measured in the same run (goal: ≤ 0.5 s above it on 2 idle cores), and whether the process
imported torch (read from the interpreter itself, not inferred from the time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMANDS = [
    ("adapt --help", ["--help"]),
    ("adapt ls", ["ls"]),
    ("adapt ls variants --json", ["ls", "variants", "--json"]),
    ("adapt show base", ["show", "org/base"]),
    ("adapt lineage base", ["lineage", "org/base"]),
    ("adapt ls runs", ["ls", "runs"]),
    ("adapt gc --dry-run", ["gc", "--dry-run"]),
]
TORCH_PROBE = """
import sys
from adapterhub_c.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch" in sys.modules, file=sys.stderr)
"""


def _time(argv: list[str], runs: int, env: dict) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def _imports_torch(args: list[str], env: dict) -> bool:
    proc = subprocess.run([sys.executable, "-c", TORCH_PROBE, *args], env=env, capture_output=True, text=True)
    return proc.stderr.strip().splitlines()[-1] == "True"


def _registry(home: Path) -> None:
    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.models import BaseModel

    reg = Registry(home=home)
    with reg.session() as s:
        s.add(BaseModel(name="org/base", architecture="LlamaForCausalLM", params=1000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cli_latency.md")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="adapt-cli-latency-"))
    _registry(home)
    env = {**os.environ, "ADAPTERHUB_HOME": str(home)}
    env.pop("ADAPTERHUB_DB_URL", None)
    base = _time([sys.executable, "-c", "pass"], args.runs, env)
    base_med = statistics.median(base)
    rows = [("python -c pass", statistics.median(base), min(base), 0.0, "no")]
    for label, argv in COMMANDS:
        times = _time([sys.executable, "-m", "adapterhub_c.cli.main", *argv], args.runs, env)
        med = statistics.median(times)
        rows.append((label, med, min(times), med - base_med, "yes" if _imports_torch(argv, env) else "no"))
    load = os.getloadavg()[0]
    lines = [f"CLI latency: {args.runs} runs each, fresh processes, {os.cpu_count()} CPUs, load average {load:.2f} "
             f"at the end; `python benchmarks/cli_latency.py --runs {args.runs}`", "",
             "| command | median (s) | min (s) | above `python -c pass` (s) | ratio to `python -c pass` | imports torch |",
             "|---|---:|---:|---:|---:|---|"]
    for label, med, lo, above, torch_ in rows:
        lines.append(f"| {label} | {med:.3f} | {lo:.3f} | {above:.3f} | {med / base_med:.1f}x | {torch_} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
