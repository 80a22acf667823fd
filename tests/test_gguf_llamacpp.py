"""The real client: llama.cpp (through llama-cpp-python) loads the GGUF models and LoRAs we write.

The client runs in a subprocess that imports llama_cpp and numpy only (never adapterhub_c),
evaluates a fixed token sequence with ``logits_all=True`` and greedily extends it; we compare
with our own logits for the same weights and adapter (transformers + PEFT).

Tolerances, as max |ours − llama.cpp| over the sequence's logits divided by max |ours|:
- f32 weights and LoRA: 1e-4. Both sides compute in float32; what differs is the
  order of summation (ggml's SIMD dot products, its softmax and RoPE tables).
- quantized weights (Q8_0, Q4_0, Q4_K_M): we run the dequantized Ŵ of the same file, so weight
  rounding is not in the difference; but ggml's CPU matmul for a quantized weight first
  quantizes the activations to 8 bits per 32-block (Q8_0, or Q8_K for k-quants); the KV cache
  is float32 in every run (llama.cpp's default f16 would add its own rounding). On these random tiny models (weights std 0.08, logits up
  to ~5) that moves the logits by 2-5% of their largest value, as much as Q8_0 weight rounding
  itself does (4%); allowed: 6e-2. For Q8_0 the test shows the cause: rounding our linears'
  inputs as ggml's quantize_row_q8_0 does cuts the gap at least in half.
Greedy continuations agree token for token for 6 steps in every case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguftiny import smol_tokenizer, tiny_gguf_model

from adapterhub_c.formats.gguf_lora import write_gguf_lora
from adapterhub_c.formats.gguf_write import quantize_gguf, write_gguf_model
from adapterhub_c.models.gguf_tensors import read_gguf_state

pytest.importorskip("llama_cpp")

PROMPT = "Reverse the words: blue sky today\nAnswer:"
STEPS = 6
F32_TOL, QUANT_TOL = 1e-4, 6e-2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp
    args = json.loads(sys.argv[1])
    assert "adapterhub_c" not in sys.modules
    kw = dict(type_k=0, type_v=0) if args["f32_cache"] else {}
    llm = llama_cpp.Llama(args["model"], lora_path=args["lora"], n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2, seed=0, **kw)
    tokens = args["tokens"]
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    greedy = []
    for _ in range(args["steps"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(nxt)
        llm.eval([nxt])
    np.save(args["out"], logits)
    print(json.dumps({"greedy": greedy, "modules": sorted(k for k in sys.modules if k.startswith("adapterhub"))}))
""")


def llama_cpp_run(model: Path, lora: Path | None, tokens: list[int], out: Path, f32_cache: bool) -> tuple[np.ndarray, list[int]]:
    """(logits [n, vocab], greedy continuation) from llama.cpp in a fresh process."""
    args = dict(model=str(model), lora=str(lora) if lora else None, tokens=tokens, steps=STEPS, out=str(out),
                f32_cache=f32_cache)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    return np.load(out), result["greedy"]


def ours(model, tokens: list[int]) -> tuple[np.ndarray, list[int]]:
    """(logits, greedy continuation) of a transformers (or PEFT) model, float32 on CPU."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
        greedy = []
        for _ in range(STEPS):
            nxt = int(model(ids).logits[0, -1].argmax())
            greedy.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return logits, greedy


def ggml_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ggml's quantize_row_q8_0 leaves it: per 32-block, round(x / d) half away from zero with
    d = max|x| / 127 in float32, multiplied back by d stored as f16."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.sign(blocks) * torch.floor(blocks.abs() / torch.where(d > 0, d, torch.ones_like(d)) + 0.5)
    return (q * d.to(torch.float16).to(torch.float32)).reshape(x.shape)


def make_lora(model, dest: Path, seed: int, **extra) -> Path:
    """A PEFT LoRA on every linear of ``model`` with random (non-zero) B, saved to ``dest``."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG state untouched
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **extra))
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    peft.save_pretrained(dest)
    peft.unload()
    return dest


def model_from(template, state: dict[str, torch.Tensor]):
    """A copy of ``template``'s architecture holding ``state`` (Ŵ read back from a GGUF)."""
    import copy

    model = copy.deepcopy(template)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    tok = smol_tokenizer(root / "tok")
    return {"root": root, "tok": root / "tok", "tokenizer": tok, "tokens": tok(PROMPT).input_ids}


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


CASES = [("llama", False, "F32"), ("qwen2", True, "F32"), ("llama", False, "F32-rslora"), ("llama", False, "Q8_0"), ("qwen2", True, "Q8_0"),
         ("llama", False, "Q4_0"), ("qwen2", True, "Q4_K_M")]


@pytest.mark.parametrize("kind,tie,qtype", CASES)
def test_llama_cpp_logits_and_greedy_text_match_ours(world, kind, tie, qtype):
    from peft import PeftModel

    root = world["root"] / f"{kind}-{qtype}"
    root.mkdir()
    model = tiny_gguf_model(kind, world["tokenizer"], tie=tie)
    f32 = write_gguf_model(model.state_dict(), model.config, world["tok"], root / "base.f32.gguf", ftype="f32")
    extra = dict(use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 4}) if "rslora" in qtype else {}
    lora_dir = make_lora(model, root / "lora", seed=11, **extra)
    lora = write_gguf_lora(lora_dir, model.config, root / "lora.gguf")
    assert len(lora.modules) == 2 * len(TARGETS)
    # rsLoRA's alpha/sqrt(r) and the patterns have no GGUF field: folded into B, and said so
    assert bool(lora.folded) == bool(extra) and bool(lora.notes) == bool(extra)
    qtype = qtype.split("-")[0]
    gguf_model = f32
    if qtype != "F32":
        report = quantize_gguf(f32, root / f"base.{qtype}.gguf", qtype)
        assert report.tensor_types["blk.0.ffn_up.weight"].startswith(qtype.split("_K")[0])
        gguf_model = report.path
    # our side: the Ŵ read back from the very file llama.cpp loads, plus the PEFT LoRA
    hat = model_from(model, read_gguf_state(gguf_model, model.config))
    peft = PeftModel.from_pretrained(hat, lora_dir).eval()
    want, want_greedy = ours(peft, world["tokens"])
    got, got_greedy = llama_cpp_run(gguf_model, lora.path, world["tokens"], root / "logits.npy",
                                     f32_cache=True)
    tol = F32_TOL if qtype == "F32" else QUANT_TOL
    gap = relative_gap(want, got)
    assert gap <= tol, (qtype, gap)
    assert got_greedy == want_greedy
    if qtype == "Q8_0":
        hooks = [m.register_forward_pre_hook(lambda _m, a: (ggml_q8_0(a[0]),)) for n, m in peft.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n]
        like_ggml, _ = ours(peft, world["tokens"])
        for h in hooks:
            h.remove()
        assert relative_gap(like_ggml, got) < gap / 2, (relative_gap(like_ggml, got), gap)
    # the LoRA matters: without it llama.cpp's logits are those of the base alone, far from ours
    base_logits, _ = llama_cpp_run(gguf_model, None, world["tokens"], root / "base.npy", f32_cache=True)
    assert relative_gap(want, base_logits) > 5 * tol
