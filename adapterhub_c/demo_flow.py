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
from adapterhub_c.registry.models import Artifact, BaseModel
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


class _Demo:
    """What the demo's sections share: the registry, its sizes, the base and what earlier sections made."""

    def __init__(self, reg: Registry, base: BaseModel, z: DemoSizes, progress):
        self.reg, self.base, self.z, self.progress = reg, base, z, progress
        self.short = base.name.replace("builtin:", "")
        self.loras: dict[str, Artifact] = {}

    def name(self, suffix: str) -> str:
        return f"demo-{self.short}-{suffix}"

    def eval(self, target: str, data: str, **stack) -> dict:
        """``target`` (+ ``variant`` / ``adapter`` / ``prompt``) measured on ``data`` test at the demo's budget."""
        z = self.z
        examples = {} if data == DEMO_DATA else {"max_examples": z.eval_examples}
        return run_eval(self.reg, target, data, "test", max_tokens=z.eval_tokens, progress=self.progress,
                        **examples, **stack)


def run_demo(reg: Registry, base: str = SMOLLM2, max_tokens: int | None = None,
             progress=None) -> Iterator[tuple[str, list[dict]]]:
    """Run the demo flow on ``base``; yields (section title, table rows)."""
    b, created = add_builtin_base(reg, base, progress=progress)
    d = _Demo(reg, b, demo_sizes(base, max_tokens), progress)
    yield "base", [{"base": b.name, "params": b.params, "registered": "now" if created else "already"}]
    for section in (_variant_section, _lora_section, _hub_section, _convert_section, _pack_section,
                    _merge_section, _compose_section, _prompt_section, _serve_section):
        yield from section(d)


def _variant_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """1-2. base and variant perplexity, and the variant's sizes against the fp16 base."""
    b, z = d.base, d.z
    d.base_ppl = d.eval(b.name, DEMO_DATA)["perplexity"]
    d.variant, _made = create_variant(d.reg, b, quant="nf4", prune="wanda", sparsity=0.5, calib=DEMO_DATA,
                                      calib_samples=z.calib_samples, eval_tokens=0, progress=d.progress)
    d.var_ppl = d.eval(d.variant.name, DEMO_DATA)["perplexity"]
    vs = variant_summary(d.variant, b)
    fp16 = vs["base_fp16_bytes"]
    yield f"perplexity on {DEMO_DATA} test (first {z.eval_tokens} tokens); sizes against the fp16 base", [
        {"model": b.name, "perplexity": _fmt(d.base_ppl, 2), "stored_MB": _fmt(b.stored_bytes / 1e6, 1),
         "stored_vs_fp16": _fmt(b.stored_bytes / fp16, 3) if fp16 else None,
         "loaded_MB": _fmt(b.loaded_bytes / 1e6, 1) if b.loaded_bytes else None, "export_MB": None,
         "vs_base": 1.0},
        {"model": d.variant.name, "perplexity": _fmt(d.var_ppl, 2), "stored_MB": _fmt(vs["stored_bytes"] / 1e6, 1),
         "stored_vs_fp16": _fmt(vs["stored_ratio"], 3), "loaded_MB": _fmt(vs["loaded_bytes"] / 1e6, 1),
         "export_MB": _fmt(vs["export_bytes"] / 1e6, 1) if vs["export_bytes"] else None,
         "vs_base": _fmt(d.var_ppl / d.base_ppl)}]


def _lora_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """3. task LoRAs on the base (no "before" evaluation: the base scores 0 exact match on every built-in task)."""
    z = d.z
    train = dict(steps=z.lora_steps, lr=z.lr, batch_size=z.batch_size, seq_len=z.seq_len, rank=8, alpha=16,
                 max_eval_examples=z.eval_examples, max_eval_tokens=z.eval_tokens, baseline=False,
                 progress=d.progress)
    rows = []
    for task in (CONVERT_TASK, MERGE_TASK, COMPOSE_TASK):
        data = f"builtin:task/{task}"
        art, report = _reuse_or(d.reg, d.name(task),
                                lambda data=data, task=task: train_adapter(d.reg, d.base.name, data,
                                                                           name=d.name(task), **train))
        d.loras[task] = art
        after = (report or {}).get("after") or {}
        rows.append({"lora": art.name, "task": task, "exact_match": _fmt(after.get("exact_match")),
                     "train_s": _fmt(((report or {}).get("train") or {}).get("wall_s"), 1),
                     "status": "trained" if report else "reused"})
    yield f"task LoRAs on {d.base.name} ({z.lora_steps} steps each)", rows


def _hub_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """4. push to a local hub and pull back, as a community LoRA."""
    from adapterhub_c.hubserver.server import BackgroundServer

    source = d.loras[CONVERT_TASK]
    d.pulled = _existing_artifact(d.reg, d.name(f"{CONVERT_TASK}-pulled"))
    if d.pulled is None:
        repo = f"demo/{d.short}-{CONVERT_TASK}-lora"
        with tempfile.TemporaryDirectory(prefix="adapt-demo-hub-") as hub_root, \
                BackgroundServer(hub_root) as server, _private_hub_cache():
            pushed = push_artifact(d.reg, source.name, repo, endpoint=server.endpoint, progress=d.progress)
            d.pulled, _ = pull_adapter(d.reg, f"{repo}@{pushed['commit_sha']}", endpoint=server.endpoint,
                                       name=d.name(f"{CONVERT_TASK}-pulled"), progress=d.progress)
        hub_row = {"repo": repo, "commit": pushed["commit_sha"][:12], "files": len(pushed["files"])}
    else:
        hub_row = {"repo": d.pulled.source, "status": "reused"}
    yield "push to a local hub and pull back", [
        {"pushed": source.name, **hub_row, "pulled_as": d.pulled.name,
         "weights_bit_identical": _weights(d.pulled) == _weights(source)}]


def _convert_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """5. convert the pulled LoRA to the variant (inherit + recover + distill)."""
    z, name = d.z, d.name(f"{CONVERT_TASK}-on-{d.variant.name}")
    d.conv, d.conv_report = _reuse_or(d.reg, name, lambda: convert_adapter(
        d.reg, d.pulled.name, d.variant.name, data=f"builtin:task/{CONVERT_TASK}", steps=z.convert_steps, lr=z.lr,
        batch_size=z.batch_size, seq_len=z.seq_len, max_eval_examples=z.eval_examples,
        max_eval_tokens=z.eval_tokens, name=name, progress=d.progress))
    if not d.conv_report:
        yield "convert", [{"artifact": d.conv.name, "status": "reused"}]
        return
    yield f"convert {d.pulled.name} to {d.variant.name} (CA-LoRA, {z.convert_steps} steps)", [
        {"row": r["row"], "exact_match": _fmt(r.get("exact_match")), "completion_ppl": _fmt(r.get("completion_ppl"), 3),
         "loaded_MB": _fmt(r["loaded_bytes"] / 1e6, 2) if r.get("loaded_bytes") else None}
        for r in d.conv_report["rows"]]


def _pack_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """6. pack the converted adapter, measured against it."""
    conv, task = d.conv, f"builtin:task/{CONVERT_TASK}"
    d.pack, _report = _reuse_or(d.reg, d.name(f"{CONVERT_TASK}-pack"), lambda: pack_artifact(
        d.reg, conv.name, density=PACK_DENSITY, name=d.name(f"{CONVERT_TASK}-pack"), progress=d.progress))
    packed_q = d.eval(d.variant.name, task, adapter=d.pack.name)
    conv_row = next((r for r in (d.conv_report or {}).get("rows", []) if r["row"] == ROW_CONVERTED), None)
    conv_q = conv_row or d.eval(d.variant.name, task, adapter=conv.name)
    yield f"pack at k = {PACK_DENSITY:.0%} ({(d.pack.config or {}).get('method')}, no data)", [
        {"adapter": conv.name, "bytes": conv.stored_bytes, "exact_match": _fmt(conv_q.get("exact_match")),
         "completion_ppl": _fmt(conv_q.get("completion_ppl"), 3), "vs_unpacked_size": 1.0},
        {"adapter": d.pack.name, "bytes": d.pack.stored_bytes, "exact_match": _fmt(packed_q.get("exact_match")),
         "completion_ppl": _fmt(packed_q.get("completion_ppl"), 3),
         "vs_unpacked_size": _fmt(d.pack.stored_bytes / conv.stored_bytes, 4)}]


def _merge_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """7a. merge two task LoRAs, each merge measured on both tasks."""
    pair = [d.loras[CONVERT_TASK].name, d.loras[MERGE_TASK].name]
    rows = []
    for method in ("task_arithmetic", "ties"):
        merged, _ = _reuse_or(d.reg, d.name(f"merge-{method}"), lambda method=method: merge_artifacts(
            d.reg, pair, method=method, density=0.5 if method == "ties" else None,
            name=d.name(f"merge-{method}"), progress=d.progress))
        row = {"adapter": merged.name, "method": method}
        for task in (CONVERT_TASK, MERGE_TASK):
            row[f"{task}_em"] = _fmt(d.eval(d.base.name, f"builtin:task/{task}", adapter=merged.name)
                                     .get("exact_match"))
        rows.append(row)
    yield f"merge {pair[0]} + {pair[1]}", rows


def _compose_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """7b. LoraHub composition of the three LoRAs on a few examples of the third task."""
    z = d.z
    composed, _report = _reuse_or(d.reg, d.name(f"compose-{COMPOSE_TASK}"), lambda: compose_artifacts(
        d.reg, [d.loras[t].name for t in (CONVERT_TASK, MERGE_TASK, COMPOSE_TASK)],
        examples=f"builtin:task/{COMPOSE_TASK}", shots=z.compose_shots, budget=z.compose_budget,
        name=d.name(f"compose-{COMPOSE_TASK}"), progress=d.progress))
    weights = (composed.config or {}).get("weights")
    comp_q = d.eval(d.base.name, f"builtin:task/{COMPOSE_TASK}", adapter=composed.name)
    yield f"compose on {z.compose_shots} examples of {COMPOSE_TASK} (LoraHub, {z.compose_budget} steps)", [
        {"composed": composed.name, "weights": ", ".join(f"{w:.2f}" for w in weights) if weights else None,
         "loss": _fmt((composed.metrics or {}).get("loss")), "exact_match": _fmt(comp_q.get("exact_match"))}]


def _prompt_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """8. a soft prompt on the variant."""
    z = d.z
    d.prompt, report = _reuse_or(d.reg, d.name("prompt"), lambda: learn_prompt_artifact(
        d.reg, d.variant.name, data=DEMO_DATA, tokens=z.prompt_tokens, steps=z.prompt_steps, batch_size=2,
        seq_len=z.seq_len * 2, eval_tokens=z.eval_tokens, name=d.name("prompt"), progress=d.progress))
    if report:
        before, after = report["perplexity_before"], report["perplexity_after"]
    else:
        before, after = d.var_ppl, d.eval(d.variant.name, DEMO_DATA, prompt=d.prompt.name)["perplexity"]
    yield f"soft prompt ({z.prompt_tokens} tokens, {z.prompt_steps} steps) on {d.variant.name}", [
        {"model": d.base.name, "perplexity": _fmt(d.base_ppl, 2)},
        {"model": d.variant.name, "perplexity": _fmt(before, 2)},
        {"model": f"{d.variant.name} + {d.prompt.name}", "perplexity": _fmt(after, 2)}]


def _serve_section(d: _Demo) -> Iterator[tuple[str, list[dict]]]:
    """9. serve the variant and every adapter made on it behind the OpenAI API, one request each."""
    task_prompt = load_dataset(f"builtin:task/{CONVERT_TASK}", "test").pairs[0][0]
    served = [d.conv.name, d.pack.name, d.prompt.name, f"{d.conv.name}+{d.prompt.name}"]
    prompts = {name: task_prompt for name in served[:2]}
    rows = demo_round(d.reg, d.variant.name, served,
                      prompts={**prompts, **{n: "Python lists are" for n in served[2:]}}, max_tokens=16)
    yield f"adapt serve {d.variant.name}: one request per adapter (OpenAI API on loopback)", [
        {"model": r["model"], "kind": r["kind"], "answer": r["answer"].strip()[:40],
         "first_switch_ms": _fmt(r["first_switch_ms"], 3), "resident_switch_ms": _fmt(r["resident_switch_ms"], 3)}
        for r in rows]
