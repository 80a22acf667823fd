"""Compression-aware soft prompts on the real SmolLM2-135M (Compress, Then Prompt, Table 2 + Figure 5).

Usage: python benchmarks/soft_prompt.py [--home DIR] [--steps 150] [--tokens 32] [--lr 1e-3]
           [--seq-len 128] [--batch-size 2] [--eval-tokens 2048]
           [--other-data /usr/share/common-licenses/GPL-3] [--set table2|fig3] [--only LABEL ...]
           [--out benchmarks/results/soft_prompt.md]

For each variant of the --set (table2, the default: NF4 + 50% Wanda, 2:4 Wanda-scored, 60%
magnitude; fig3: the paper's Figure 3 grid, GPTQ 2/3/4-bit and SparseGPT 50/62.5/75%, with
Wanda 50% and NF4 beside them for the comparisons at equal budget; made with
`create_variant`, so an existing registry from benchmarks/variants.py is reused via
--home) a prompt is learned on builtin:pydoc train with `learn_prompt_artifact` (the
call behind `adapt prompt learn`). Then `prompt_transfer` (behind `adapt prompt transfer`)
measures every prompt on the base and on every variant, plus a no-prompt row, on
builtin:pydoc test (the training domain) and on a different text (--other-data, by
default the GNU GPL v3 text shipped by Debian: English legal prose, not documentation).

Printed / written:
- Table 2 shape: per model, perplexity without a prompt and with the prompt learned on
  that model, on both texts, and the share of the variant's gap to the base (no prompt)
  that the prompt closes: (ppl_v - ppl_v+prompt) / (ppl_v - ppl_base).
- the transfer matrices (rows: where the prompt was learned, columns: where applied)
  and their heat maps: benchmarks/results/soft_prompt_transfer_*.png.
- per row, the gap closed is also printed on its own line; with --set fig3, the issue's
  checks: the GPTQ 3-bit and SparseGPT 62.5% prompts close >= 50% of the pydoc gap, and the
  pairs at equal budget (SparseGPT 50% vs Wanda 50%, GPTQ 4-bit g64 vs NF4): which loses
  less, without and with its prompt.
The baseline every ratio uses is the base without a prompt, measured in the same run
on the same windows. A grid can be run in parts with --only (prompts and variants are
reused by name); the transfer matrices hold the variants of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = [  # (label, create_variant kwargs) — the recipes of Compress, Then Prompt's shape
    ("nf4 + wanda 50%", dict(quant="nf4", prune="wanda", sparsity=0.5)),
    ("2:4 (wanda-scored)", dict(prune="2:4")),
    ("magnitude 60%", dict(prune="magnitude", sparsity=0.6)),
]
# Compress, Then Prompt's Figure 3 grid (GPTQ in groups of 64: the scale budget of NF4's 64-weight
# blocks), and the other compressor of each equal-budget pair.
FIG3 = [
    ("gptq 4-bit", dict(quant="gptq", bits=4, group_size=64)),
    ("gptq 3-bit", dict(quant="gptq", bits=3, group_size=64)),
    ("gptq 2-bit", dict(quant="gptq", bits=2, group_size=64)),
    ("sparsegpt 50%", dict(prune="sparsegpt", sparsity=0.5)),
    ("sparsegpt 62.5%", dict(prune="sparsegpt", sparsity=0.625)),
    ("sparsegpt 75%", dict(prune="sparsegpt", sparsity=0.75)),
    ("wanda 50%", dict(prune="wanda", sparsity=0.5)),
    ("nf4", dict(quant="nf4")),
]
SETS = {"table2": (VARIANTS, "soft_prompt.md"), "fig3": (FIG3, "soft_prompt_gptq.md")}
CLAIM_ROWS, CLAIM_SHARE = ("gptq 3-bit", "sparsegpt 62.5%"), 0.5  # the issue: these prompts close >= 50%
EQUAL_BUDGET = (("sparsegpt 50%", "wanda 50%"), ("gptq 4-bit", "nf4"))
DEFAULT_OTHER = "/usr/share/common-licenses/GPL-3"
RESULTS = Path(__file__).parent / "results"


def gap_closed(base: float, without: float, with_prompt: float) -> float | None:
    """Share of the variant's perplexity gap to the base that the prompt closes (1 = all)."""
    gap = without - base
    if gap <= 0:
        return None
    return (without - with_prompt) / gap


def other_name_of(data: str) -> str:
    """The other text's short name (a path's file name)."""
    return Path(data).name if os.sep in data else data


def partial_matrix(reg, prompt_transfer, prompts, columns, data, max_tokens, progress) -> dict:
    """The transfer matrix restricted to the diagonal (each variant with its own prompt), the
    no-prompt row and the base with the first prompt; other cells are NaN (not measured)."""
    nan = float("nan")
    rows = ["no prompt", *prompts]
    values = [[nan] * len(columns) for _ in rows]
    learned_on, meta = [None] * len(rows), {}
    for j, (prompt, column) in enumerate(zip(prompts, columns[1:], strict=False), start=1):
        cols = [columns[0], column] if j == 1 else [column]
        m = prompt_transfer(reg, [prompt], cols, data, split="test", max_tokens=max_tokens, progress=progress)
        for c, name in enumerate(m["columns"]):
            values[0][columns.index(name)] = m["values"][0][c]
            values[j][columns.index(name)] = m["values"][1][c]
        learned_on[j] = m["learned_on"][1]
        meta = {k: m[k] for k in ("max_length", "stride", "tokens", "data", "split", "metric")}
    return dict(meta, rows=rows, columns=list(columns), values=values, learned_on=learned_on, plot=None)


def checks_md(results: list[dict], key: str = "pydoc") -> str:
    """The issue's checks on the measured rows (those of the run): the claim rows' gap closed
    against CLAIM_SHARE, and each equal-budget pair without / with its prompt."""
    by = {r["label"]: r for r in results}
    base = by["base"][f"{key}_without"]
    lines = [f"| check | measured ({key} test) | verdict |", "|---|---|---|"]
    for label in CLAIM_ROWS:
        r = by.get(label)
        if r is None:
            continue
        share = r[f"{key}_gap_closed"]
        if share is None:
            lines.append(f"| {label}: prompt closes >= {CLAIM_SHARE:.0%} of the gap | {r[f'{key}_without']:.2f} "
                         f"(base {base:.2f}) | no gap to close |")
            continue
        verdict = "holds" if share >= CLAIM_SHARE else f"short by {CLAIM_SHARE - share:.0%} of the gap"
        lines.append(f"| {label}: prompt closes >= {CLAIM_SHARE:.0%} of the gap | {r[f'{key}_without']:.2f} -> "
                     f"{r[f'{key}_with']:.2f} (base {base:.2f}): {share:.0%} | {verdict} |")
    for a, b in EQUAL_BUDGET:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None:
            continue
        for when, col in (("without a prompt", "without"), ("with its prompt", "with")):
            va, vb = ra[f"{key}_{col}"], rb[f"{key}_{col}"]
            if va is None or vb is None:
                continue
            # the loss of each: the perplexity over the base's, minus 1
            la, lb = va / base - 1, vb / base - 1
            better = a if va < vb else b
            lines.append(f"| {a} vs {b}, {when} | {va:.2f} vs {vb:.2f} (loss over base {la:+.0%} vs {lb:+.0%}) "
                         f"| {better} loses less ({max(va, vb) / min(va, vb):.2f}x lower ppl) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", default=None, help="registry home (default: a fresh temporary folder)")
    ap.add_argument("--base", default="builtin:smollm2-135m")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=32, help="prompt length k")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="tokens of each evaluation text")
    ap.add_argument("--calib-samples", type=int, default=32, help="for variants not yet in the registry")
    ap.add_argument("--other-data", default=DEFAULT_OTHER, help="the second text (a .txt/.jsonl path or a builtin)")
    ap.add_argument("--full-other", action="store_true",
                    help="the whole transfer matrix on the other text too (default: only the Table 2 cells)")
    ap.add_argument("--set", dest="grid", choices=sorted(SETS), default="table2",
                    help="table2: nf4+wanda50, 2:4, magnitude 60%%; fig3: GPTQ 2/3/4-bit, SparseGPT 50/62.5/75%%, "
                         "Wanda 50%%, NF4")
    ap.add_argument("--only", nargs="*", default=None, help="labels of the variants to run (default: all)")
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/soft_prompt.md for "
                                                "table2, soft_prompt_gptq.md for fig3)")
    args = ap.parse_args()
    recipes, default_out = SETS[args.grid]
    unknown = sorted(set(args.only or ()) - {label for label, _ in recipes})
    if unknown:
        ap.error(f"--only: no variant {unknown} in --set {args.grid} (has {[label for label, _ in recipes]})")
    args.out = args.out or str(RESULTS / default_out)

    home = Path(args.home or tempfile.mkdtemp(prefix="adapterhub-bench-prompt-"))
    os.environ["ADAPTERHUB_HOME"] = str(home)
    import torch

    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.models import Artifact
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.prompts import learn_prompt_artifact, prompt_transfer
    from adapterhub_c.workflows.variants import create_variant

    torch.manual_seed(0)
    reg = Registry(home=home)
    t0 = time.monotonic()
    base, _ = add_builtin_base(reg, args.base)
    print(f"base {base.name} ready in {time.monotonic() - t0:.0f}s (home {home}), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")

    def progress_for(label):
        def progress(desc, done, total):
            if total and (done == total or done % 25 == 0):
                print(f"  [{label}] {desc}: {done}/{total} ({time.monotonic() - t0:.0f}s)", flush=True)
        return progress

    variants, prompts, learn_reports = [], [], {}
    for label, kwargs in recipes:
        if args.only and label not in args.only:
            continue
        t = time.monotonic()
        row, created = create_variant(reg, base.name, calib_samples=args.calib_samples, eval_tokens=0,
                                      progress=progress_for(label), **kwargs)
        print(f"[{label}] variant {row.name} {'created' if created else 'reused'} "
              f"({time.monotonic() - t:.0f}s)", flush=True)
        variants.append((label, row.name))
        # A prompt with the same name and settings from an earlier run is reused.
        pname = f"bench-prompt-{row.name}-k{args.tokens}-s{args.steps}-lr{args.lr:g}-L{args.seq_len}"
        with reg.session() as s:
            from sqlalchemy import select

            existing = s.scalar(select(Artifact).where(Artifact.name == pname))
        if existing is not None:
            report = dict(existing.metrics or {}, name=pname, reused=True)
            print(f"[{label}] prompt {pname} reused", flush=True)
        else:
            _, report = learn_prompt_artifact(reg, row.name, data="builtin:pydoc", tokens=args.tokens,
                                              steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                              seq_len=args.seq_len, eval_tokens=min(args.eval_tokens, 512),
                                              name=pname, progress=progress_for(label))
            print(f"[{label}] prompt {pname}: loss {report['first_loss']:.3f} -> {report['final_loss']:.3f}, "
                  f"{report['train_wall_s']:.0f}s for {args.steps} steps", flush=True)
        learn_reports[label] = report
        prompts.append(pname)

    columns = [base.name] + [name for _, name in variants]
    matrices = {}
    for key, data in (("pydoc", "builtin:pydoc"), ("other", args.other_data)):
        t = time.monotonic()
        if key == "pydoc" or args.full_other:
            png = Path(f"{stem}_transfer_{key}.png")
            matrices[key] = prompt_transfer(reg, prompts, columns, data, split="test", plot=png,
                                            max_tokens=args.eval_tokens, progress=progress_for(f"transfer {key}"))
        else:
            # Only the cells of Table 2 (no prompt / own prompt, and the base): CPU time is short.
            matrices[key] = partial_matrix(reg, prompt_transfer, prompts, columns, data, args.eval_tokens,
                                           progress_for(f"transfer {key}"))
        matrices[key]["seconds"] = time.monotonic() - t
        print(f"transfer on {data}: {matrices[key]['seconds']:.0f}s", flush=True)

    def cell(key, row_name, col_name):
        m = matrices[key]
        return m["values"][m["rows"].index(row_name)][m["columns"].index(col_name)]

    # Table 2 shape
    results = []
    base_ppl = {k: cell(k, "no prompt", base.name) for k in matrices}
    for (label, vname), pname in [(("base", base.name), None)] + list(zip(variants, prompts, strict=False)):
        r = {"label": label, "model": vname, "prompt": pname}
        for k in matrices:
            without = cell(k, "no prompt", vname)
            with_p = cell(k, pname, vname) if pname else None
            r[f"{k}_without"], r[f"{k}_with"] = without, with_p
            r[f"{k}_ratio_without"] = without / base_ppl[k]
            r[f"{k}_ratio_with"] = with_p / base_ppl[k] if with_p else None
            r[f"{k}_gap_closed"] = gap_closed(base_ppl[k], without, with_p) if with_p else None
        results.append(r)

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    other_name = other_name_of(args.other_data)
    header = (f"| model | pydoc test: no prompt | + prompt | ratio vs base (no / +) | gap closed "
              f"| {other_name}: no prompt | + prompt | ratio vs base (no / +) | gap closed |")
    lines = [header, "|" + "---|" * 9]
    for r in results:
        lines.append(
            f"| {r['label']} | {f(r['pydoc_without'])} | {f(r['pydoc_with'])} "
            f"| {f(r['pydoc_ratio_without'])} / {f(r['pydoc_ratio_with'])} | {f(r['pydoc_gap_closed'], '{:.0%}')} "
            f"| {f(r['other_without'])} | {f(r['other_with'])} "
            f"| {f(r['other_ratio_without'])} / {f(r['other_ratio_with'])} | {f(r['other_gap_closed'], '{:.0%}')} |")
    table2 = "\n".join(lines)
    for r in results[1:]:
        print(f"gap closed [{r['label']}]: pydoc {f(r['pydoc_gap_closed'], '{:.0%}')} "
              f"({f(r['pydoc_without'])} -> {f(r['pydoc_with'])}, base {f(base_ppl['pydoc'])}); "
              f"{other_name_of(args.other_data)} {f(r['other_gap_closed'], '{:.0%}')}", flush=True)

    def matrix_md(m):
        short = {n: lbl for lbl, n in variants}
        short[base.name] = "base"
        head = "| prompt learned on \\ applied to | " + " | ".join(short[c] for c in m["columns"]) + " |"
        rows = [head, "|" + "---|" * (len(m["columns"]) + 1)]
        for _rname, line, learned in zip(m["rows"], m["values"], m["learned_on"], strict=False):
            who = "no prompt" if learned is None else short.get(learned, learned)
            rows.append(f"| {who} | " + " | ".join("-" if v != v else f"{v:.3f}" for v in line) + " |")
        return "\n".join(rows)

    train_lines = ["| variant | prompt | first loss | final loss | train s | s/step |", "|---|---|---|---|---|---|"]
    for label, rep in learn_reports.items():
        wall = rep.get("train_wall_s")
        train_lines.append(f"| {label} | {rep.get('name')} | {f(rep.get('first_loss'))} | {f(rep.get('final_loss'))} "
                           f"| {f(wall, '{:.0f}')} | {f(wall / args.steps if wall else None, '{:.2f}')} |")
    total = time.monotonic() - t0
    meta = (f"Base {base.name}; prompts of k={args.tokens} tokens (vocab-sample init) learned on builtin:pydoc train "
            f"for {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr:g}, no weight "
            f"decay. Perplexity on the first {matrices['pydoc']['tokens'] + 1} tokens of builtin:pydoc test and of "
            f"{args.other_data} ({matrices['other']['tokens'] + 1} tokens), windows {matrices['pydoc']['max_length']} "
            f"stride {matrices['pydoc']['stride']} (shrunk so prompt + window fit the context; the same windows with "
            f"and without a prompt). CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; total "
            f"{total:.0f}s. Variants (create_variant, {args.calib_samples} calibration sequences of builtin:pydoc "
            "train): " + "; ".join(f"{label} = {kw}" for label, kw in recipes if label in dict(variants)) + ".")
    text = (f"## Table 2 shape (with = the prompt learned on that model)\n\n{table2}\n\n"
            f"## Transfer matrix, builtin:pydoc test (training domain)\n\n{matrix_md(matrices['pydoc'])}\n\n"
            f"![transfer pydoc]({Path(f'{stem}_transfer_pydoc.png').name})\n\n"
            f"## Transfer matrix, {other_name} (other text)\n\n{matrix_md(matrices['other'])}\n\n"
            + (f"![transfer other]({Path(f'{stem}_transfer_other.png').name})\n\n" if args.full_other
               else "(only the cells of Table 2 measured: `-` = not measured; --full-other for all)\n\n")
            + (f"## Checks (the issue's claims)\n\n{checks_md(results)}\n\n{checks_md(results, 'other')}\n\n"
               if args.grid == "fig3" else "")
            + "## Prompt learning\n\n" + "\n".join(train_lines))
    print()
    print(text)
    out.write_text("# Compression-aware soft prompts on SmolLM2-135M\n\n"
                   f"Command: `python benchmarks/soft_prompt.py {shlex.join(sys.argv[1:])}`\n\n{meta}\n\n{text}\n\n"
                   "Gap closed = (ppl without - ppl with) / (ppl without - base ppl without); the base row's "
                   "figures are the baseline of every ratio.\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "args": vars(args), "table2": results, "learn": learn_reports,
         "transfer": {k: {kk: vv for kk, vv in m.items()} for k, m in matrices.items()}},
        indent=2, default=str))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
