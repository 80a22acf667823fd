"""``adapt demo``: the main flow on the embedded defaults, one section per step.

``run_demo`` yields ``(title, rows)`` sections as they complete so the CLI can print them
while the next step runs. The flow is the one a user runs by hand:

1. register the built-in base and measure its perplexity;
2. build the NF4 + 50% Wanda variant and show its perplexity next to the base's;
3. train short task LoRAs on the base (``adapt train``);
4. push one to a local Hub-compatible server (in this process) and pull it back;
5. convert the pulled LoRA to the variant with inherit + recover + distill (``adapt convert``);
6. pack the converted adapter at k = 10% (``adapt pack``, delta-fit: no data needed);
7. merge two task LoRAs (task arithmetic, TIES) and compose LoraHub-style on a third task;
8. learn a short soft prompt on the variant (``adapt prompt learn``);
9. serve the variant with those adapters behind the OpenAI API (``adapt serve``), one request each.

Every step goes through the same library calls as the commands and leaves its artefacts in
the registry; artefacts already made by an earlier demo run (same names) are reused, so a
re-run only re-measures what is cheap.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

from adapterhub_c.evals.data import DEFAULT_CORPUS, load_dataset
from adapterhub_c.models.builtin import SMOLLM2, TINY
from adapterhub_c.registry.models import Artifact
from adapterhub_c.registry.store import Registry
from adapterhub_c.serve.demo import demo_round
from adapterhub_c.workflows.bases import add_builtin_base
from adapterhub_c.workflows.evals import run_eval
from adapterhub_c.workflows.merges import compose_artifacts, merge_artifacts
from adapterhub_c.workflows.packs import pack_artifact
from adapterhub_c.workflows.prompts import learn_prompt_artifact
from adapterhub_c.workflows.pull import pull_adapter
from adapterhub_c.workflows.push import push_artifact
from adapterhub_c.workflows.training import ROW_CONVERTED, convert_adapter, train_adapter
from adapterhub_c.workflows.variants import create_variant, variant_summary

DEMO_DATA = DEFAULT_CORPUS
DEMO_MAX_TOKENS = 2048
CONVERT_TASK, MERGE_TASK, COMPOSE_TASK = "uppercase", "reverse-words", "sort-numbers"
PACK_DENSITY = 0.10


@dataclass(frozen=True)
class DemoSizes:
    """How much each step trains and measures (chosen to keep the demo ~10 min on 2 CPU cores)."""

    eval_tokens: int = DEMO_MAX_TOKENS
    eval_examples: int = 12
    calib_samples: int = 8
    lora_steps: int = 30
    convert_steps: int = 20
    batch_size: int = 4
    seq_len: int = 96
    lr: float = 1e-3  # train and convert (the zoo's rate; the commands' 2e-4 learns little in 30 steps)
    compose_shots: int = 5
    compose_budget: int = 10
    prompt_tokens: int = 16
    prompt_steps: int = 30


# the tiny random Llama learns nothing in a few steps; its sizes only exercise the flow quickly
TINY_SIZES = DemoSizes(eval_tokens=300, eval_examples=4, calib_samples=4, lora_steps=3, convert_steps=2,
                       batch_size=2, seq_len=32, compose_shots=3,
                       compose_budget=3, prompt_tokens=4, prompt_steps=2)


def demo_sizes(base: str, max_tokens: int | None = None) -> DemoSizes:
    """The sizes for ``base`` (tiny ones for the tiny test base), with an optional eval token budget."""
    sizes = TINY_SIZES if base == TINY else DemoSizes()
    if max_tokens is not None:
        sizes = DemoSizes(**{**sizes.__dict__, "eval_tokens": max_tokens})
    return sizes


def _existing_artifact(reg: Registry, name: str) -> Artifact | None:
    from sqlalchemy import select

    with reg.session() as s:
        return s.scalar(select(Artifact).where(Artifact.name == name))


def _reuse_or(reg: Registry, name: str, make: Callable[[], tuple[Artifact, dict]]) -> tuple[Artifact, dict | None]:
    """The artefact named ``name`` if an earlier demo made it, else ``make()``'s (artefact, report)."""
    art = _existing_artifact(reg, name)
    return (art, None) if art is not None else make()


@contextlib.contextmanager
def _private_hub_cache() -> Iterator[None]:
    """Keep the throw-away local hub's downloads out of the user's Hugging Face cache."""
    old = os.environ.get("HF_HUB_CACHE")
    with tempfile.TemporaryDirectory(prefix="adapt-demo-hf-") as tmp:
        os.environ["HF_HUB_CACHE"] = tmp
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("HF_HUB_CACHE", None)
            else:
                os.environ["HF_HUB_CACHE"] = old


def _weights(art: Artifact) -> dict[str, str]:
    """Digests of an artefact's safetensors files (equal digests: bit-identical tensors)."""
    return {f: d for f, d in (art.files or {}).items() if f.endswith(".safetensors")}


def _fmt(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def run_demo(reg: Registry, base: str = SMOLLM2, max_tokens: int | None = None,
             progress=None) -> Iterator[tuple[str, list[dict]]]:
    """Run the demo flow on ``base``; yields (section title, table rows)."""
    from adapterhub_c.hubserver.server import BackgroundServer

    z = demo_sizes(base, max_tokens)
    b, created = add_builtin_base(reg, base, progress=progress)
    short = b.name.replace("builtin:", "")
    yield "base", [{"base": b.name, "params": b.params, "registered": "now" if created else "already"}]

    # 1-2. base and variant perplexity
    base_ppl = run_eval(reg, b.name, DEMO_DATA, "test", max_tokens=z.eval_tokens, progress=progress)["perplexity"]
    variant, made = create_variant(reg, b, quant="nf4", prune="wanda", sparsity=0.5, calib=DEMO_DATA,
                                   calib_samples=z.calib_samples, eval_tokens=0, progress=progress)
    var_ppl = run_eval(reg, variant.name, DEMO_DATA, "test", max_tokens=z.eval_tokens,
                       progress=progress)["perplexity"]
    vs = variant_summary(variant, b)
    fp16 = vs["base_fp16_bytes"]
    yield f"perplexity on {DEMO_DATA} test (first {z.eval_tokens} tokens); sizes against the fp16 base", [
        {"model": b.name, "perplexity": _fmt(base_ppl, 2), "stored_MB": _fmt(b.size_bytes / 1e6, 1),
         "stored_vs_fp16": _fmt(b.size_bytes / fp16, 3) if fp16 else None, "loaded_MB": None, "export_MB": None,
         "vs_base": 1.0},
        {"model": variant.name, "perplexity": _fmt(var_ppl, 2), "stored_MB": _fmt(vs["stored_bytes"] / 1e6, 1),
         "stored_vs_fp16": _fmt(vs["stored_ratio"], 3), "loaded_MB": _fmt(vs["loaded_bytes"] / 1e6, 1),
         "export_MB": _fmt(vs["export_bytes"] / 1e6, 1) if vs["export_bytes"] else None,
         "vs_base": _fmt(var_ppl / base_ppl)}]

    # 3. task LoRAs on the base
    # no "before" evaluation: the base scores 0 exact match on every built-in task
    train = dict(steps=z.lora_steps, lr=z.lr, batch_size=z.batch_size, seq_len=z.seq_len, rank=8, alpha=16,
                 max_eval_examples=z.eval_examples, max_eval_tokens=z.eval_tokens, baseline=False,
                 progress=progress)
    loras, rows = {}, []
    for task in (CONVERT_TASK, MERGE_TASK, COMPOSE_TASK):
        data = f"builtin:task/{task}"
        art, report = _reuse_or(reg, f"demo-{short}-{task}",
                                lambda data=data, task=task: train_adapter(reg, b.name, data,
                                                                           name=f"demo-{short}-{task}", **train))
        loras[task] = art
        after = (report or {}).get("after") or {}
        rows.append({"lora": art.name, "task": task, "exact_match": _fmt(after.get("exact_match")),
                     "train_s": _fmt(((report or {}).get("train") or {}).get("wall_s"), 1),
                     "status": "trained" if report else "reused"})
    yield f"task LoRAs on {b.name} ({z.lora_steps} steps each)", rows

    # 4. push to a local hub and pull back, as a community LoRA
    pulled_name = f"demo-{short}-{CONVERT_TASK}-pulled"
    pulled = _existing_artifact(reg, pulled_name)
    if pulled is None:
        repo = f"demo/{short}-{CONVERT_TASK}-lora"
        with tempfile.TemporaryDirectory(prefix="adapt-demo-hub-") as hub_root, \
                BackgroundServer(hub_root) as server, _private_hub_cache():
            pushed = push_artifact(reg, loras[CONVERT_TASK].name, repo, endpoint=server.endpoint,
                                   progress=progress)
            pulled, _ = pull_adapter(reg, f"{repo}@{pushed['commit_sha']}", endpoint=server.endpoint,
                                     name=pulled_name, progress=progress)
        hub_row = {"repo": repo, "commit": pushed["commit_sha"][:12], "files": len(pushed["files"])}
    else:
        hub_row = {"repo": pulled.source, "status": "reused"}
    same = _weights(pulled) == _weights(loras[CONVERT_TASK])
    yield "push to a local hub and pull back", [
        {"pushed": loras[CONVERT_TASK].name, **hub_row, "pulled_as": pulled.name, "weights_bit_identical": same}]

    # 5. convert the pulled LoRA to the variant (inherit + recover + distill)
    conv, conv_report = _reuse_or(reg, f"demo-{short}-{CONVERT_TASK}-on-{variant.name}", lambda: convert_adapter(
        reg, pulled.name, variant.name, data=f"builtin:task/{CONVERT_TASK}", steps=z.convert_steps, lr=z.lr,
        batch_size=z.batch_size, seq_len=z.seq_len, max_eval_examples=z.eval_examples,
        max_eval_tokens=z.eval_tokens, name=f"demo-{short}-{CONVERT_TASK}-on-{variant.name}", progress=progress))
    if conv_report:
        yield f"convert {pulled.name} to {variant.name} (CA-LoRA, {z.convert_steps} steps)", [
            {"row": r["row"], "exact_match": _fmt(r.get("exact_match")), "completion_ppl": _fmt(r.get("completion_ppl"), 3),
             "loaded_MB": _fmt(r["loaded_bytes"] / 1e6, 2) if r.get("loaded_bytes") else None}
            for r in conv_report["rows"]]
    else:
        yield "convert", [{"artifact": conv.name, "status": "reused"}]

    # 6. pack the converted adapter
    pack, pack_report = _reuse_or(reg, f"demo-{short}-{CONVERT_TASK}-pack", lambda: pack_artifact(
        reg, conv.name, density=PACK_DENSITY, name=f"demo-{short}-{CONVERT_TASK}-pack", progress=progress))
    packed_q = run_eval(reg, variant.name, f"builtin:task/{CONVERT_TASK}", "test", adapter=pack.name,
                        max_tokens=z.eval_tokens, max_examples=z.eval_examples, progress=progress)
    conv_row = next((r for r in (conv_report or {}).get("rows", []) if r["row"] == ROW_CONVERTED), None)
    conv_q = conv_row or run_eval(reg, variant.name, f"builtin:task/{CONVERT_TASK}", "test", adapter=conv.name,
                                  max_tokens=z.eval_tokens, max_examples=z.eval_examples, progress=progress)
    yield f"pack at k = {PACK_DENSITY:.0%} ({(pack.config or {}).get('method')}, no data)", [
        {"adapter": conv.name, "bytes": conv.size_bytes, "exact_match": _fmt(conv_q.get("exact_match")),
         "completion_ppl": _fmt(conv_q.get("completion_ppl"), 3), "vs_unpacked_size": 1.0},
        {"adapter": pack.name, "bytes": pack.size_bytes, "exact_match": _fmt(packed_q.get("exact_match")),
         "completion_ppl": _fmt(packed_q.get("completion_ppl"), 3),
         "vs_unpacked_size": _fmt(pack.size_bytes / conv.size_bytes, 4)}]

    # 7. merge two task LoRAs, compose on a third task
    pair = [loras[CONVERT_TASK].name, loras[MERGE_TASK].name]
    rows = []
    for method in ("task_arithmetic", "ties"):
        merged, _ = _reuse_or(reg, f"demo-{short}-merge-{method}", lambda method=method: merge_artifacts(
            reg, pair, method=method, density=0.5 if method == "ties" else None,
            name=f"demo-{short}-merge-{method}", progress=progress))
        row = {"adapter": merged.name, "method": method}
        for task in (CONVERT_TASK, MERGE_TASK):
            q = run_eval(reg, b.name, f"builtin:task/{task}", "test", adapter=merged.name,
                         max_tokens=z.eval_tokens, max_examples=z.eval_examples, progress=progress)
            row[f"{task}_em"] = _fmt(q.get("exact_match"))
        rows.append(row)
    yield f"merge {pair[0]} + {pair[1]}", rows
    composed, comp_report = _reuse_or(reg, f"demo-{short}-compose-{COMPOSE_TASK}", lambda: compose_artifacts(
        reg, [loras[t].name for t in (CONVERT_TASK, MERGE_TASK, COMPOSE_TASK)],
        examples=f"builtin:task/{COMPOSE_TASK}", shots=z.compose_shots, budget=z.compose_budget,
        name=f"demo-{short}-compose-{COMPOSE_TASK}", progress=progress))
    weights = (composed.config or {}).get("weights")
    comp_q = run_eval(reg, b.name, f"builtin:task/{COMPOSE_TASK}", "test", adapter=composed.name,
                      max_tokens=z.eval_tokens, max_examples=z.eval_examples, progress=progress)
    yield f"compose on {z.compose_shots} examples of {COMPOSE_TASK} (LoraHub, {z.compose_budget} steps)", [
        {"composed": composed.name, "weights": ", ".join(f"{w:.2f}" for w in weights) if weights else None,
         "loss": _fmt((composed.metrics or {}).get("loss")), "exact_match": _fmt(comp_q.get("exact_match"))}]

    # 8. a soft prompt on the variant
    prompt, prompt_report = _reuse_or(reg, f"demo-{short}-prompt", lambda: learn_prompt_artifact(
        reg, variant.name, data=DEMO_DATA, tokens=z.prompt_tokens, steps=z.prompt_steps, batch_size=2,
        seq_len=z.seq_len * 2, eval_tokens=z.eval_tokens, name=f"demo-{short}-prompt", progress=progress))
    if prompt_report:
        before, after = prompt_report["perplexity_before"], prompt_report["perplexity_after"]
    else:
        before = var_ppl
        after = run_eval(reg, variant.name, DEMO_DATA, "test", prompt=prompt.name, max_tokens=z.eval_tokens,
                         progress=progress)["perplexity"]
    yield f"soft prompt ({z.prompt_tokens} tokens, {z.prompt_steps} steps) on {variant.name}", [
        {"model": b.name, "perplexity": _fmt(base_ppl, 2)},
        {"model": variant.name, "perplexity": _fmt(before, 2)},
        {"model": f"{variant.name} + {prompt.name}", "perplexity": _fmt(after, 2)}]

    # 9. serve the variant and every adapter made on it behind the OpenAI API, one request each
    task_prompt = load_dataset(f"builtin:task/{CONVERT_TASK}", "test").pairs[0][0]
    served = [conv.name, pack.name, prompt.name, f"{conv.name}+{prompt.name}"]
    prompts = {name: task_prompt for name in served[:2]}
    rows = demo_round(reg, variant.name, served, prompts={**prompts, **{n: "Python lists are" for n in served[2:]}},
                      max_tokens=16)
    yield f"adapt serve {variant.name}: one request per adapter (OpenAI API on loopback)", [
        {"model": r["model"], "kind": r["kind"], "answer": r["answer"].strip()[:40],
         "first_switch_ms": _fmt(r["first_switch_ms"], 3), "resident_switch_ms": _fmt(r["resident_switch_ms"], 3)}
        for r in rows]
