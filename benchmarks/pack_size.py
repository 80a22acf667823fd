"""Pack sizes against the entropy bound and against the fp16 safetensors file.

Usage: python benchmarks/pack_size.py [LORA_FOLDER] [--encoding golomb|bitmask] [--scope global|tensor]

Without a folder: a seeded random LoRA with SmolLM2-135M shapes (hidden 576, 30 layers,
q/k/v/o, r=16, 3 KV heads of 64 → k/v out 192). Factors are Gaussian: A with std
1/sqrt(in) (the scale of a kaiming init), B with std 0.02 (a trained B, grown from zero).
For each density k: pack file bytes, payload bits per parameter, the entropy bound
(Σ numel·H(k_t) over tensors, at each tensor's own density), payload / bound, and the
fp16 safetensors size / pack file size, both measured in this run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterhub_c.adapters.lora import LoraAdapter  # noqa: E402
from adapterhub_c.pack import inspect_pack, pack_adapter, tensors_digest, write_pack  # noqa: E402

DENSITIES = [0.05, 0.10, 0.20, 0.30, 0.50]


def smollm2_like_lora(seed: int = 0) -> LoraAdapter:
    """A random LoRA with the tensor shapes of SmolLM2-135M q/k/v/o at r=16."""
    g = torch.Generator().manual_seed(seed)
    hidden, r, kv_out = 576, 16, 192
    tensors = {}
    for layer in range(30):
        for proj, out in (("q_proj", hidden), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", hidden)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=g) / hidden ** 0.5
            tensors[f"{key}.lora_B.weight"] = 0.02 * torch.randn(out, r, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 32, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    return LoraAdapter(config=config, tensors=tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--encoding", default="golomb", choices=["golomb", "bitmask"])
    ap.add_argument("--scope", default="global", choices=["global", "tensor"])
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args()
    adapter = LoraAdapter.from_folder(args.folder) if args.folder else smollm2_like_lora()
    fp16_bytes = len(st_save({k: v.to(torch.float16).contiguous() for k, v in adapter.tensors.items()}))
    n = adapter.num_parameters()
    print(f"adapter: {args.folder or 'random SmolLM2-135M-shaped LoRA r=16 q/k/v/o'}; {n:,} params; "
          f"fp16 safetensors {fp16_bytes:,} bytes; encoding {args.encoding}, scope {args.scope}")
    print(f"{'k':>5} {'file bytes':>11} {'bits/param':>10} {'bound':>8} {'x bound':>8} {'fp16/pack':>9}")
    digest = tensors_digest(adapter.tensors)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.pack")
        for k in DENSITIES:
            write_pack(pack_adapter(adapter, density=k, alpha=args.alpha, scope=args.scope,
                                    encoding=args.encoding, base="benchmark", source_digest=digest), path)
            t = inspect_pack(path)["totals"]
            print(f"{k:5.2f} {t['file_bytes']:11,d} {t['bits_per_param']:10.4f} {t['entropy_bits_per_param']:8.4f} "
                  f"{t['ratio_to_bound']:8.4f} {fp16_bytes / t['file_bytes']:9.1f}")


if __name__ == "__main__":
    main()
