"""Merge speed (ours vs PEFT ``add_weighted_adapter``, same inputs, same run) and merge quality.

Usage:
  python benchmarks/merge.py [--ns 2,4,8] [--rank 16] [--density 0.5] [--threads 2]
                             [--out benchmarks/results/merge.md]
  python benchmarks/merge.py --zoo-home DIR --zoo a,b[,c] --tasks t1,t2[,t3]   # adds quality

Timing: N LoRAs of rank 16 with the shapes of SmolLM2-135M (30 layers, q/k/v/o:
576×576, 192×576, 192×576, 576×576; what ``adapt train`` targets by default), random
factors, float32, CPU. Each pair of rows merges the same inputs at the same output rank:

- ``task-arithmetic`` rank 16: ours (delta space: QR of the stacked factors + SVD of the
  Σr×Σr core) vs PEFT ``svd`` (dense ΔW + full SVD per module);
- ``ties`` d=0.5 rank 16: ours (dense ΔW, batched trim/elect, float64 Gram truncation) vs
  PEFT ``ties_svd``;
- ``task-arithmetic`` exact (rank Σr): ours vs PEFT ``cat``;
- factor space ``linear`` / ``ties``: ours ``space=factors`` vs PEFT ``linear`` / ``ties``.

The ratio column is PEFT time / our time (best of ``--repeat`` for both). The error
column is ‖ΔW_merged − ΔW_ref‖_F / ‖ΔW_ref‖_F summed over modules, ΔW_ref the exact
Σ w_i ΔW_i for task arithmetic (both sides are Eckart–Young truncations of it) and
PEFT's result for the other rows (agreement with PEFT).

Pack rows: the same N adapters ComPEFT-packed (k = 0.1, one scale per input, bitmask),
factor-space TIES with ``majority=frequency``: sign election on the bit planes
(``kernels.elect_signs``; the CPU twin here) vs the dense vote; the outputs are checked
bit-identical.

Quality (``--zoo-home``, registry of zoo task LoRAs and their packs): mean completion
cross-entropy and exact match on each task's test split for each single LoRA, task
arithmetic and TIES (delta space) from the original LoRAs and from their packs (the
shape of ComPEFT's Table 6).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterhub_c.adapters.lora import PREFIX, LoraAdapter  # noqa: E402
from adapterhub_c.merge import merge_adapters  # noqa: E402

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


def timing_rows(ns, rank, alpha, density, layers, repeat, log):
    shp = shapes(layers)
    rows = []
    model = peft_model(layers)
    for n in ns:
        adapters = [make_lora(100 * n + i, shp, rank, alpha) for i in range(n)]
        pm = load_into_peft(model, adapters, rank, alpha)
        names = [f"a{i}" for i in range(n)]
        exact = None
        cases = [
            ("task-arithmetic", f"delta, rank {rank}", dict(method="task-arithmetic", rank=rank),
             dict(combination_type="svd", svd_rank=rank), "svd", "exact"),
            ("ties", f"delta, rank {rank}", dict(method="ties", density=density, rank=rank),
             dict(combination_type="ties_svd", svd_rank=rank, density=density), "ties_svd", "peft"),
            ("task-arithmetic", f"delta, exact rank {n * rank}", dict(method="task-arithmetic"),
             dict(combination_type="cat"), "cat", "exact"),
            ("task-arithmetic", "factors", dict(method="task-arithmetic", space="factors"),
             dict(combination_type="linear"), "linear", "peft"),
            ("ties", "factors", dict(method="ties", space="factors", density=density),
             dict(combination_type="ties", density=density), "ties", "peft"),
        ]
        for method, where, ours_kw, peft_kw, peft_name, ref in cases:
            t_ours, res = best(lambda: merge_adapters(adapters, **ours_kw), repeat)
            peft_repeat = repeat if peft_name in ("cat", "linear", "ties") else 1

            def run_peft():
                if "merged" in pm.peft_config:
                    pm.delete_adapter("merged")
                pm.add_weighted_adapter(names, [1.0] * n, "merged", **peft_kw)

            t_peft, _ = best(run_peft, peft_repeat)
            modules = list(shp)
            got_peft = peft_deltas(pm, "merged", modules)
            got_ours = our_deltas(res.adapter)
            if ref == "exact":
                if exact is None:
                    per = [our_deltas(a) for a in adapters]
                    exact = {m: sum(p[m] for p in per) for m in modules}
                err_ours, err_peft = rel_err(got_ours, exact), rel_err(got_peft, exact)
                err = f"{err_ours:.2e} / {err_peft:.2e} (vs exact)"
            else:
                err = f"{rel_err(got_ours, got_peft):.2e} (ours vs peft)"
            row = dict(N=n, method=method, space=where, peft=peft_name, ours_s=t_ours, peft_s=t_peft,
                       ratio=t_peft / t_ours, error=err)
            rows.append(row)
            log(f"N={n} {method:16s} {where:22s} ours {t_ours:8.3f}s  peft {peft_name:9s} {t_peft:8.3f}s  "
                f"x{t_peft / t_ours:6.1f}  {err}")
        model = pm.unload()
    return rows


def pack_rows(n, rank, alpha, layers, repeat, log):
    """Popcount vs dense sign election on N packs (factor-space TIES, frequency majority)."""
    from adapterhub_c.merge.registry_ops import MergeInput, load_pack_input, popcount_elections, run_merge
    from adapterhub_c.merge.spec import make_spec
    from adapterhub_c.pack.format import pack_adapter, write_pack
    import tempfile

    shp = shapes(layers)
    inputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            a = make_lora(7000 + i, shp, rank, alpha)
            path = Path(tmp) / f"p{i}.safetensors"
            write_pack(pack_adapter(a, density=0.1, base="builtin:smollm2-135m", source_digest="bench",
                                    encoding="bitmask"), path)
            t0 = time.perf_counter()
            adapter, planes = load_pack_input(path, torch.device("cpu"))
            inputs.append(MergeInput(art=None, adapter=adapter, digest=None, planes=planes,
                                     seconds=time.perf_counter() - t0))
    read_s = sum(x.seconds for x in inputs)
    spec = make_spec(n, method="ties", space="factors", density=0.5, majority="frequency")
    from adapterhub_c.merge.factors import factor_weights  # noqa: F401  (same module the merge uses)
    from adapterhub_c.merge.ops import elected_signs
    from adapterhub_c.merge.inputs import module_inputs

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
def quality_rows(home: str, zoo: list[str], tasks: list[str], packs: list[str] | None, density: float,
                 max_examples: int, log):
    """Per-task loss / exact match of singles, TA and TIES merges, from LoRAs and from packs."""
    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import exact_match
    from adapterhub_c.merge.completions import completion_loss, encode_examples
    from adapterhub_c.merge.registry_ops import load_inputs, resolve_inputs
    from adapterhub_c.models.loading import load_base_model
    from adapterhub_c.registry import Registry

    reg = Registry(home=home)
    arts, base, _ = resolve_inputs(reg, zoo)
    loras = [x.adapter for x in load_inputs(reg, arts, torch.device("cpu"))]
    candidates = {f"single {a.name}": a_l for a, a_l in zip(arts, loras)}
    candidates["task-arithmetic (LoRAs)"] = merge_adapters(loras, "task-arithmetic").adapter
    candidates[f"ties d={density} (LoRAs)"] = merge_adapters(loras, "ties", density=density).adapter
    if packs:
        p_arts, _, _ = resolve_inputs(reg, packs)
        plist = [x.adapter for x in load_inputs(reg, p_arts, torch.device("cpu"))]
        candidates["task-arithmetic (packs)"] = merge_adapters(plist, "task-arithmetic").adapter
        candidates[f"ties d={density} (packs)"] = merge_adapters(plist, "ties", density=density).adapter
    model, tok = load_base_model(reg, base, "cpu")
    from peft import PeftModel
    import tempfile

    data = {t: load_dataset(f"builtin:task/{t}", "test").pairs[:max_examples] for t in tasks}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, adapter in [("base", None)] + list(candidates.items()):
            if adapter is None:
                m = model
            else:
                folder = adapter.to_folder(Path(tmp) / label.replace(" ", "_").replace("/", "_"))
                m = PeftModel.from_pretrained(model, str(folder)).eval()
            row = {"adapter": label}
            for t, pairs in data.items():
                batches, n_tok = encode_examples(tok, pairs, 8)
                row[f"{t} loss"] = completion_loss(m, batches, n_tok)
                row[f"{t} EM"] = exact_match(m, tok, pairs)["exact_match"]
            rows.append(row)
            log(str(row))
            if adapter is not None:
                model = m.unload()
    reg.close()
    return rows


def md_table(rows, cols) -> str:
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=SMOLLM2["layers"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-packs", action="store_true")
    ap.add_argument("--zoo-home", default=None)
    ap.add_argument("--zoo", default=None, help="comma-separated zoo LoRA names")
    ap.add_argument("--zoo-packs", default=None, help="comma-separated packs of the same LoRAs, same order")
    ap.add_argument("--tasks", default=None, help="comma-separated built-in task names, one per zoo LoRA")
    ap.add_argument("--max-examples", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/merge.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",")]
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)

    started = time.time()
    rows = timing_rows(ns, args.rank, args.alpha, args.density, args.layers, args.repeat, log)
    out = [f"# Merge benchmark\n",
           f"`python benchmarks/merge.py --ns {args.ns} --rank {args.rank} --density {args.density} "
           f"--layers {args.layers} --repeat {args.repeat}` — CPU, torch threads {torch.get_num_threads()}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
           f"Inputs: N random rank-{args.rank} LoRAs with SmolLM2-135M shapes ({args.layers} layers × q/k/v/o = "
           f"{4 * args.layers} modules), float32. ratio = PEFT time / our time (same inputs, same run).\n",
           md_table(rows, ["N", "method", "space", "peft", "ours_s", "peft_s", "ratio", "error"])]
    if not args.no_packs:
        prow = pack_rows(max(ns), args.rank, args.alpha, args.layers, args.repeat, log)
        out += ["\n## Packs: popcount sign election vs dense vote\n",
                "Factor-space TIES over ComPEFT packs (k=0.1, bitmask), majority=frequency; outputs identical. "
                "ratio = dense / popcount (CPU twin of the kernel).\n",
                md_table(prow, ["N", "what", "popcount_s", "dense_s", "ratio", "merge_popcount_s", "merge_dense_s",
                                "read_decode_s", "identical"])]
    if args.zoo_home and args.zoo and args.tasks:
        q = quality_rows(args.zoo_home, args.zoo.split(","), args.tasks.split(","),
                         args.zoo_packs.split(",") if args.zoo_packs else None, args.density,
                         args.max_examples, log)
        cols = ["adapter"] + [c for c in q[0] if c != "adapter"]
        out += ["\n## Quality of merges of zoo task LoRAs (test split, completion loss / exact match)\n",
                md_table(q, cols)]
    out.append(f"\nTotal wall time {time.time() - started:.0f} s.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
