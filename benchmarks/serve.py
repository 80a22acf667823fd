"""adapt serve: adapter switch time, throughput over 1 / 8 / 64 adapters, memory of resident adapters.

Usage:
  python benchmarks/serve.py                                    # tiny base, random LoRAs (minutes, 2 CPUs)
  python benchmarks/serve.py --base builtin:smollm2-135m --zoo all --device cuda \\
      --concurrency 64 --requests 4 --max-tokens 64             # the real run: SmolLM2 NF4 + Wanda, zoo packs

The target is always an NF4 + Wanda 50% variant of ``--base``. Adapters: ``--zoo TASKS``
pulls the zoo's LoRAs (``benchmarks/zoo.py``; ``all`` for every one); without it, random
LoRAs (r = ``--rank`` on q/k/v/o, seeded) stand in. Either way 64 distinct adapters are
made by cycling the sources with different seeds (A·(1 + 0.05·N(0, 1)), seed i), each
registered three ways: fp32 PEFT folder (``lora-i``), fp16 PEFT folder (``f16-i``), and a
ComPEFT pack of the fp32 one (``pack-i``, k = ``--density``, golomb).

The server runs in a process of its own (this script with ``--child``), the clients in
this one, so client threads do not share the server's interpreter.

1. Switch (first request to a non-resident adapter, registry files page-cached): the
   server's own measure (``x_adapterhub.switch_ms``: read + verify + decode + place) of a
   ``max_tokens=1`` request through the ``openai`` client, for ``--switch-adapters``
   never-loaded adapters per format; against PEFT ``load_adapter`` + ``set_adapter`` of
   the same fp32 folders on a ``PeftModel`` of the same variant, in the same run.
   Resident switch: the same request once the adapter is resident.
2. Throughput: ``--concurrency`` client threads (``openai`` package), ``--requests`` each,
   ``--max-tokens`` tokens (``ignore_eos``), greedy, adapters round-robin over 1, 8 and 64
   packs; grouped batching (the default) against the LoRA part run per adapter slice
   (``gather_min`` = ∞) and against one sequence at a time (``max_batch`` = 1).
3. Memory: process RSS (and CUDA allocated bytes) before and after making all 64 packs
   resident, against the adapters' fp32 bytes.

Writes ``benchmarks/results/serve.md`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_zoo  # noqa: E402
import torch  # noqa: E402

N_ADAPTERS = 64
PROMPT = "Reverse the words: alpha beta gamma\nAnswer:"


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ---- setup -----------------------------------------------------------------------------------
def random_sources(reg, base, rank: int, count: int):
    """``count`` random LoRAs (r = rank, alpha = 2r, q/k/v/o) as LoraAdapter objects."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.training import peft_io

    model, _ = load_base_model(reg, base)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    template = peft_io.extract_lora(peft_model)
    out = []
    for s in range(count):
        g = torch.Generator().manual_seed(1000 + s)
        tensors = {}
        for k, v in template.tensors.items():
            std = (1.0 / v.shape[1]) ** 0.5 if ".lora_A." in k else 0.02
            tensors[k] = torch.randn(v.shape, generator=g) * std
        from adapterhub_c.adapters.lora import LoraAdapter

        out.append(LoraAdapter(config=dict(template.config), tensors=tensors))
    return out


def make_adapters(reg, base, variant, sources, density: float, log) -> list[int]:
    """Register lora-i / f16-i / pack-i for i < 64 (skipping what exists); their fp32 sizes."""
    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.registry.artifacts import name_taken, register_artifact
    from adapterhub_c.runtime.bases import base_label
    from adapterhub_c.workflows.packs import pack_artifact

    label = base_label(base)
    for i in range(N_ADAPTERS):
        if name_taken(reg, f"pack-{i}"):
            continue
        src = sources[i % len(sources)]
        g = torch.Generator().manual_seed(i)
        tensors = {k: (v.float() * (1 + 0.05 * torch.randn(v.shape, generator=g)) if ".lora_A." in k else v.float())
                   for k, v in src.tensors.items()}
        cfg = dict(src.config, base_model_name_or_path=label)
        with tempfile.TemporaryDirectory(dir=reg.cache_dir) as tmp:
            f32 = LoraAdapter(cfg, tensors).to_folder(Path(tmp) / "f32")
            f16 = LoraAdapter(cfg, {k: v.half() for k, v in tensors.items()}).to_folder(Path(tmp) / "f16")
            register_artifact(reg, kind="lora", name=f"lora-{i}", base_id=base.id, folder=f32)
            register_artifact(reg, kind="lora", name=f"f16-{i}", base_id=base.id, folder=f16)
        pack_artifact(reg, f"lora-{i}", density=density, alpha=1.0, name=f"pack-{i}")
        if i % 8 == 7:
            log(f"  registered {i + 1}/{N_ADAPTERS} adapters × 3 formats")
    return [sum(t.numel() * 4 for t in src.tensors.values()) for src in sources]


def read_files(reg, names):
    """Bring the registry files of ``names`` into the page cache."""
    for n in names:
        art = reg.get(n, "artifact")
        for digest in (art.files or {}).values():
            reg.blobs.path_for(digest).read_bytes()


# ---- the server process ---------------------------------------------------------------------
def child(args) -> None:
    """``--child``: serve ``--target`` from ``--home`` until stdin closes; print the endpoint first."""
    from adapterhub_c.registry import Registry
    from adapterhub_c.serve.server import BackgroundServer, ServeOptions

    reg = Registry(home=args.home)
    opts = ServeOptions(**json.loads(args.child))
    srv = BackgroundServer(reg, args.target, opts)

    @srv.server.app.post("/bench/trim")
    async def _trim():  # gc + malloc_trim, so RSS shows what is really held
        trim()
        return {"rss": rss_bytes(), "cuda": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0,
                "resident_bytes": srv.server.cache.resident_bytes()}

    with srv:
        print(f"ENDPOINT {srv.endpoint}", flush=True)
        sys.stdin.read()  # the parent closes our stdin to stop us


class Server:
    """This script in ``--child`` mode: a server process of its own."""

    def __init__(self, home: str, target: str, **options):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(options), "--home", home,
               "--target", target]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(bench_zoo.ROOT)})
        for line in self.proc.stdout:
            if line.startswith("ENDPOINT "):
                self.endpoint = line.split()[1]
                break
        else:
            raise RuntimeError("the server process did not start")
        self.base_url = self.endpoint + "/v1"

    def post(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.endpoint + path, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """/metrics summed over labels, by metric name (without the prefix)."""
        with urllib.request.urlopen(self.endpoint + "/metrics", timeout=60) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            name = name.split("{", 1)[0].removeprefix("adapterhub_serve_")
            out[name] = out.get(name, 0.0) + float(value)
        return out

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=3600)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---- 1. switch -------------------------------------------------------------------------------
def switch_table(srv: Server, reg, variant: str, n_switch: int, repeat: int, log) -> tuple[list[dict], dict]:
    client = srv.client()

    def ask(name):
        out = client.completions.create(model=name, prompt="a", max_tokens=1, temperature=0)
        return out.model_extra["x_adapterhub"]

    # the last adapter of each format warms the code path; the others are first requests
    names = {fmt: [f"{fmt}-{i}" for i in range(N_ADAPTERS - n_switch - 1, N_ADAPTERS)] for fmt in ("pack", "f16", "lora")}
    for group in names.values():
        read_files(reg, group)
        ask(group.pop())
    times = {fmt: [] for fmt in names}
    resident = []
    for i in range(n_switch):
        for fmt, group in names.items():  # formats interleaved, so drift hits them alike
            info = ask(group[i])
            assert info["cache"] == "miss", info
            times[fmt].append(info["switch_ms"])
            info = ask(group[i])
            assert info["cache"] == "hit", info
            resident.append(info["switch_ms"])
    log("  server switch times measured; PEFT load_adapter next")
    peft_ms = peft_switch(reg, variant, names["lora"], repeat)
    sizes = {fmt: statistics.mean(sum(reg.blobs.path_for(d).stat().st_size
                                      for d in reg.get(n, "artifact").files.values()) for n in group)
             for fmt, group in names.items()}
    pack_cfg = reg.get(names["pack"][0], "artifact").config or {}
    label = {"pack": f"pack ({pack_cfg.get('method', '?')}, {pack_cfg.get('encoding', '?')}) → decode",
             "f16": "fp16 safetensors PEFT folder", "lora": "fp32 safetensors PEFT folder"}
    rows = [{"adapter format": label[fmt], "file bytes": int(sizes[fmt]),
             "median ms": statistics.median(times[fmt]), "p90 ms": pct(times[fmt], 0.9)} for fmt in names]
    rows.append({"adapter format": "PEFT load_adapter + set_adapter (fp32 folder)", "file bytes": int(sizes["lora"]),
                 "median ms": statistics.median(peft_ms), "p90 ms": pct(peft_ms, 0.9)})
    rows.append({"adapter format": "resident (LRU hit)", "file bytes": None,
                 "median ms": statistics.median(resident), "p90 ms": pct(resident, 0.9)})
    return rows, {"pack": statistics.median(times["pack"]), "f16": statistics.median(times["f16"]),
                  "peft": statistics.median(peft_ms), "resident_p90": pct(resident, 0.9)}


def peft_switch(reg, variant, names, repeat: int) -> list[float]:
    from peft import PeftModel

    from adapterhub_c.runtime.variants import load_variant

    folders = [reg.materialize(reg.get(n, "artifact")) for n in names]
    model = PeftModel.from_pretrained(load_variant(reg, variant), str(folders[0]), adapter_name="first")
    model.eval()
    out = []
    for r in range(repeat + 1):
        for i, folder in enumerate(folders):
            name = f"a{i}"
            t0 = time.perf_counter()
            model.load_adapter(str(folder), adapter_name=name)
            model.set_adapter(name)
            ms = (time.perf_counter() - t0) * 1000
            if r:  # the first round warms PEFT's code paths
                out.append(ms)
            model.set_adapter("first")
            model.delete_adapter(name)
    return out


# ---- 2. throughput ---------------------------------------------------------------------------
def throughput(srv: Server, names, concurrency: int, requests: int, max_tokens: int) -> dict:
    before = srv.metrics()
    tokens = [0] * concurrency
    errors = []
    barrier = threading.Barrier(concurrency + 1)

    def client_loop(c):
        client = srv.client()
        barrier.wait()
        for j in range(requests):
            name = names[(c + j * concurrency) % len(names)]
            try:
                out = client.completions.create(model=name, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                extra_body={"ignore_eos": True})
                tokens[c] += out.usage.completion_tokens
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    after = srv.metrics()
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("batches_total", "batch_rows_total",
                                                              "batch_adapters_total", "forward_passes_total")}
    return {"tokens": sum(tokens), "seconds": wall, "tokens/s": sum(tokens) / wall,
            "mean batch rows": d["batch_rows_total"] / max(1, d["batches_total"]),
            "adapters per batch": d["batch_adapters_total"] / max(1, d["batches_total"]),
            "forwards": int(d["forward_passes_total"])}


MODES = {"grouped": {}, "per-adapter loops": {"gather_min": 10 ** 9}, "one at a time": {"max_batch": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="builtin:tiny-llama")
    ap.add_argument("--rank", type=int, default=8, help="rank of the random LoRAs (without --zoo)")
    ap.add_argument("--sources", type=int, default=6, help="random source LoRAs cycled into 64 (without --zoo)")
    ap.add_argument("--density", type=float, default=0.1, help="pack density k")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--switch-adapters", type=int, default=24, help="first requests per format in the switch table")
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs per row (best kept); PEFT switch rounds")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client thread")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sequential-requests", type=int, default=1,
                    help="requests per client in the one-at-a-time runs (they are slow)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--memory-only", action="store_true", help="only the memory table (e.g. with a larger --rank)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)
    bench_zoo.add_arguments(ap)
    args = ap.parse_args()
    if args.child is not None:
        return child(args)
    started = time.time()
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])

    def log(msg):
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    from adapterhub_c.registry import Registry
    from adapterhub_c.runtime.adapters import load_adapter_artifact
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.variants import create_variant

    tmp = None
    if args.zoo or args.loras:
        reg, pairs = bench_zoo.open_loras(args)
        sources = [load_adapter_artifact(reg, reg.get(n, "artifact")).lora for _, n in pairs]
        source_line = bench_zoo.source_line(args, pairs)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
        reg = Registry(home=args.home or tmp.name)
        sources = None
    home = str(reg.home)
    base, _ = add_builtin_base(reg, args.base) if args.base.startswith("builtin:") else (reg.get(args.base), 0)
    if sources is None:
        sources = random_sources(reg, base, args.rank, args.sources)
        source_line = f"{args.sources} random LoRAs r={args.rank} (alpha {2 * args.rank}) on q/k/v/o, seeded"
    vname = f"{base.name.split(':')[-1]}-nf4-wanda50"
    try:
        variant = reg.get(vname, "variant")
    except Exception:  # noqa: BLE001 - not made yet
        log("creating the NF4 + Wanda 50% variant")
        variant, _ = create_variant(reg, base.name, quant="nf4", prune="wanda", sparsity=0.5,
                                    calib_samples=args.calib_samples, eval_tokens=0, name=vname)
    log("registering 64 adapters (fp32, fp16, pack)")
    fp32_sizes = make_adapters(reg, base, variant, sources, args.density, log)
    packs = [f"pack-{i}" for i in range(N_ADAPTERS)]
    every = packs + [f"f16-{i}" for i in range(N_ADAPTERS)] + [f"lora-{i}" for i in range(N_ADAPTERS)]
    common = dict(adapters=every, preload=False, token="", device=args.device, max_batch=N_ADAPTERS)
    n_switch = min(args.switch_adapters, N_ADAPTERS - 1)

    out = ["# adapt serve: switch time, throughput, memory", "",
           f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; target {variant.name} "
           f"(NF4 + Wanda 50% of {base.name}), device {args.device}, {os.cpu_count()} CPUs, load average "
           f"{os.getloadavg()[0]:.1f} at the start. Adapters: {source_line}; cycled into 64 with seeds; "
           f"packs k = {args.density}, golomb. The server runs in its own process; clients: the `openai` "
           "package over HTTP on loopback.", ""]

    if not args.memory_only:
        log("switch times")
        with Server(home, variant.name, **common) as srv:
            srv.client().completions.create(model=variant.name, prompt=PROMPT, max_tokens=2, temperature=0)
            sw_rows, sw = switch_table(srv, reg, variant.name, n_switch, args.repeat, log)

    tp_rows, mem_rows = [], []

    def memory(srv, names, what):
        for n in names[:12]:  # the server's worker threads and their registry connections exist before t0
            srv.post("/v1/load_adapter", {"lora_name": n})
            srv.post("/v1/unload_adapter", {"lora_name": n})
        t0 = srv.post("/bench/trim")
        for n in names:
            srv.post("/v1/load_adapter", {"lora_name": n})
        t1 = srv.post("/bench/trim")
        resident, growth = t1["resident_bytes"] - t0["resident_bytes"], t1["rss"] - t0["rss"]
        mem_rows.append({"what": what, "adapters fp32 bytes": resident, "RSS growth bytes": growth,
                         "RSS growth / adapter bytes": growth / resident,
                         "overhead per adapter bytes": (growth - resident) / len(names),
                         "CUDA growth bytes": (t1["cuda"] - t0["cuda"]) if args.device != "cpu" else None})
        log(f"memory, {what}: RSS +{growth / 2**20:.2f} MiB for {resident / 2**20:.2f} MiB of adapters")

    if args.memory_only:
        for what, names in (("64 packs resident (decoded to fp32)", packs),
                            ("64 fp32 LoRA folders resident", [f"lora-{i}" for i in range(N_ADAPTERS)])):
            with Server(home, variant.name, **common) as srv:
                srv.client().completions.create(model=variant.name, prompt=PROMPT, max_tokens=2, temperature=0)
                memory(srv, names, what)
        out += ["## Memory (64 adapters made resident; RSS of the server process after gc + malloc_trim)", "",
                bench_zoo.md_table(mem_rows, list(mem_rows[0]), {"adapters fp32 bytes": "{:,d}",
                                                                 "RSS growth bytes": "{:,d}",
                                                                 "RSS growth / adapter bytes": "{:.3f}",
                                                                 "overhead per adapter bytes": "{:,.0f}"}), "",
                f"Source LoRA fp32 sizes: {', '.join(f'{s:,d}' for s in fp32_sizes)} bytes.", "",
                f"Total wall time {time.time() - started:.0f} s."]
        log(f"wrote {bench_zoo.write_result('serve_memory', chr(10).join(out), args.out)}")
        return

    for mode, extra in MODES.items():
        with Server(home, variant.name, **{**common, **extra}) as srv:
            srv.client().completions.create(model=variant.name, prompt=PROMPT, max_tokens=2, temperature=0)
            if mode == "grouped":
                memory(srv, packs, "64 packs resident (decoded to fp32)")
            else:
                if mode == "per-adapter loops":
                    memory(srv, [f"lora-{i}" for i in range(N_ADAPTERS)], "64 fp32 LoRA folders resident")
                for n in packs:
                    srv.post("/v1/load_adapter", {"lora_name": n})
            reqs = args.sequential_requests if mode == "one at a time" else args.requests
            counts = [c for c in (1, 8, 64) if not (mode == "per-adapter loops" and c == 1)
                      and not (mode == "one at a time" and c == 64)]
            for count in counts:  # warm-up: every shape once
                throughput(srv, packs[:count], args.concurrency, 1, args.max_tokens)
            for count in counts:
                runs = [throughput(srv, packs[:count], args.concurrency, reqs, args.max_tokens)
                        for _ in range(args.repeat)]
                r = max(runs, key=lambda x: x["tokens/s"])
                tp_rows.append({"adapters": count, "batching": mode, **r,
                                "spread": min(x["tokens/s"] for x in runs) / r["tokens/s"]})
                log(f"throughput {count} adapters, {mode}: {r['tokens/s']:.1f} tok/s (best of {args.repeat})")
    single = next(r["tokens/s"] for r in tp_rows if r["adapters"] == 1 and r["batching"] == "grouped")
    for r in tp_rows:
        r["vs 1 adapter grouped"] = r["tokens/s"] / single
    eight = next(r["tokens/s"] for r in tp_rows if r["adapters"] == 8 and r["batching"] == "grouped")

    def met(ok):
        return "yes" if ok else "NO"

    ratio_mem = mem_rows[0]["RSS growth / adapter bytes"]  # the packs
    out += ["## Targets", "",
            bench_zoo.md_table([
                {"target": "switch: pack ≤ fp16 safetensors", "measured": f"{sw['pack']:.2f} ms vs {sw['f16']:.2f} ms",
                 "met": met(sw["pack"] <= sw["f16"])},
                {"target": "switch: fp16 safetensors ≤ PEFT load_adapter + set_adapter",
                 "measured": f"{sw['f16']:.2f} ms vs {sw['peft']:.2f} ms", "met": met(sw["f16"] <= sw["peft"])},
                {"target": "resident switch ≤ 1 ms (p90)", "measured": f"{sw['resident_p90']:.3f} ms",
                 "met": met(sw["resident_p90"] <= 1.0)},
                {"target": "tokens/s at 8 adapters ≥ 0.8 × 1 adapter", "measured": f"{eight / single:.2f} ×",
                 "met": met(eight >= 0.8 * single)},
                {"target": "RSS growth ≤ 1.2 × adapters' fp32 bytes at 64 resident", "measured": f"{ratio_mem:.2f} ×",
                 "met": met(ratio_mem <= 1.2)},
            ], ["target", "measured", "met"]), "",
            f"## Adapter switch ({n_switch} first requests per format, formats interleaved)", "",
            "Server-side time of a request's switch (`x_adapterhub.switch_ms`: blob verify (sha256), read, pack "
            "decode, slicing and placing the factors on the device) for the first request to a never-loaded "
            "adapter, files in the page cache; the PEFT row loads the same fp32 folders with "
            f"`PeftModel.load_adapter` + `set_adapter` on the same variant in the benchmark process ({args.repeat} "
            "rounds after a warm-up round, no verify). Resident = the second request to each adapter.", "",
            bench_zoo.md_table(sw_rows, ["adapter format", "file bytes", "median ms", "p90 ms"],
                               {"file bytes": "{:,d}", "median ms": "{:.3f}", "p90 ms": "{:.3f}"}), "",
            f"## Throughput ({args.concurrency} concurrent clients, {args.max_tokens} tokens a request, greedy, "
            "ignore_eos; adapters round-robin; all resident)", "",
            "grouped = the server's batching (cohorts of the requests that arrived together, every adapter of a "
            "cohort in one forward: per-slice LoRA matmuls below 4 distinct adapters, gathered batched matmuls "
            "from 4 up); per-adapter loops = the same cohorts with the LoRA part always run slice by slice; "
            f"one at a time = max_batch 1 ({args.sequential_requests} request(s) per client). Each row: best of "
            f"{args.repeat} runs after a warm-up run of every shape (spread = worst / best tokens/s).", "",
            bench_zoo.md_table(tp_rows, ["adapters", "batching", "tokens", "seconds", "tokens/s", "vs 1 adapter grouped",
                                         "spread", "mean batch rows", "adapters per batch", "forwards"],
                               {"tokens/s": "{:.1f}", "seconds": "{:.2f}", "vs 1 adapter grouped": "{:.2f}",
                                "spread": "{:.2f}", "mean batch rows": "{:.1f}", "adapters per batch": "{:.1f}"}), "",
            "## Memory (64 adapters made resident; RSS of the server process after gc + malloc_trim; the "
            "target row is the packs)", "",
            bench_zoo.md_table(mem_rows, list(mem_rows[0]), {"adapters fp32 bytes": "{:,d}", "RSS growth bytes": "{:,d}",
                                                             "RSS growth / adapter bytes": "{:.2f}",
                                                             "overhead per adapter bytes": "{:,.0f}"}), "",
            f"Source LoRA fp32 sizes: {', '.join(f'{s:,d}' for s in fp32_sizes)} bytes.", "",
            f"Total wall time {time.time() - started:.0f} s."]
    path = bench_zoo.write_result("serve", "\n".join(out), args.out)
    log(f"wrote {path}")
    if tmp is not None:
        reg.close()
        tmp.cleanup()


if __name__ == "__main__":
    main()
