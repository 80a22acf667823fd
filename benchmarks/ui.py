"""How fast `adapt ui` answers over a big registry: every page, HTML and JSON, over real HTTP.

Usage: python benchmarks/ui.py [--rows 5000] [--repeat 5] [--out benchmarks/results/ui.md]

The registry is generated in-process (``populate``): one base, two variants and ``--rows``
artefacts (LoRAs, converted LoRAs, packs, merges, prompts) with lineage edges, evaluations
and runs (one in twenty failed). Goal: every page under one second on 2 cores. The page is
served by the same app as `adapt ui` (uvicorn in a thread); each URL is fetched ``--repeat``
times after one warm-up, and the table gives the median and the worst.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("lora", "recovered-lora", "pack", "merged", "prompt")
RECIPE = json.dumps({"quant": "nf4", "prune": "magnitude", "sparsity": 0.5}, sort_keys=True)


def populate(reg, n: int, base_name: str = "org/base") -> dict:
    """``n`` artefact rows (and their lineage, evaluations and runs) on one base with two variants."""
    from adapterhub_c.registry.models import Artifact, BaseModel, Evaluation, Lineage, Run, Variant

    with reg.session() as s:
        base = BaseModel(name=base_name, hub_id=base_name, architecture="LlamaForCausalLM", params=135_000_000,
                         size_bytes=270_000_000, files={})
        variants = [Variant(name=f"{base_name.split('/')[-1]}-v{i}", recipe=RECIPE,
                            recipe_digest=f"d{i}", files={}, size_bytes=270_000_000, sparsity=0.5,
                            stats={"own_bytes": 13_000_000 * (i + 1), "base_fp16_bytes": 270_000_000,
                                   "quantized_bytes": 170_000_000, "perplexity": 20.0 + i, "base_perplexity": 17.0})
                    for i in range(2)]
        s.add(base)
        s.flush()
        for v in variants:
            v.base_id = base.id
            s.add(v)
        s.flush()
        arts = _artifacts(s, base, variants, n, Artifact, Lineage, Evaluation)
        _runs(s, n, Run)
    return {"base": base_name, "variants": [v.name for v in variants], "artifacts": arts}


def _artifacts(s, base, variants, n, Artifact, Lineage, Evaluation) -> list[str]:
    names, previous = [], None
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        variant = variants[i % 2] if kind in ("recovered-lora", "pack", "prompt") else None
        art = Artifact(kind=kind, name=f"a{i:05d}-{kind}", base_id=base.id, variant_id=variant.id if variant else None,
                       source=f"org/lora-{i}@main" if kind == "lora" else f"adapt {kind}", files={},
                       config={"rank": 8, "tags": ["task-" + str(i % 7)]}, metrics={}, size_bytes=1000 + 37 * i)
        s.add(art)
        s.flush()
        if previous is not None and kind in ("recovered-lora", "pack", "merged"):
            s.add(Lineage(parent_id=previous.id, parent_type="artifact", child_id=art.id, child_type="artifact",
                          role={"recovered-lora": "inherited-from", "pack": "packed-from",
                                "merged": "merge-input"}[kind]))
        s.add(Evaluation(base_id=base.id, variant_id=variant.id if variant else None, artifact_id=art.id,
                         dataset="builtin:task/reverse-words", split="test", metric="exact_match",
                         value=(i % 100) / 100, details={"exact_match_ci95": [0.0, 1.0]}))
        previous, names = art, names + [art.name]
    return names


def _runs(s, n, Run) -> None:
    for i in range(n):
        failed = i % 20 == 0
        s.add(Run(command=("adapt convert", "pack", "merge", "adapt train")[i % 4], parameters={"i": i},
                  status="failed" if failed else "succeeded", duration_s=1.0 + i % 13, output={},
                  error="RuntimeError: boom" if failed else None))


def pages(world: dict) -> list[str]:
    base = world["base"].replace("/", "%2F")
    a = world["artifacts"]
    html = ["", "tree", f"tree/{base}", f"tree/{base}?page=3", f"object/{a[2]}", f"object/{a[len(a) // 2]}",
            f"object/{world['variants'][0]}", f"object/{base}", f"compare?names={a[0]}%0A{a[1]}%0A{a[2]}",
            f"compare?task=reverse-words&variant={world['variants'][0]}", "runs", "runs?status=failed&page=2",
            "search?q=a0", "search?q=task-3&kind=lora&page=4", "object/no-such-thing"]
    return html + [p + ("&" if "?" in p else "?") + "format=json" for p in html]


def fetch(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        e.read()
        status = e.code
    return time.perf_counter() - t0, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ui.md"))
    args = ap.parse_args()

    from adapterhub_c.registry import Registry
    from adapterhub_c.ui.server import background_ui

    with tempfile.TemporaryDirectory(prefix="adapt-ui-bench-") as home:
        reg = Registry(home=home)
        t0 = time.perf_counter()
        world = populate(reg, args.rows)
        made = time.perf_counter() - t0
        server = background_ui(reg)
        server.start()
        rows = []
        try:
            for page in pages(world):
                fetch(server.endpoint + "/" + page)
                times, status = zip(*(fetch(server.endpoint + "/" + page) for _ in range(args.repeat)), strict=True)
                rows.append((page, status[0], statistics.median(times), max(times)))
        finally:
            server.stop()
    report(rows, args, made)


def report(rows, args, made: float) -> None:
    worst = max(r[3] for r in rows)
    lines = [f"# adapt ui over {args.rows} artefacts ({args.rows} runs, {args.rows} evaluations)", "",
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end; registry generated in "
             f"{made:.1f} s; each page fetched {args.repeat} times after a warm-up. Goal: every page < 1 s.", "",
             "| page | status | median ms | worst ms |", "|---|---|---|---|"]
    lines += [f"| `/{p}` | {st} | {med * 1000:.0f} | {mx * 1000:.0f} |" for p, st, med, mx in rows]
    lines += ["", f"worst of all: {worst * 1000:.0f} ms ({'met' if worst < 1 else 'NOT met'})"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
