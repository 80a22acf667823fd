"""Merge speed (ours vs PEFT ``add_weighted_adapter``, same inputs, same run) and merge quality.

Usage:
  python benchmarks/merge.py --zoo all [--ns 2,4,8] [--layers L] [--quality-tasks 2]
  python benchmarks/merge.py --home H --loras A,B --tasks t1,t2      # LoRAs already registered
  python benchmarks/merge.py [--ns 2,4,8] --out FILE                  # random LoRAs, timing only

Timing: N LoRAs — the zoo's real task LoRAs (cycled when N exceeds their number), or
random rank-16 LoRAs with the shapes of SmolLM2-135M (q/k/v/o: 576×576, 192×576,
192×576, 576×576) — restricted to the first ``--layers`` decoder layers, float32, CPU.
PEFT runs on a randomly initialised Llama with SmolLM2-135M's layer shapes (the base
weights play no part in a merge). Each pair of rows merges the same inputs at the same
output rank:

- ``task-arithmetic`` rank 16: ours (delta space: randomized subspace iteration on the
  stacked factors, exact QR + core SVD when Σr ≤ 32) vs PEFT ``svd`` (dense ΔW + full SVD
  per module);
- ``ties`` d=0.5 rank 16: ours (dense ΔW, fused numba trim/elect/merge on CPU, randomized
  truncation) vs PEFT ``ties_svd``; and ours with ``svd="exact"`` (float64 Gram
  eigendecomposition) against the same PEFT run;
- ``task-arithmetic`` exact (rank Σr): ours vs PEFT ``cat``;
- factor space ``linear`` / ``ties``: ours ``space=factors`` vs PEFT ``linear`` / ``ties``.

The ratio column is PEFT time / our time (best of ``--repeat`` for both). The error
column: for the rank-16 rows, how far each side's result is from the best rank-16
approximation M_16 of the merged update M (the exact Σ ΔW_i, or the dense TIES merge in
float64): ‖M − ΔW_merged‖_F / ‖M − M_16‖_F − 1 summed over modules, 0 being the optimum
(two results can both be optimal to 1e-5 and still differ by more than that where σ_16 ≈
σ_17, so they are not compared with each other); for the exact-rank rows the relative
Frobenius error against Σ ΔW_i; for factor space the relative difference from PEFT's.

Pack rows: the same N adapters ComPEFT-packed (k = 0.1, one scale per input, bitmask),
factor-space TIES with ``majority=frequency``: sign election on the bit planes
(``kernels.elect_signs``; the CPU twin here) vs the dense vote; the outputs are checked
bit-identical.

Quality (``--zoo``/``--loras``): the first ``--quality-tasks`` task LoRAs are packed
(ComPEFT, ``--pack-density``/``--pack-alpha``, registered like ``adapt pack``), read back
through the merge command's input path (packs decoded once), merged (task arithmetic and
TIES in ΔW space) from the LoRAs and from the packs, and scored on every merged task's
test split: exact match and completion perplexity (the shape of ComPEFT's Table 6).
Writes ``benchmarks/results/merge.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_zoo  # noqa: E402

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter  # noqa: E402
from adapterhub_c.merging import merge_adapters  # noqa: E402

SMOLLM2 = dict(hidden=576, kv=192, layers=30)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def shapes(layers: int) -> dict[str, tuple[int, int]]:
    h, kv = SMOLLM2["hidden"], SMOLLM2["kv"]
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    return {f"model.layers.{i}.self_attn.{t}": dims[t] for i in range(layers) for t in TARGETS}


def make_lora(seed: int, shp: dict, rank: int, alpha: float) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, (o, i) in shp.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(rank, i, generator=g) / i ** 0.5
        tensors[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
    cfg = dict(peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(TARGETS), task_type="CAUSAL_LM",
               base_model_name_or_path="builtin:smollm2-135m")
    return LoraAdapter(cfg, tensors)


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def peft_model(layers: int):
    """A Llama with SmolLM2-135M's layer shapes (vocab cut to 256: it is not merged)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def load_into_peft(model, adapters: list[LoraAdapter], rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0)
    pm = get_peft_model(model, cfg, adapter_name="a0")
    for i, a in enumerate(adapters):
        name = f"a{i}"
        if i:
            pm.add_adapter(name, cfg)
        set_peft_model_state_dict(pm, a.tensors, adapter_name=name)
    return pm


def peft_deltas(pm, name: str, modules) -> dict[str, torch.Tensor]:
    out = {}
    for m in modules:
        layer = pm.base_model.model.get_submodule(m)
        out[m] = layer.scaling[name] * (layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double())
    return out


def our_deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {m: layer.scale * (layer.B.double() @ layer.A.double()) for m, layer in adapter.layers().items()}


def rel_err(got: dict, ref: dict) -> float:
    num = sum(float((got[m] - ref[m]).norm() ** 2) for m in ref)
    den = sum(float(ref[m].norm() ** 2) for m in ref)
    return (num / den) ** 0.5


def optimal_residuals(full: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    """‖M − M_r‖²_F of the best rank-r approximation (Eckart–Young) of each module's M."""
    return {m: float(torch.linalg.svdvals(M)[rank:].pow(2).sum()) for m, M in full.items()}


def excess_over_optimum(got: dict, full: dict, optimal: dict) -> float:
    """‖M − got‖_F / ‖M − M_r‖_F − 1, both summed over modules (0: the optimum)."""
    num = sum(float((full[m] - got[m]).pow(2).sum()) for m in full)
    return (num / sum(optimal.values())) ** 0.5 - 1


def ties_reference(adapters: list[LoraAdapter], density: float) -> dict[str, torch.Tensor]:
    """The dense TIES merge (PEFT convention, weights 1) of each module in float64 with the
    torch rules of ``adapterhub_c.merging.rules`` (which the tests check against a loop reference)."""
    from adapterhub_c.merging.rules import merge_dense

    per = [our_deltas(a) for a in adapters]
    return {m: merge_dense(torch.stack([p[m] for p in per]), torch.ones(len(per), dtype=torch.float64), "ties",
                           density, "total", "peft") for m in per[0]}


def first_layers(adapter: LoraAdapter, layers: int) -> LoraAdapter:
    """The adapter restricted to modules of the first ``layers`` decoder layers."""
    import re

    keep = {k: v for k, v in adapter.tensors.items()
            if (m := re.search(r"\.layers\.(\d+)\.", k)) is None or int(m.group(1)) < layers}
    return LoraAdapter(dict(adapter.config), keep)


def warm_up_kernels() -> float:
    """Compile (or load from numba's disk cache) the CPU TIES kernels once, outside the
    timings; returns the seconds it took."""
    t0 = time.perf_counter()
    tiny = {"model.layers.0.self_attn.q_proj": (8, 8)}
    merge_adapters([make_lora(1, tiny, 2, 4.0), make_lora(2, tiny, 2, 4.0)], "ties", density=0.5)
    return time.perf_counter() - t0


def timing_rows(ns, rank, alpha, density, layers, repeat, log, real: list[LoraAdapter] | None = None):
    shp = shapes(layers)
    rows = []
    log(f"CPU TIES kernels ready in {warm_up_kernels():.2f}s (numba compile or disk-cache load)")
    model = peft_model(layers)
    for n in ns:
        if real:
            # real LoRAs, cycled when N exceeds how many there are
            adapters = [first_layers(real[i % len(real)], layers) for i in range(n)]
        else:
            adapters = [make_lora(100 * n + i, shp, rank, alpha) for i in range(n)]
        pm = load_into_peft(model, adapters, rank, alpha)
        names = [f"a{i}" for i in range(n)]
        modules = list(shp)
        exact = ties_full = None
        cases = [
            ("task-arithmetic", f"delta, rank {rank}", dict(method="task-arithmetic", rank=rank),
             dict(combination_type="svd", svd_rank=rank), "svd", "ta-optimum"),
            ("ties", f"delta, rank {rank}", dict(method="ties", density=density, rank=rank),
             dict(combination_type="ties_svd", svd_rank=rank, density=density), "ties_svd", "ties-optimum"),
            ("ties", f"delta, rank {rank}, --svd exact", dict(method="ties", density=density, rank=rank, svd="exact"),
             dict(combination_type="ties_svd", svd_rank=rank, density=density), "ties_svd", "ties-optimum"),
            ("task-arithmetic", f"delta, exact rank {n * rank}", dict(method="task-arithmetic"),
             dict(combination_type="cat"), "cat", "exact"),
            ("task-arithmetic", "factors", dict(method="task-arithmetic", space="factors"),
             dict(combination_type="linear"), "linear", "peft"),
            ("ties", "factors", dict(method="ties", space="factors", density=density),
             dict(combination_type="ties", density=density), "ties", "peft"),
        ]
        peft_runs: dict[str, tuple[float, dict]] = {}   # PEFT method -> (seconds, ΔW per module)
        optima: dict[str, dict[str, float]] = {}         # reference -> optimal residual per module
        for method, where, ours_kw, peft_kw, peft_name, ref in cases:
            t_ours, res = best(lambda adapters=adapters, kw=ours_kw: merge_adapters(adapters, **kw), repeat)
            if peft_name not in peft_runs:  # the same PEFT merge serves both TIES rows
                peft_repeat = repeat if peft_name in ("cat", "linear", "ties") else 1

                def run_peft(pm=pm, names=names, n=n, kw=peft_kw):
                    if "merged" in pm.peft_config:
                        pm.delete_adapter("merged")
                    pm.add_weighted_adapter(names, [1.0] * n, "merged", **kw)

                t_peft, _ = best(run_peft, peft_repeat)
                peft_runs[peft_name] = (t_peft, peft_deltas(pm, "merged", modules))
            t_peft, got_peft = peft_runs[peft_name]
            got_ours = our_deltas(res.adapter)
            if ref in ("exact", "ta-optimum") and exact is None:
                per = [our_deltas(a) for a in adapters]
                exact = {m: sum(p[m] for p in per) for m in modules}
            if ref == "exact":
                err = f"{rel_err(got_ours, exact):.2e} / {rel_err(got_peft, exact):.2e} (vs exact)"
            elif ref == "ta-optimum" or ref == "ties-optimum":
                if ref == "ties-optimum" and ties_full is None:
                    ties_full = ties_reference(adapters, density)
                full = exact if ref == "ta-optimum" else ties_full
                if ref not in optima:
                    optima[ref] = optimal_residuals(full, rank)
                opt = optima[ref]
                err = (f"{excess_over_optimum(got_ours, full, opt):.1e} / "
                       f"{excess_over_optimum(got_peft, full, opt):.1e} (over optimum)")
            else:
                err = f"{rel_err(got_ours, got_peft):.2e} (ours vs peft)"
            row = dict(N=n, method=method, space=where, peft=peft_name, ours_s=t_ours, peft_s=t_peft,
                       ratio=t_peft / t_ours, error=err, inputs=len({id(a.tensors) for a in adapters}) if not real
                       else len({i % len(real) for i in range(n)}))
            rows.append(row)
            log(f"N={n} {method:16s} {where:30s} ours {t_ours:8.3f}s  peft {peft_name:9s} {t_peft:8.3f}s  "
                f"x{t_peft / t_ours:6.1f}  {err}")
        model = pm.unload()
    return rows


def pack_rows(n, rank, alpha, layers, repeat, log):
    """Popcount vs dense sign election on N packs (factor-space TIES, frequency majority)."""
    import tempfile

    from adapterhub_c.merging.spec import make_spec
    from adapterhub_c.packing.format import pack_adapter, read_pack, write_pack
    from adapterhub_c.workflows.merges import MergeInput, load_pack_input, popcount_elections, run_merge

    shp = shapes(layers)
    inputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            a = make_lora(7000 + i, shp, rank, alpha)
            path = Path(tmp) / f"p{i}.safetensors"
            write_pack(pack_adapter(a, density=0.1, base="builtin:smollm2-135m", source_digest="bench",
                                    encoding="bitmask"), path)
            t0 = time.perf_counter()
            adapter, planes = load_pack_input(read_pack(path), torch.device("cpu"), path.name)
            inputs.append(MergeInput(art=None, adapter=adapter, digest=None, planes=planes,
                                     seconds=time.perf_counter() - t0))
    read_s = sum(x.seconds for x in inputs)
    spec = make_spec(n, method="ties", space="factors", density=0.5, majority="frequency")
    from adapterhub_c.merging.factors import factor_weights  # noqa: F401  (same module the merge uses)
    from adapterhub_c.merging.inputs import module_inputs
    from adapterhub_c.merging.rules import elected_signs

    t_pop, el = best(lambda: popcount_elections(inputs, spec, names=[f"p{i}" for i in range(n)]), repeat)
    mods = module_inputs([x.adapter for x in inputs], [f"p{i}" for i in range(n)])

    def dense_vote():
        out = {}
        for m in mods:
            for f in "AB":
                key = f"{PREFIX}{m.name}.lora_{f}.weight"
                tau = torch.stack([x.adapter.tensors[key].float() for x in inputs])
                out[key] = elected_signs(tau, torch.ones(n), "frequency", "peft")
        return out

    t_dense, _ = best(dense_vote, repeat)
    names = [f"p{i}" for i in range(n)]

    class _Art:  # run_merge names inputs through .art
        def __init__(self, i):
            self.name, self.kind, self.id = f"p{i}", "pack", f"p{i}"

    for i, x in enumerate(inputs):
        x.art = _Art(i)
    t_m_pop, (r_pop, _) = best(lambda: run_merge(inputs, spec, election="popcount"), 1)
    t_m_dense, (r_dense, _) = best(lambda: run_merge(inputs, spec, election="dense"), 1)
    same = all(torch.equal(r_pop.adapter.tensors[k], r_dense.adapter.tensors[k]) for k in r_pop.adapter.tensors)
    log(f"packs N={n}: read+decode {read_s:.2f}s; election popcount {t_pop:.3f}s vs dense vote {t_dense:.3f}s; "
        f"whole merge {t_m_pop:.2f}s vs {t_m_dense:.2f}s; identical={same}; names={names[:2]}…")
    assert el.method == "popcount" and same
    return [dict(N=n, what="sign election (factor TIES, frequency)", popcount_s=t_pop, dense_s=t_dense,
                 ratio=t_dense / t_pop, merge_popcount_s=t_m_pop, merge_dense_s=t_m_dense,
                 read_decode_s=read_s, identical=same)]


# ---- quality on zoo LoRAs ----------------------------------------------------------------------
def task_data(task: str) -> str:
    """The built-in data of a zoo task (``pydoc`` is a text, the others are tasks)."""
    return "builtin:pydoc" if task == "pydoc" else f"builtin:task/{task}"


def parse_alpha(text: str) -> float | str:
    """--pack-alpha: a number, or 'auto' (searched on the LoRA's own task, validation split)."""
    return "auto" if text == "auto" else float(text)


def ensure_pack(reg, lora_name: str, density: float, alpha: float | str, scope: str = "tensor",
                task: str | None = None, method: str = "delta-fit") -> str:
    """A pack of ``lora_name`` registered in ``reg`` (reused when already there).

    ``alpha="auto"`` searches alpha (delta-fit: the gain) on the validation split of ``task``
    (the LoRA's own task, as ``adapt pack --alpha auto --eval-data`` would)."""
    from adapterhub_c.errors import NotFoundError
    from adapterhub_c.workflows.packs import pack_artifact

    a = "auto" if alpha == "auto" else f"{alpha:g}"
    name = f"{lora_name}-k{density:g}-a{a}-{method}" + ("-tensor" if scope == "tensor" else "")
    try:
        reg.get(name, "artifact")
    except NotFoundError:
        extra = dict(eval_data=task_data(task)) if alpha == "auto" else {}
        pack_artifact(reg, lora_name, density=density, alpha=alpha, scope=scope, method=method, name=name, **extra)
    return name


def quality_rows(reg, pairs: list[tuple[str, str]], density: float, pack_density: float, pack_alpha: float,
                 max_examples: int, log, pack_scope: str = "tensor", pack_method: str = "delta-fit"):
    """Per-task loss / exact match of singles, TA and TIES merges (delta space), from the
    LoRAs and from their ComPEFT packs, all read through the merge command's input path."""
    import tempfile

    from peft import PeftModel

    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import completion_perplexity, wilson_interval
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.workflows.merges import load_inputs, resolve_inputs

    tasks = [t for t, _ in pairs]
    arts, base, _ = resolve_inputs(reg, [n for _, n in pairs])
    loras = [x.adapter for x in load_inputs(reg, arts, torch.device("cpu"))]
    packs = [ensure_pack(reg, n, pack_density, pack_alpha, pack_scope, task=t, method=pack_method) for t, n in pairs]
    p_arts, _, _ = resolve_inputs(reg, packs)
    plist = [x.adapter for x in load_inputs(reg, p_arts, torch.device("cpu"))]
    sizes = {a.name: a.size_bytes for a in arts + p_arts}
    candidates: list[tuple[str, LoraAdapter | None, float | None]] = [("base (no adapter)", None, None)]
    candidates += [(f"single {a.name} (LoRA)", l, None) for a, l in zip(arts, loras, strict=False)]
    candidates += [(f"single {a.name} (pack)", l, None) for a, l in zip(p_arts, plist, strict=False)]
    for src, inputs in (("LoRAs", loras), ("packs", plist)):
        for method, kw in (("task-arithmetic", {}), (f"ties d={density}", dict(density=density))):
            res = merge_adapters(inputs, method.split()[0], **kw)
            log(f"merged {method} from {src} in {res.seconds:.2f}s")
            candidates.append((f"{method} ({src})", res.adapter, res.seconds))
    model, tok = load_base_model(reg, base, "cpu")
    data = {t: load_dataset(f"builtin:task/{t}", "test").pairs[:max_examples] for t in tasks}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, adapter, merge_s) in enumerate(candidates):
            t0 = time.perf_counter()
            if adapter is None:
                m = model
            else:
                m = PeftModel.from_pretrained(model, str(adapter.to_folder(Path(tmp) / f"c{i}"))).eval()
            row = {"adapter": label, "merge s": merge_s}
            for t in tasks:
                row[f"{t} EM"] = bench_zoo.batched_exact_match(m, tok, data[t])
                lo, hi = wilson_interval(round(row[f"{t} EM"] * len(data[t])), len(data[t]))
                row[f"{t} EM 95%"] = f"{lo:.2f}–{hi:.2f}"
                row[f"{t} ppl"] = completion_perplexity(m, tok, data[t], batch_size=16)["completion_ppl"]
            rows.append(row)
            log(f"{label}: {row} ({time.perf_counter() - t0:.0f}s)")
            if adapter is not None:
                model = m.unload()
    return rows, sizes, packs


def md_table(rows, cols, fmt=None) -> str:
    fmt = {"ours_s": "{:.3f}", "peft_s": "{:.3f}", "ratio": "{:.1f}", "popcount_s": "{:.4f}", "dense_s": "{:.4f}",
           "merge_popcount_s": "{:.3f}", "merge_dense_s": "{:.3f}", "read_decode_s": "{:.3f}", **(fmt or {})}
    return bench_zoo.md_table(rows, cols, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--density", type=float, default=0.5, help="TIES density")
    ap.add_argument("--layers", type=int, default=SMOLLM2["layers"], help="timing: first L decoder layers")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-packs", action="store_true")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--random-timing", action="store_true", help="time on random LoRAs even with --zoo")
    ap.add_argument("--quality-tasks", type=int, default=2, help="quality: merge the first Q zoo LoRAs")
    ap.add_argument("--pack-density", type=float, default=0.2)
    ap.add_argument("--pack-alpha", type=parse_alpha, default=1.0, help="a number or 'auto'")
    ap.add_argument("--pack-method", default="delta-fit", choices=["delta-fit", "compeft"])
    ap.add_argument("--pack-scope", default="tensor", choices=["tensor", "global"])
    ap.add_argument("--max-examples", type=int, default=16)
    ap.add_argument("--out", default=None)
    bench_zoo.add_arguments(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",")]

    def log(s: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)

    started = time.time()
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    reg, pairs, real = None, [], None
    if args.zoo or args.loras:
        from adapterhub_c.runtime.adapters import load_adapter_artifact

        reg, pairs = bench_zoo.open_loras(args)
        if not args.random_timing:
            real = [load_adapter_artifact(reg, reg.get(n, "artifact")).lora for _, n in pairs]
            args.rank, args.alpha = int(real[0].config["r"]), float(real[0].config["lora_alpha"])
    rows = timing_rows(ns, args.rank, args.alpha, args.density, args.layers, args.repeat, log, real)
    if real:
        what = (f"the {len(real)} LoRAs {', '.join(n for _, n in pairs)} (rank {args.rank}, alpha {args.alpha:g}), "
                f"cycled when N > {len(real)} (the `inputs` column: distinct LoRAs among the N), restricted to "
                f"their modules in the first {args.layers} decoder layers ({4 * args.layers} modules)")
    else:
        what = (f"N random rank-{args.rank} LoRAs with SmolLM2-135M shapes ({args.layers} layers × q/k/v/o = "
                f"{4 * args.layers} modules)")
    out = ["# Merge benchmark\n",
           f"`{cmd}` — CPU, torch threads {torch.get_num_threads()} ({os.cpu_count()} CPUs), "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
           "## Speed: ours vs PEFT `add_weighted_adapter`, same inputs, same output rank, same run\n",
           f"Inputs: {what}, float32. ours_s / peft_s: best of {args.repeat} (PEFT's `svd`/`ties_svd`: one run, "
           "they are slow; both TIES rows are timed against the same PEFT run); ratio = PEFT time / our time. "
           "error, rank-16 rows: ‖M − ΔW‖_F / ‖M − M_16‖_F − 1 summed over modules for ours / PEFT, where M is the "
           "merged update (exact Σ ΔW_i, or the dense TIES merge in float64) and M_16 its best rank-16 "
           "approximation (0 = optimal); exact-rank rows: relative Frobenius error against Σ ΔW_i; factor "
           "space: relative difference from PEFT's result. The CPU TIES kernels are compiled (numba) or loaded from "
           "their disk cache once before the timings (about 1 s cold, 0.5 s from the cache).\n",
           md_table(rows, ["N", "inputs", "method", "space", "peft", "ours_s", "peft_s", "ratio", "error"])]
    if not args.no_packs:
        prow = pack_rows(max(ns), args.rank, args.alpha, args.layers, args.repeat, log)
        out += ["\n## Packs: popcount sign election vs dense vote\n",
                f"Factor-space TIES over {max(ns)} ComPEFT packs of random LoRAs with the same shapes (k=0.1, bitmask), "
                "majority=frequency; outputs checked identical. ratio = dense / popcount (CPU twin of the kernel).\n",
                md_table(prow, ["N", "what", "popcount_s", "dense_s", "ratio", "merge_popcount_s", "merge_dense_s",
                                "read_decode_s", "identical"])]
    if reg is not None and not args.no_quality:
        qpairs = [p for p in pairs if p[0] != "pydoc"][:args.quality_tasks]
        q, sizes, packs = quality_rows(reg, qpairs, args.density, args.pack_density, args.pack_alpha,
                                       args.max_examples, log, args.pack_scope, args.pack_method)
        cols = ["adapter"] + [c for c in q[0] if c != "adapter"]
        tasks = [t for t, _ in qpairs]
        out += ["\n## Quality of merged task LoRAs: from the LoRAs vs from their packs (ComPEFT Table 6 shape)\n",
                f"Inputs: {', '.join(f'{n} ({t})' for t, n in qpairs)} and their packs "
                f"({args.pack_method}, k={args.pack_density:g}, alpha={args.pack_alpha}, {args.pack_scope} scope: "
                f"{', '.join(packs)}; sizes "
                + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()) + "). "
                f"Merges in ΔW space: task arithmetic (exact rank Σr) and TIES (density {args.density}, majority "
                f"total, PEFT convention, rank 16), weights 1. Scores on the first {args.max_examples} test pairs of "
                f"each task: EM = greedy exact match (batched with a KV cache) with its 95% Wilson interval, ppl = completion "
                f"perplexity. "
                f"The merged adapter should keep each task's score close to its single LoRA.\n",
                md_table(q, cols, {"merge s": "{:.2f}", **{f"{t} EM": "{:.3f}" for t in tasks},
                                   **{f"{t} ppl": "{:.3f}" for t in tasks}})]
    out.append(f"\nTotal wall time {time.time() - started:.0f} s.\n")
    text = "\n".join(out)
    print(text)
    if reg is not None or args.out:
        print(f"wrote {bench_zoo.write_result('merge', text, args.out)}")


if __name__ == "__main__":
    main()
