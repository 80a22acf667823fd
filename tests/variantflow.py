"""The flow every variant kind must carry (issue 25, acceptance 2), shared by its tests.

A source LoRA trained on the tiny base; then on the variant: convert with inherit + recover +
distill and with ``--recover lowrank`` (zero data) → pack → serve one OpenAI-shaped completion
with each of the three. And the tiny Llama trained on builtin:pydoc, on which compressors are compared.
"""
from __future__ import annotations

import json
import urllib.request

TASK = "builtin:task/reverse-words"
FAST = dict(steps=2, lr=3e-3, batch_size=2, seq_len=48, max_eval_tokens=200, max_eval_examples=2)
TOKEN = "t0ken-variant-flow"
BASE = "builtin:tiny-llama"


def train_source(reg, name: str = "src"):
    """A quick LoRA of the tiny base on attention and MLP linears: what the variants convert."""
    from adapterhub_c.workflows.training import train_adapter

    art, _ = train_adapter(reg, BASE, TASK, rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"],
                           name=name, baseline=False, **FAST)
    return art


def complete(server, model: str, token: str = TOKEN) -> str:
    """One greedy completion through the server's HTTP API; the answer names the model and ends properly."""
    body = json.dumps({"model": model, "prompt": "Reverse the words: a b\nAnswer:", "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{server.base_url}/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    choice = out["choices"][0]
    assert out["model"] == model and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("length", "stop") and out["usage"]["completion_tokens"] <= 4
    return choice["text"]


def convert_pack_serve(reg, variant: str, source: str = "src"):
    """``source`` carried to ``variant`` both ways, packed, and served; returns (converted, lowrank) rows."""
    from adapterhub_c.serve.server import BackgroundServer, ServeOptions
    from adapterhub_c.workflows.packs import pack_artifact
    from adapterhub_c.workflows.training import convert_adapter

    conv, report = convert_adapter(reg, source, variant, data=TASK, recover_rank=2, name=f"conv-{variant}",
                                   reference_rows=False, **FAST)
    assert report["recover"] and report["distill"] and report["inherit"]
    low, low_report = convert_adapter(reg, source, variant, recover="lowrank", recover_rank=2, calib_samples=2,
                                      calib_seq_len=32, name=f"low-{variant}", reference_rows=False,
                                      max_eval_tokens=100, max_eval_examples=1)
    assert low_report["recover_method"] == "lowrank" and low.kind == "lora"
    pack_artifact(reg, conv.name, density=0.5, alpha=1.0, name=f"pack-{variant}")
    with BackgroundServer(reg, variant, ServeOptions(all=True, token=TOKEN)) as server:
        for model_name in (conv.name, low.name, f"pack-{variant}"):
            complete(server, model_name)
    return conv, low


def trained_tiny_llama(steps: int):
    """The tiny Llama trained ``steps`` steps on builtin:pydoc train (seeded), so that what a compressor
    loses shows in its perplexity (a random model's perplexity is the vocabulary size whatever its weights)."""
    import torch

    from adapterhub_c.evals.data import load_dataset
    from adapterhub_c.evals.metrics import token_stream
    from adapterhub_c.models.tiny import build_tiny
    from adapterhub_c.options.corpus import DEFAULT_CORPUS

    torch.manual_seed(0)
    model, tok = build_tiny("llama")
    batch, seq = 8, 64
    ids = token_stream(tok, load_dataset(DEFAULT_CORPUS, "train").as_texts(), steps * batch * seq)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for x in ids[: steps * batch * seq].view(steps, batch, seq):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok
