"""How variants, conversion, packing and merging scale from SmolLM2-135M to -1.7B shapes.

Usage:
  python benchmarks/scale.py [--shapes 135m,360m,1.7b] [--real] [--home DIR] [--calib-samples 8]
                             [--out benchmarks/results/scale.md] [--skip-convert] [--only convert]

Models: random-initialised Llamas with the shapes of SmolLM2-135M, -360M and -1.7B (configs
built in-process from the published shapes, seeded, stored as bf16 as their Hub checkpoints are,
the real SmolLM2 tokenizer; no download), and with `--real` the real SmolLM2-135M
(`builtin:smollm2-135m`). Every measurement runs in a fresh subprocess (this script with
`--worker`) so that its peak RSS (`ru_maxrss`) is its own; `runtime RSS` is what a worker
holds after importing torch / transformers / peft, before any model.

For each model:
- variant build time and peak RSS of `create_variant` (no perplexity) for nf4, wanda 50%,
  nf4 + wanda 50% and 2:4 (wanda-scored), calibration `--calib-samples` x 128 tokens;
- stored bytes (what the variant adds to the store: its blobs not shared with the base),
  compared with the bound at the format's bit width (1 bit per pruned weight; 0 for
  quantization only); loaded bytes, measured on the loaded model (bnb weights + scales +
  the other tensors in float32), compared with `sizes.py`'s formula; exported bytes
  (`adapt export --format hf` weight files), compared with the same formula at the base's
  stored dtype;
- load time of the variant against the base's (float32) and against the base loaded with
  bitsandbytes quantization (nf4) — the target is variant <= 1.3 x base + quantization;
- `adapt convert` of an r 16 q/k/v/o LoRA to the nf4 + wanda 50% variant, 2 steps, batch
  1 x 128 tokens (inherit + recover + distill): seconds per step and peak RSS, compared with
  teacher weights (float32) + student weights (loaded bytes) + LoRA / recovery parameters,
  gradients and Adam state (float32) + activations (per layer s·b·h·(34 + 5·a·s/h) bytes at
  16 bits, after Korthikanti et al. 2022, doubled for float32; + logits and their gradient;
  + the teacher's hidden states for distillation);
- ComPEFT pack (k = 0.1, alpha 1) and TIES merge (d = 0.5, rank 16) times of r 16
  all-linear LoRAs;
- ten variants of one base: the base's blob + 10 x the largest stored size measured
  (a bound: pruned variants at 50%), as a multiple of the base.
Results go to `benchmarks/results/scale.json` (merged across runs) and `scale.md`, with the
growth of every figure from the smallest to the largest shape measured.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# published SmolLM2 shapes (config.json of HuggingFaceTB/SmolLM2-{135M,360M,1.7B})
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # only to check the script quickly (--shapes tiny)
}
COMMON = dict(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu")
RECIPES = {
    "nf4": dict(quant="nf4"),
    "wanda50": dict(prune="wanda", sparsity=0.5),
    "nf4+wanda50": dict(quant="nf4", prune="wanda", sparsity=0.5),
    "2:4": dict(prune="2:4"),
}
CONVERT_VARIANT = "nf4+wanda50"
SEQ, BATCH, RANK = 128, 1, 16
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = QKVO + ["gate_proj", "up_proj", "down_proj"]


# ---- worker side ------------------------------------------------------------------------------


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _imports():
    import peft  # noqa: F401 - counted in the runtime RSS like the others
    import torch  # noqa: F401
    import transformers  # noqa: F401


def _registry(home: str):
    from adapterhub_c.registry import Registry

    return Registry(home=home)


def _slug(base: str) -> str:
    """A base name as the start of an artefact name (the name rule has no ':')."""
    return base.replace(":", "-")


def _variant_name(base: str, label: str) -> str:
    # the real base's variants get a prefix: the random 135M shape's would have the same names
    prefix = "real-" if base.startswith("builtin:") else ""
    return f"{prefix}{base.split(':', 1)[-1]}-{label.replace('+', '-').replace(':', 'of')}"


def _lora_folder(model, targets: list[str], dest: Path, base_name: str, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(dest)
    cfg_path = dest / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(data, indent=2))
    peft_model.unload()
    return dest


def worker_prep(args) -> dict:
    """Register the base (random shape or the real one) and three random LoRAs for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterhub_c.registry.artifacts import name_taken, register_artifact
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.workflows.bases import add_builtin_base, register_base_folder

    reg = _registry(args.home)
    real, _ = add_builtin_base(reg, "builtin:smollm2-135m")  # the tokenizer (and the real model)
    t0 = time.perf_counter()
    names = {name: f"{args.base}-lora-{name}" for name in ("qkvo", "all-a", "all-b")}
    if args.base != real.name and all(name_taken(reg, n) for n in names.values()):  # registered by an earlier run
        base = reg.get(args.base, "base")
        return _prep_result(reg, base, t0, names)
    if args.base == "builtin:smollm2-135m":
        base = real
        model, _ = load_base_model(reg, base)
    else:
        with reg.session() as s:
            from adapterhub_c.registry.models import BaseModel

            base = s.query(BaseModel).filter_by(name=args.base).one_or_none()
        shape = SHAPES[args.base.split("smollm2-", 1)[1]]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape, **COMMON, dtype="bfloat16")).eval()
        if base is None:
            with tempfile.TemporaryDirectory(dir=reg.cache_dir) as tmp:
                folder = Path(tmp)
                model.to(torch.bfloat16).save_pretrained(folder)
                model.float()
                src = reg.materialize(real)
                for f in src.iterdir():
                    if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                        (folder / f.name).write_bytes(f.read_bytes())
                base, _ = register_base_folder(reg, args.base, folder, None, None, None, None)
        else:
            model.float()
    loras = {}
    with tempfile.TemporaryDirectory(dir=reg.cache_dir) as tmp:
        for name, targets, seed in (("qkvo", QKVO, 1), ("all-a", ALL_LINEAR, 2), ("all-b", ALL_LINEAR, 3)):
            art_name = f"{args.base}-lora-{name}"
            if not name_taken(reg, art_name):
                folder = _lora_folder(model, targets, Path(tmp) / name, base.name, seed)
                register_artifact(reg, kind="lora", name=art_name, base_id=base.id, folder=folder,
                                  source="benchmarks/scale.py", parents=[(base, "adapter-of")])
            loras[name] = art_name
    return _prep_result(reg, base, t0, loras)


def _prep_result(reg, base, t0: float, loras: dict) -> dict:
    return {"base": base.name, "params": base.params, "base_bytes": base.size_bytes,
            "weights_bytes": sum(reg.blobs.path_for(d).stat().st_size for r, d in base.files.items()
                                 if r.endswith(".safetensors")),
            "prep_s": time.perf_counter() - t0, "loras": loras}


def worker_build(args) -> dict:
    from adapterhub_c.workflows.variants import create_variant, variant_summary

    reg = _registry(args.home)
    base = reg.get(args.base, "base")
    t0 = time.perf_counter()
    row, created = create_variant(reg, base, **RECIPES[args.recipe], calib_samples=args.calib_samples,
                                  calib_seq_len=SEQ, eval_tokens=0, name=_variant_name(args.base, args.recipe))
    build_s = time.perf_counter() - t0
    s = variant_summary(row, base)
    st = row.stats
    bound = st["target_params_base"] / 8 if RECIPES[args.recipe].get("prune") else 0
    return {"variant": row.name, "created": created, "build_s": build_s if created else None,
            "stored_bytes": s["stored_bytes"], "stored_bound": bound, "loaded_formula": st["quantized_bytes"],
            "export_formula": st.get("export_bytes"), "base_fp16_bytes": st["base_fp16_bytes"],
            "target_params": st["target_params_base"]}


def _model_bytes(model) -> int:
    """Bytes the loaded model holds in its parameters and buffers (bnb weights + scales), tied once."""
    from adapterhub_c.variants.quantize import is_bnb_linear, quantized_storage_bits

    seen, total = set(), 0
    for module in model.modules():
        if is_bnb_linear(module):
            total += quantized_storage_bits(module) // 8
            seen.add(id(module.weight))
            if module.bias is not None:
                seen.add(id(module.bias))
                total += module.bias.numel() * module.bias.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def worker_load(args) -> dict:
    import gc

    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.variants.quantize import load_quantized

    reg = _registry(args.home)
    base = reg.get(args.base, "base")
    folder = reg.materialize(base)

    def timed(fn):
        best, out = None, None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
            if _ < args.repeat - 1:
                del out
                gc.collect()
        return best, out

    res = {}
    res["base_load_s"], m = timed(lambda: load_base_model(reg, base)[0])
    del m
    gc.collect()
    res["base_nf4_load_s"], m = timed(lambda: load_quantized(folder, "nf4"))
    del m
    gc.collect()
    for label in RECIPES:
        name = _variant_name(args.base, label)
        res[f"{label}_load_s"], m = timed(lambda n=name: load_variant(reg, n))
        res[f"{label}_loaded_bytes"] = _model_bytes(m)
        del m
        gc.collect()
    return res


def worker_export(args) -> dict:
    import shutil

    from adapterhub_c.workflows.exports import export_variant

    reg = _registry(args.home)
    res = {}
    for label in RECIPES:
        out = Path(args.home) / "exports" / label.replace(":", "of")
        t0 = time.perf_counter()
        r = export_variant(reg, _variant_name(args.base, label), out, "hf", force=True)
        res[f"{label}_export_s"] = time.perf_counter() - t0
        res[f"{label}_export_bytes"] = r.weights_bytes
        shutil.rmtree(out, ignore_errors=True)
    return res


def worker_convert(args) -> dict:
    from adapterhub_c.workflows.bases import count_params
    from adapterhub_c.workflows.training import convert_adapter

    reg = _registry(args.home)
    variant = _variant_name(args.base, CONVERT_VARIANT)
    name = f"{_slug(args.base)}-converted-{int(time.time())}"
    t0 = time.perf_counter()
    art, report = convert_adapter(reg, f"{args.base}-lora-qkvo", variant, data="builtin:pydoc", steps=2,
                                  batch_size=BATCH, seq_len=SEQ, max_eval_tokens=SEQ + 1, max_eval_examples=1,
                                  reference_rows=False, name=name)
    wall = time.perf_counter() - t0
    trainable = count_params(reg.materialize(art))
    train = report["train"] or {}
    return {"convert_wall_s": wall, "train_wall_s": train.get("wall_s"), "steps": train.get("steps"),
            "s_per_step": (train.get("wall_s") or 0) / max(1, train.get("steps") or 1),
            "trainable_params": trainable}


def worker_merge(args) -> dict:
    from adapterhub_c.workflows.merges import merge_artifacts
    from adapterhub_c.workflows.packs import pack_artifact

    reg = _registry(args.home)
    stamp = int(time.time())
    t0 = time.perf_counter()
    pack_artifact(reg, f"{args.base}-lora-all-a", density=0.1, alpha=1.0, name=f"{_slug(args.base)}-pack-{stamp}")
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merge_artifacts(reg, [f"{args.base}-lora-all-a", f"{args.base}-lora-all-b"], method="ties", density=0.5,
                    rank=RANK, name=f"{_slug(args.base)}-ties-{stamp}")
    return {"pack_s": pack_s, "ties_s": time.perf_counter() - t0}


WORKERS = {"prep": worker_prep, "build": worker_build, "load": worker_load, "export": worker_export,
           "convert": worker_convert, "merge": worker_merge}


def run_worker(args) -> None:
    _imports()
    runtime = _rss_now()
    out = WORKERS[args.worker](args)
    out.update(peak_rss=_peak_rss(), runtime_rss=runtime)
    print("RESULT " + json.dumps(out), flush=True)


# ---- orchestration ----------------------------------------------------------------------------


def call(args, worker: str, base: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--home", args.home, "--base", base,
           "--calib-samples", str(args.calib_samples), "--repeat", str(args.repeat)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"worker {worker} {base} {extra} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"  {worker} {extra or ''}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def measure(args, base: str, previous: dict | None = None) -> dict:
    print(f"{base}:", flush=True)
    m = {"prep": call(args, "prep", base)}
    if args.only == "convert":  # the convert row again; the other figures are the previous run's
        if not previous or "load" not in previous:
            raise SystemExit(f"--only convert: {base} has no earlier results in the json file to keep")
        call(args, "build", base, recipe=CONVERT_VARIANT)  # the variant converted to, when the home lacks it
        cmd = "python benchmarks/scale.py " + shlex.join(sys.argv[1:])
        return {**previous, "prep": m["prep"],
                "convert": {**call(args, "convert", base), "alone": f"{cmd} ({time.strftime('%Y-%m-%d %H:%M')})"}}
    m["build"] = {label: call(args, "build", base, recipe=label) for label in RECIPES}
    m["load"] = call(args, "load", base)
    m["export"] = call(args, "export", base)
    if not args.skip_convert:
        m["convert"] = call(args, "convert", base)
        m["merge"] = call(args, "merge", base)
    return m


def act_bytes(shape: dict, seq: int = SEQ, batch: int = BATCH) -> int:
    h, a, L = shape["hidden_size"], shape["num_attention_heads"], shape["num_hidden_layers"]
    per_layer = seq * batch * h * (34 + 5 * a * seq / h)  # bytes at 16 bits (Korthikanti et al.)
    logits = 3 * seq * batch * COMMON["vocab_size"] * 4  # logits, softmax, their gradient (float32)
    teacher_hidden = (L + 1) * seq * batch * h * 4
    return int(2 * L * per_layer + logits + teacher_hidden)


def shape_of(base: str) -> dict:
    return SHAPES["135m"] if base == "builtin:smollm2-135m" else SHAPES[base.split("smollm2-", 1)[1]]


MB = 1e6


def render(results: dict, order: list[str], cmdline: str) -> str:
    present = [b for b in order if b in results]
    lines = ["# Scale: SmolLM2 shapes 135M → 1.7B\n", f"Command: `{cmdline}`\n",
             "Random-initialised models with the published SmolLM2 shapes (bf16 storage, the real tokenizer) "
             "and, where listed, the real SmolLM2-135M (its base stored in float32, see models/builtin.py); "
             f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} when written; compare within a "
             "column of one run). Sizes in MB (10^6 bytes); ratios against the fp16 "
             "base. Every figure is one measurement in its own process (load times: best of "
             f"{results[present[0]].get('repeat', 1) if present else 1}).\n"]
    for b in present:
        r = results[b]
        p = r["prep"]
        fp16 = 2 * p["params"]
        lines.append(f"\n## {b} ({p['params'] / 1e6:.0f}M parameters, base blob {p['weights_bytes'] / MB:.0f} MB, "
                     f"fp16 {fp16 / MB:.0f} MB)\n")
        lines.append("| variant | build s | build peak RSS MB | stored MB (x fp16) | bound MB | loaded MB (x fp16) |"
                     " formula MB | export MB (x fp16) | formula MB | load s | vs base load | vs base+nf4 |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        ld, ex = r["load"], r["export"]
        for label in RECIPES:
            bd = r["build"][label]
            loaded = ld[f"{label}_loaded_bytes"]
            exported = ex[f"{label}_export_bytes"]
            lines.append(
                f"| {label} | {_f(bd.get('build_s'), 1)} | {bd['peak_rss'] / MB:.0f} | "
                f"{bd['stored_bytes'] / MB:.3f} ({bd['stored_bytes'] / fp16:.4f}) | {bd['stored_bound'] / MB:.3f} | "
                f"{loaded / MB:.1f} ({loaded / fp16:.3f}) | {bd['loaded_formula'] / MB:.1f} | "
                f"{exported / MB:.1f} ({exported / fp16:.3f}) | {_f(bd['export_formula'] and bd['export_formula'] / MB, 1)} | "
                f"{ld[f'{label}_load_s']:.2f} | {ld[f'{label}_load_s'] / ld['base_load_s']:.2f} | "
                f"{ld[f'{label}_load_s'] / ld['base_nf4_load_s']:.2f} |")
        biggest = max(bd["stored_bytes"] for bd in r["build"].values())
        lines.append(f"\nBase load (float32) {ld['base_load_s']:.2f} s, base + bnb nf4 {ld['base_nf4_load_s']:.2f} s. "
                     f"Ten variants of this base: base blob + 10 x {biggest / MB:.2f} MB = "
                     f"{(p['weights_bytes'] + 10 * biggest) / p['weights_bytes']:.2f} x the base blob "
                     f"({(p['weights_bytes'] + 10 * biggest) / fp16:.2f} x fp16).")
        if "convert" in r:
            c, mg = r["convert"], r["merge"]
            shape = shape_of(b)
            teacher = 4 * p["params"]
            student = ld[f"{CONVERT_VARIANT}_loaded_bytes"]
            opt = 16 * c["trainable_params"]  # param + grad + 2 Adam moments, float32
            act = act_bytes(shape)
            bound = teacher + student + opt + act
            lines.append(f"\nConvert (r {RANK} q/k/v/o, {c['steps']} steps, batch {BATCH} x {SEQ}): "
                         f"{c['s_per_step']:.2f} s/step, peak RSS {c['peak_rss'] / MB:.0f} MB against "
                         f"teacher {teacher / MB:.0f} + student {student / MB:.0f} + trainable "
                         f"{c['trainable_params'] / 1e6:.2f}M params x 16 B = {opt / MB:.0f} + activations "
                         f"{act / MB:.0f} = {bound / MB:.0f} MB: {c['peak_rss'] / bound:.2f} x "
                         f"(runtime after imports {c['runtime_rss'] / MB:.0f} MB; "
                         f"{(c['peak_rss'] - c['runtime_rss']) / bound:.2f} x without it"
                         + (f"; measured alone by `{c['alone']}`" if c.get("alone") else "") + "). "
                         f"Pack (k 0.1) {mg['pack_s']:.1f} s, TIES merge (d 0.5, rank {RANK}) {mg['ties_s']:.1f} s "
                         f"of r {RANK} all-linear LoRAs.")
    randoms = [b for b in present if b.startswith("random:")]
    if len(randoms) >= 2:
        lo, hi = randoms[0], randoms[-1]
        a, z = results[lo], results[hi]
        pr = z["prep"]["params"] / a["prep"]["params"]
        lines.append(f"\n## Growth from {lo} to {hi} (parameters x {pr:.1f})\n")
        lines.append("| figure | " + " | ".join(randoms) + " | growth | vs parameters |")
        lines.append("|---|" + "---|" * (len(randoms) + 2))

        def row(label, get, unit=""):
            vals = [get(results[b]) for b in randoms]
            if any(v is None for v in vals):
                return
            g = vals[-1] / vals[0] if vals[0] else float("nan")
            lines.append(f"| {label} | " + " | ".join(f"{v:.3g}{unit}" for v in vals) + f" | x {g:.2f} | "
                         f"{g / pr:.2f} |")

        for label in RECIPES:
            row(f"{label}: build s", lambda r, k=label: r["build"][k].get("build_s"))
            row(f"{label}: build peak RSS MB", lambda r, k=label: r["build"][k]["peak_rss"] / MB)
            row(f"{label}: stored MB", lambda r, k=label: r["build"][k]["stored_bytes"] / MB)
            row(f"{label}: loaded MB", lambda r, k=label: r["load"][f"{k}_loaded_bytes"] / MB)
            row(f"{label}: export MB", lambda r, k=label: r["export"][f"{k}_export_bytes"] / MB)
            row(f"{label}: load s / base+nf4 load s",
                lambda r, k=label: r["load"][f"{k}_load_s"] / r["load"]["base_nf4_load_s"])
        row("base load s", lambda r: r["load"]["base_load_s"])
        row("base + nf4 load s", lambda r: r["load"]["base_nf4_load_s"])
        row("convert s/step", lambda r: r.get("convert", {}).get("s_per_step"))
        row("convert peak RSS MB", lambda r: r["convert"]["peak_rss"] / MB if "convert" in r else None)
        row("pack s", lambda r: r.get("merge", {}).get("pack_s"))
        row("TIES s", lambda r: r.get("merge", {}).get("ties_s"))
        lines.append("\n`vs parameters` = growth / parameter growth (1 = linear in the model size).")
    return "\n".join(lines) + "\n"


def _f(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="135m,360m,1.7b")
    ap.add_argument("--real", action="store_true", help="Also measure the real SmolLM2-135M.")
    ap.add_argument("--home", default=None)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="Load timings: best of this many.")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--only", choices=["convert"], default=None,
                    help="Re-measure only the convert row (prep and the converted variant's build run as needed "
                         "in --home); the other figures are kept from the json file.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.md"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    args.home = args.home or tempfile.mkdtemp(prefix="adapterhub-bench-scale-")
    out = Path(args.out)
    store = out.with_suffix(".json")
    results = json.loads(store.read_text()) if store.exists() else {}
    bases = ([f"random:smollm2-{s}" for s in args.shapes.split(",") if s]
             + (["builtin:smollm2-135m"] if args.real else []))
    for s in args.shapes.split(","):
        if s and s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r} (choose from {', '.join(SHAPES)})")
    cmdline = "python benchmarks/scale.py " + shlex.join(sys.argv[1:])
    if args.only and out.exists():  # the page's other figures are the full run's: its command stays
        full = re.search(r"^Command: `(.*)`$", out.read_text(), re.M)
        cmdline = full.group(1) if full else cmdline
    for b in bases:
        if args.only:
            results[b] = measure(args, b, results.get(b))
        else:
            results[b] = {**measure(args, b), "repeat": args.repeat, "when": time.strftime("%Y-%m-%d %H:%M")}
        store.write_text(json.dumps(results, indent=2, sort_keys=True))
        order = [f"random:smollm2-{s}" for s in SHAPES] + ["builtin:smollm2-135m"]
        out.write_text(render(results, order, cmdline))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
