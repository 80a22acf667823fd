"""What GGUF LoRAs are for, measured inside llama.cpp (issue 26).

Usage:
  python benchmarks/gguf_llamacpp.py [--tasks reverse-words,uppercase,sort-numbers] [--variants Q4_0,Q4_K_M]
                            [--eval-examples 50] [--steps 20] [--batch-size 8] [--lr 1e-3]
                            [--compensate-rank 16] [--check-prompts 10] [--threads 2]
                            [--speed-tokens 64] [--speed-repeats 3] [--home DIR] [--out benchmarks/results/gguf.md]

The zoo's task LoRAs (``benchmarks/make_zoo.py``, trained on the float32 SmolLM2 = the built-in
base's dequantized Q4_1 file) are pulled from the zoo's local hub as ``ca_lora.py`` pulls them,
then, per GGUF variant of the built-in base (``create_variant(quant="gguf:Q4_0")`` /
``"gguf:Q4_K_M"``) and task:

- (a) the source LoRA as is on the variant;
- (b) CA-LoRA zero-data: ``convert`` with ``recover="lowrank"`` (rank r + R, no task data);
- (c) the same compensation plus ``--steps`` distillation steps on the task's train split;

and the ceiling: the float32 base + the source LoRA. Every adapter goes out through
``adapt export ADAPTER --format gguf --variant V`` (the API's ``export(..., on_variant=V)``: its
GGUF LoRA beside the variant's own GGUF file and a Modelfile); the ceiling's model is the
float32 base written as an f32 GGUF by the export's writer (``write_gguf_export``; the export of
an adapter on its base writes the base's own file, the Q4_1 GGUF), and llama.cpp itself
(llama-cpp-python, in a subprocess that never imports adapterhub_c) runs them: greedy
(temperature 0), prompts fed as the project's exact match feeds them (the text as given, no
BOS, no chat template), stopping at EOS, at a newline or after the reference's token count + 4,
exact match on the stripped strings with a 95 % Wilson interval (evals.metrics.wilson_interval).
Our own exact match of base + source LoRA on the first ``--check-prompts`` prompts of each task
is measured beside llama.cpp's ceiling, prompt by prompt. llama.cpp's generation tokens/s
without an adapter, with the source LoRA and with the converted one (same process, interleaved
repeats, median) close the report.

Every artefact has a fixed name (registered conversions in ``--home``, GGUF files under
``<home>/gguf``), so an interrupted run picks up what it has.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "gguf.md"
VARIANTS = {"Q4_0": "gguf:Q4_0", "Q4_K_M": "gguf:Q4_K_M"}
ROW_CEIL = "ceiling: f32 base + source LoRA"
ROW_ASIS, ROW_LR0 = "(a) source LoRA as is", "(b) CA-LoRA zero-data (--recover lowrank)"
ROW_LRD = "(c) compensated + {n} steps distillation"
N_CTX = 512


# ---------------------------------------------------------------------------------------
# the llama.cpp client (a subprocess that imports llama_cpp only)

def _llama(model: str, lora: str | None, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=model, lora_path=lora, n_ctx=N_CTX, n_threads=threads,
                           n_threads_batch=threads, verbose=False, seed=0)


def _greedy(llm, tokens: list[int], budget: int) -> str:
    """Greedy text after ``tokens``: EOS, a newline or ``budget`` tokens end it (evals.metrics.greedy_generate's rule)."""
    llm.reset()  # no prefix reuse between prompts: every prompt is evaluated whole, as ours is
    eos, out = llm.token_eos(), []
    for tok in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=False):
        if tok == eos:
            break
        out.append(tok)
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        if "\n" in text:
            return text.split("\n", 1)[0]
        if len(out) >= budget:
            break
    return llm.detokenize(out).decode("utf-8", errors="replace")


def _decode_speed(llm, tokens: list[int], n: int) -> float:
    """Generated tokens per second after the prompt (the first token, which pays for the prompt, not counted)."""
    llm.reset()
    gen = llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=False)
    next(gen)
    t0 = time.perf_counter()
    for _ in range(n):
        next(gen)
    return n / (time.perf_counter() - t0)


def llama_worker(job_path: str, out_path: str) -> int:
    """Run the job file's exact-match and speed jobs in llama.cpp; write answers and timings as JSON."""
    job = json.loads(Path(job_path).read_text())
    threads = job["threads"]
    out = {"em": {}, "speed": {}, "tokens": {}}
    for key, run in job["em"].items():
        llm = _llama(run["model"], run["lora"], threads)
        toks = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in run["prompts"]]
        out["tokens"][key] = toks
        out["em"][key] = [_greedy(llm, t, b) for t, b in zip(toks, run["budgets"], strict=True)]
        del llm
    for key, run in job["speed"].items():
        llms = {name: _llama(run["model"], lora, threads) for name, lora in run["loras"].items()}
        toks = next(iter(llms.values())).tokenize(run["prompt"].encode(), add_bos=False, special=False)
        for llm in llms.values():  # untimed: pages the weights in
            _decode_speed(llm, toks, 8)
        rates: dict[str, list[float]] = {name: [] for name in llms}
        for _ in range(job["speed_repeats"]):
            for name, llm in llms.items():
                rates[name].append(_decode_speed(llm, toks, job["speed_tokens"]))
        out["speed"][key] = rates
        del llms
    out["modules"] = sorted(m for m in sys.modules if m.startswith("adapterhub"))
    Path(out_path).write_text(json.dumps(out))
    return 0


def run_llama(job: dict, workdir: Path) -> dict:
    """``llama_worker`` in a fresh interpreter (no PYTHONPATH, never importing adapterhub_c)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, out_path = workdir / "llama-job.json", workdir / "llama-out.json"
    job_path.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--llama-worker", str(job_path),
                           str(out_path)], env=env, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed:\n{proc.stderr[-3000:]}")
    out = json.loads(out_path.read_text())
    if out["modules"]:
        raise RuntimeError(f"the llama.cpp worker imported {out['modules']}")
    return out


# ---------------------------------------------------------------------------------------
# GGUF files (fixed names under <home>/gguf: a rerun reuses them)

def f32_base_gguf(reg, base_name: str, folder: Path) -> Path:
    """The float32 base as an f32 GGUF (``write_gguf_export``, the writer ``adapt export`` uses)."""
    import torch

    from adapterhub_c.fsutil import atomic_dir
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.workflows.ggufvariants import write_gguf_export

    done = sorted(folder.glob("*.gguf"))
    if done:
        return done[0]
    base = reg.get(base_name, "base")
    print(f"writing the f32 GGUF of {base_name}", flush=True)
    model, _ = load_base_model(reg, base)
    with atomic_dir(folder) as tmp:
        write_gguf_export(dict(model.state_dict()), tmp, "smollm2-135m", config=model.config,
                          tokenizer_dir=reg.materialize(base), dtype=torch.float32)
    return next(folder.glob("*.gguf"))


def export_adapter(reg, adapter: str, on_variant: str | None, folder: Path) -> tuple[Path, Path]:
    """(model GGUF, LoRA GGUF) of ``adapt export ADAPTER --format gguf [--variant V]`` written into ``folder``
    (the API's ``export``; a folder an earlier run wrote whole is reused)."""
    from adapterhub_c import api
    from adapterhub_c.workflows.exports import META_NAME

    if not (folder / META_NAME).is_file():
        res = api.export(adapter, folder, "gguf", registry=reg, on_variant=on_variant)
        notes = res.report.get("notes") or []
        print(f"  exported {adapter} on {on_variant or 'its base'}" + (f": {'; '.join(notes)}" if notes else ""),
              flush=True)
    meta = json.loads((folder / META_NAME).read_text())
    return folder / meta["model_file"], folder / meta["lora_file"]


# ---------------------------------------------------------------------------------------
# the run

def parse_args(argv):
    """The command line (``ca_lora.setup`` reads ``tiny``, ``device`` and ``source_steps`` too)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="reverse-words,uppercase,sort-numbers", help="zoo tasks")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--eval-examples", type=int, default=50, help="first N prompts of each task's test split")
    ap.add_argument("--steps", type=int, default=20, help="(c): distillation steps after the compensation")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--distill-alpha", type=float, default=1.0)
    ap.add_argument("--compensate-rank", type=int, default=16, help="R, the rank --recover lowrank adds to r")
    ap.add_argument("--compensate-targets", default="all", help="attn or all")
    ap.add_argument("--compensate-calib-samples", type=int, default=32,
                    help="calibration sequences of 128 tokens (builtin:pydoc train) for the activation moments")
    ap.add_argument("--check-prompts", type=int, default=10,
                    help="per task, our own greedy answers (base + source LoRA) beside llama.cpp's ceiling")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--speed-tokens", type=int, default=64, help="generated tokens per speed measurement")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--home", type=Path, default=None, help="registry (default: ZOO_DIR/gguf-home)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.set_defaults(tiny=False, device="cpu", source_steps=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--llama-worker"]:
        return llama_worker(argv[1], argv[2])
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    import ca_lora
    from zoo import ZOO_DIR

    from adapterhub_c.registry import Registry

    t_start = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = ca_lora.pick_variants(args.variants, VARIANTS)
    home = args.home or ZOO_DIR / "gguf-home"
    reg = Registry(home=home)
    base_name, sources = ca_lora.setup(reg, args, tasks)
    prompts = task_prompts(reg, base_name, tasks, args.eval_examples)
    em_jobs, speed_jobs, made = build_jobs(ca_lora, reg, args, base_name, sources, tasks, variants, home / "gguf")
    ours = our_answers(reg, base_name, sources, prompts, args.check_prompts, args.device)
    print(f"llama.cpp: {len(em_jobs)} exact-match runs, {len(speed_jobs)} speed runs", flush=True)
    t_llama = time.perf_counter()
    out = run_llama(llama_job(args, em_jobs, speed_jobs, prompts, tasks[0]), home / "llama-work")
    llama_s = time.perf_counter() - t_llama
    measured = score(em_jobs, out, prompts)
    text = render(args, base_name, tasks, variants, measured, made, ours, out, prompts,
                  dict(total_s=time.perf_counter() - t_start, llama_s=llama_s))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"written {args.out}")
    return 0


def task_prompts(reg, base_name: str, tasks: list[str], n: int) -> dict[str, dict]:
    """Per task: the first ``n`` test pairs, the exact-match token budgets and our prompt token ids."""
    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import prompt_ids
    from adapterhub_c.runtime.bases import load_base_tokenizer

    tokenizer = load_base_tokenizer(reg, reg.get(base_name, "base"))
    out = {}
    for task in tasks:
        pairs = load_dataset(f"builtin:task/{task}", "test").pairs[:n]
        # the budget evals.metrics.exact_match gives: the reference's token count + 4
        out[task] = {"pairs": pairs, "budgets": [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 4
                                                 for _, c in pairs],
                     "ids": [prompt_ids(tokenizer, p) for p, _ in pairs]}
    return out


def build_jobs(ca_lora, reg, args, base_name: str, sources: dict, tasks: list[str], variants: list[str],
               files: Path) -> tuple[dict, dict, dict]:
    """Make every variant, conversion and GGUF file; (exact-match runs {key: (model, LoRA, task)},
    speed runs {key: (model, {name: LoRA or None})}, what the report says of each variant)."""
    ceiling = f32_base_gguf(reg, base_name, files / "f32")
    em_jobs = {}
    for task in tasks:  # the LoRA of adapt export on its base (whose own file is the Q4_1 GGUF), on the f32 file
        _, lora = export_adapter(reg, sources[task], None, files / f"{sources[task]}@base")
        em_jobs[f"f32|ceil|{task}"] = (ceiling, lora, task)
    speed_jobs = {"f32": (ceiling, {"none": None, "source": em_jobs[f"f32|ceil|{tasks[0]}"][1]})}
    made = {}
    for vkey in variants:
        var, made[vkey] = prepare_variant(reg, args, base_name, vkey)
        for task in tasks:
            conv = convert_task(ca_lora, reg, args, var, sources[task], vkey, task)
            made[vkey]["convert_s"][task] = {k: secs for k, (_, secs) in conv.items()}
            for key, name in (("asis", sources[task]), *((k, art.name) for k, (art, _) in conv.items())):
                model, lora = export_adapter(reg, name, var.name, files / f"{name}@{vkey}")
                em_jobs[f"{vkey}|{key}|{task}"] = (model, lora, task)
        model = em_jobs[f"{vkey}|asis|{tasks[0]}"][0]
        made[vkey].update(file=model.name, bytes=model.stat().st_size)
        speed_jobs[vkey] = (model, {"none": None, "source": em_jobs[f"{vkey}|asis|{tasks[0]}"][1],
                                    "converted": em_jobs[f"{vkey}|lr0|{tasks[0]}"][1]})
    return em_jobs, speed_jobs, made


def prepare_variant(reg, args, base_name: str, vkey: str):
    """(variant row, what the report says of it)."""
    from adapterhub_c.workflows.variants import create_variant

    t0 = time.perf_counter()
    var, created = create_variant(reg, base_name, quant=VARIANTS[vkey], eval_tokens=0, device=args.device)
    secs = time.perf_counter() - t0 if created else None
    print(f"variant {var.name} ({'created' if created else 'reused'})", flush=True)
    stats = var.stats or {}
    info = {"name": var.name, "create_s": secs, "types": stats.get("gguf_types"), "bits": stats.get("bits_per_weight"),
            "fallbacks": stats.get("gguf_fallbacks"), "convert_s": {}}
    return var, info


def convert_task(ca_lora, reg, args, var, source: str, vkey: str, task: str) -> dict:
    """{"lr0": (artefact, s), "lrd": (artefact, s)}: the zero-data compensation and it + distillation
    (``ca_lora.convert_once``: fixed names, reused when registered; s is None then)."""
    comp = dict(recover="lowrank", recover_rank=args.compensate_rank, recover_targets=args.compensate_targets,
                calib_samples=args.compensate_calib_samples)
    train = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                 distill_alpha=args.distill_alpha)
    tag = f"{vkey}-{task}-R{args.compensate_rank}{args.compensate_targets}"
    lr0, _, lr0_s = ca_lora.convert_once(reg, args.device, f"gguf-lr0-{tag}", source, var, **comp)
    lrd, _, lrd_s = ca_lora.convert_once(reg, args.device, f"gguf-lrd-{tag}-s{args.steps}b{args.batch_size}",
                                         source, var, data=f"builtin:task/{task}", **comp, **train)
    return {"lr0": (lr0, lr0_s), "lrd": (lrd, lrd_s)}


def our_answers(reg, base_name: str, sources: dict, prompts: dict, k: int, device: str) -> dict[str, list[str]]:
    """Our greedy answers (evals.metrics.greedy_generate, exact match's budget) of base + source LoRA on the
    first ``k`` prompts of each task."""
    from adapterhub_c.evals.metrics import greedy_generate
    from adapterhub_c.runtime.stack import load_stack, resolve_stack

    out = {}
    for task, p in prompts.items():
        print(f"  our answers: {task}, base + {sources[task]} ({k} prompts)", flush=True)
        model, tok = load_stack(reg, resolve_stack(reg, base_name, adapter=sources[task]), device)
        out[task] = [greedy_generate(model, tok, prompt, budget)
                     for (prompt, _), budget in zip(p["pairs"][:k], p["budgets"][:k], strict=True)]
        del model
    return out


def llama_job(args, em_jobs: dict, speed_jobs: dict, prompts: dict, speed_task: str) -> dict:
    """The worker's job file: every exact-match run and every speed run."""
    em = {key: {"model": str(model), "lora": str(lora), "prompts": [p for p, _ in prompts[task]["pairs"]],
                "budgets": prompts[task]["budgets"]} for key, (model, lora, task) in em_jobs.items()}
    speed = {key: {"model": str(model), "loras": {n: (str(lo) if lo else None) for n, lo in loras.items()},
                   "prompt": prompts[speed_task]["pairs"][0][0]} for key, (model, loras) in speed_jobs.items()}
    return {"threads": args.threads, "speed_tokens": args.speed_tokens, "speed_repeats": args.speed_repeats,
            "em": em, "speed": speed}


def score(em_jobs: dict, out: dict, prompts: dict) -> dict[str, dict]:
    """Per exact-match run: EM, its 95 % Wilson interval, correct / n, the LoRA file's size."""
    from adapterhub_c.evals.metrics import wilson_interval

    measured = {}
    for key, (_, lora, task) in em_jobs.items():
        answers = out["em"][key]
        refs = [c for _, c in prompts[task]["pairs"]]
        correct = sum(a.strip() == c.strip() for a, c in zip(answers, refs, strict=True))
        measured[key] = {"em": correct / len(refs), "ci": wilson_interval(correct, len(refs)), "correct": correct,
                         "n": len(refs), "lora_bytes": Path(lora).stat().st_size, "answers": answers}
    return measured


# ---------------------------------------------------------------------------------------
# the report

def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"


def _secs(v) -> str:
    return "reused" if v is None else f"{v:.0f}"


def row_label(key: str, steps: int) -> str:
    """The table's name of a row key (ceil, asis, lr0, lrd)."""
    return {"ceil": ROW_CEIL, "asis": ROW_ASIS, "lr0": ROW_LR0, "lrd": ROW_LRD.format(n=steps)}[key]


def verdict_lines(tasks, variants, measured, steps: int) -> list[str]:
    """Per variant × task: converted (b), (c) against (a) as is, and each one's gap to the ceiling."""
    lines = ["| variant | task | ceiling | (a) as is | (b) zero-data | (c) + distill | (b) ≥ (a) | (c) ≥ (a) | "
             "gap to ceiling (a) / (b) / (c) |", "|---|---|---|---|---|---|---|---|---|"]
    holds = True
    for vkey in variants:
        for task in tasks:
            ceil = measured[f"f32|ceil|{task}"]["em"]
            em = {k: measured[f"{vkey}|{k}|{task}"]["em"] for k in ("asis", "lr0", "lrd")}
            ok = {k: em[k] >= em["asis"] for k in ("lr0", "lrd")}
            holds &= all(ok.values())
            gaps = " / ".join(f"{ceil - em[k]:+.2f}" for k in ("asis", "lr0", "lrd"))
            lines.append(f"| {vkey} | {task} | {ceil:.2f} | {em['asis']:.2f} | {em['lr0']:.2f} | {em['lrd']:.2f} | "
                         f"{'yes' if ok['lr0'] else 'NO'} | {'yes' if ok['lrd'] else 'NO'} | {gaps} |")
    lines += ["", f"Verdict: the converted adapters' EM in llama.cpp is {'≥' if holds else 'NOT always ≥'} the "
              f"source LoRA's as is on every variant × task ({'holds' if holds else 'fails'}); gap to the ceiling = "
              f"ceiling EM − row EM (positive: below the ceiling). (c) is (b) + {steps} distillation steps."]
    return lines


def check_lines(tasks, measured, ours, out, prompts, zoo_em) -> list[str]:
    """Our exact match of base + source LoRA against llama.cpp's f32 ceiling, prompt by prompt."""
    lines = ["| task | prompts | our EM | llama.cpp EM (same prompts) | same answer | llama.cpp EM (all) | "
             "zoo's recorded EM (ours, at training) | llama.cpp tokens = ours |", "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        key = f"f32|ceil|{task}"
        mine, theirs = ours[task], measured[key]["answers"][:len(ours[task])]
        refs = [c.strip() for _, c in prompts[task]["pairs"][:len(mine)]]
        ours_em = sum(a.strip() == r for a, r in zip(mine, refs, strict=True)) / len(refs)
        their_em = sum(a.strip() == r for a, r in zip(theirs, refs, strict=True)) / len(refs)
        same = sum(a.strip() == b.strip() for a, b in zip(mine, theirs, strict=True))
        tok_same = sum(a == b for a, b in zip(out["tokens"][key], prompts[task]["ids"], strict=True))
        rec = zoo_em.get(task)
        lines.append(f"| {task} | {len(mine)} | {ours_em:.2f} | {their_em:.2f} | {same}/{len(mine)} | "
                     f"{measured[key]['em']:.2f} | {'–' if rec is None else f'{rec:.2f}'} | "
                     f"{tok_same}/{len(prompts[task]['ids'])} |")
    return lines


def speed_lines(variants, out, args) -> list[str]:
    """llama.cpp's generation tokens/s per model and adapter, against no adapter in the same run."""
    lines = ["| model | adapter | generated tok/s (median) | runs | × no adapter |", "|---|---|---|---|---|"]
    names = {"none": "none", "source": "source LoRA (r = 16)",
             "converted": f"(b) converted LoRA (r = 16 + {args.compensate_rank})"}
    for key in ["f32", *variants]:
        rates = out["speed"][key]
        base = statistics.median(rates["none"])
        for name, runs in rates.items():
            med = statistics.median(runs)
            lines.append(f"| {'f32 base' if key == 'f32' else key} | {names[name]} | {med:.1f} | "
                         f"{', '.join(f'{r:.0f}' for r in runs)} | {med / base:.2f} |")
    return lines


def render(args, base_name, tasks, variants, measured, made, ours, out, prompts, times) -> str:
    """The markdown report."""
    from zoo import load_manifest

    zoo_em = {e["task"]: (e.get("metrics") or {}).get("after", {}).get("exact_match")
              for e in load_manifest().get("loras", [])}
    n = args.eval_examples
    lines = [f"# GGUF variants and GGUF LoRAs, run by llama.cpp (issue 26) on {base_name}", "",
             f"Command: `python benchmarks/gguf_llamacpp.py {' '.join(sys.argv[1:])}`", "",
             "Source LoRAs: the zoo's (`benchmarks/make_zoo.py`, trained on the float32 SmolLM2, r = 16), pulled "
             "from its local hub. Variants: `create_variant(quant=\"gguf:TYPE\")`. Every adapter exported with "
             "`adapt export ADAPTER --format gguf --variant V` (the API's `export(..., on_variant=V)`: the GGUF LoRA "
             "beside the variant's stored GGUF file). Ceiling: the float32 base written as an f32 GGUF by the "
             "export's writer (`write_gguf_export`: an adapter exported on its base comes with the base's own "
             "file, the Q4_1 GGUF, and `variant create` refuses a recipe that compresses nothing), with the "
             f"source LoRA's exported GGUF LoRA. (b): `convert --recover lowrank --recover-rank {args.compensate_rank} --targets "
             f"{args.compensate_targets}`, {args.compensate_calib_samples} × 128 calibration tokens of builtin:pydoc "
             f"train, no task data; (c): the same + {args.steps} distillation steps × batch {args.batch_size} "
             f"(seq_len ≤ {args.seq_len}), lr {args.lr}, alpha {args.distill_alpha} on the last hidden state, the "
             "task's train split. llama.cpp (llama-cpp-python, a subprocess that never imports adapterhub_c; "
             f"{args.threads} threads, n_ctx {N_CTX}, default f16 KV cache, seed 0): greedy (temperature 0), the "
             "prompt text tokenized by llama.cpp without BOS (no chat template: the project's exact match feeds the "
             "text as given), stopping at EOS, at a newline or after the reference's token count + 4 "
             "(evals.metrics.exact_match's rule); EM on stripped strings, first "
             f"{n} prompts of each task's test split, 95 % Wilson interval. Total {times['total_s'] / 60:.1f} min "
             f"(llama.cpp part {times['llama_s'] / 60:.1f} min), CPU only.", "",
             "## Verdict per task", ""]
    lines += verdict_lines(tasks, variants, measured, args.steps)
    lines += ["", f"## Exact match in llama.cpp ({n} prompts per task)", "",
              "| variant | task | row | EM | 95 % CI | correct | LoRA GGUF | convert s |", "|---|---|---|---|---|---|---|---|"]
    for vkey in ["f32", *variants]:
        for task in tasks:
            for key in (("ceil",) if vkey == "f32" else ("asis", "lr0", "lrd")):
                m = measured[f"{vkey}|{key}|{task}"]
                conv = _secs(made[vkey]["convert_s"][task][key]) if key in ("lr0", "lrd") else "–"
                lines.append(f"| {'f32 base' if vkey == 'f32' else vkey} | {task} | {row_label(key, args.steps)} | "
                             f"{m['em']:.2f} | {m['ci'][0]:.2f}–{m['ci'][1]:.2f} | {m['correct']}/{m['n']} | "
                             f"{_mib(m['lora_bytes'])} | {conv} |")
    lines += ["", "## Is llama.cpp's exact match ours? (f32 base + source LoRA)", "",
              f"Our greedy answers (transformers + PEFT, evals.metrics.greedy_generate) on the first "
              f"{args.check_prompts} prompts of each task, beside llama.cpp's on the same prompts.", ""]
    lines += check_lines(tasks, measured, ours, out, prompts, zoo_em)
    lines += ["", f"## llama.cpp generation speed ({args.speed_tokens} tokens after the first test prompt of "
              f"{tasks[0]}, {args.speed_repeats} interleaved runs, median; the adapters of {tasks[0]})", ""]
    lines += speed_lines(variants, out, args)
    lines += ["", "## Variants", "", "Tensors whose rows are not a whole number of the type's blocks (SmolLM2's "
              "576-wide rows against the k-quants' 256) take llama.cpp's fallback type; 'fallbacks' counts them.", "",
              "| variant | registered as | file | size | bits / weight | tensor types | fallbacks | create s |",
              "|---|---|---|---|---|---|---|---|"]
    for vkey in variants:
        v = made[vkey]
        types = ", ".join(f"{t} {c}" for t, c in sorted((v["types"] or {}).items()))
        bits = "–" if v["bits"] is None else f"{v['bits']:.2f}"
        lines.append(f"| {vkey} | {v['name']} | {v['file']} | {_mib(v['bytes'])} | {bits} | {types or '–'} | "
                     f"{len(v['fallbacks'] or {})} | {_secs(v['create_s'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
