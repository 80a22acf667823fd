"""Where the pack / merge / compose benchmarks get their task LoRAs from.

Two sources, chosen on the command line (see :func:`add_arguments`):

- ``--zoo TASKS``: the shared zoo of real SmolLM2 task LoRAs (``benchmarks/zoo.py``), pulled
  over the Hub protocol from the zoo's local Hub store into a benchmark registry
  (``--home``, default ``<zoo>/bench-home``), exactly as a user pulls community LoRAs;
- ``--home DIR --loras A,B --tasks t1,t2``: LoRAs already registered in a registry
  (used to try the scripts on ``builtin:tiny-llama`` LoRAs before the zoo exists).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def add_arguments(ap: argparse.ArgumentParser, default_zoo: str | None = None) -> None:
    """The LoRA-source options shared by the benchmarks."""
    ap.add_argument("--zoo", default=default_zoo,
                    help="comma-separated zoo tasks to pull ('all': every LoRA in the zoo manifest)")
    ap.add_argument("--home", default=None, help="registry home (default: <zoo>/bench-home with --zoo)")
    ap.add_argument("--loras", default=None, help="comma-separated LoRA artefacts already in --home (instead of --zoo)")
    ap.add_argument("--tasks", default=None, help="with --loras: the built-in task of each LoRA, same order")


def open_loras(args) -> tuple[object, list[tuple[str, str]]]:
    """(registry, [(task, artefact name), …]) from the parsed options."""
    from adapterhub_c.registry import Registry

    if args.loras:
        if not args.home or not args.tasks:
            raise SystemExit("--loras needs --home and --tasks")
        names, tasks = args.loras.split(","), args.tasks.split(",")
        if len(names) != len(tasks):
            raise SystemExit("--loras and --tasks need the same number of entries")
        return Registry(home=args.home), list(zip(tasks, names, strict=False))
    if not args.zoo:
        raise SystemExit("give --zoo TASKS or --home/--loras/--tasks")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from zoo import ZOO_DIR, load_manifest, pull_zoo, serve_zoo

    available = [lora["task"] for lora in load_manifest()["loras"]]
    tasks = available if args.zoo == "all" else args.zoo.split(",")
    missing = [t for t in tasks if t not in available]
    if missing:
        raise SystemExit(f"not in the zoo yet: {', '.join(missing)} (zoo has: {', '.join(available) or 'nothing'})")
    reg = Registry(home=args.home or Path(ZOO_DIR) / "bench-home")
    with serve_zoo() as endpoint:
        names = pull_zoo(reg, endpoint, tasks)
    return reg, [(t, names[t]) for t in tasks]


def source_line(args, pairs) -> str:
    """One line saying where the LoRAs came from."""
    if args.loras:
        return f"LoRAs from registry {args.home}: " + ", ".join(f"{n} ({t})" for t, n in pairs)
    return "zoo LoRAs (pulled from the zoo's Hub store): " + ", ".join(f"{n} ({t})" for t, n in pairs)


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    """A markdown table; floats with 4 significant digits unless ``fmt[col]`` says otherwise."""
    fmt = fmt or {}

    def cell(c, v):
        if v is None:
            return "–"
        if c in fmt:
            return fmt[c].format(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, text: str, out: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>.md`` (or ``out``) and return its path."""
    path = Path(out) if out else ROOT / "benchmarks" / "results" / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def batched_exact_match(model, tokenizer, pairs, batch_size: int = 16) -> float:
    """Greedy exact match like :func:`adapterhub_c.evals.metrics.exact_match`, batched with
    a KV cache (``model.generate``, left padding) so it costs a few forwards, not one
    full forward per generated token and example.

    Same rule: prompt without special tokens, at most len(reference tokens) + 4 new
    tokens, stop at EOS, keep the text before the first newline, compare stripped.
    """
    import torch

    if not pairs:
        raise ValueError("no examples to score")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    device = next(model.parameters()).device
    correct = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        budgets = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 4 for _, c in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max(budgets), pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1, temperature=None, top_p=None, top_k=None)
        for j, (_, completion) in enumerate(chunk):
            new = out[j, width:width + budgets[j]].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            text = tokenizer.decode(new).split("\n", 1)[0]
            correct += text.strip() == completion.strip()
    model.train(was_training)
    return correct / len(pairs)
