"""adapt export --format compressed-tensors of GPTQ variants (issue 25): pack-quantized, what vLLM loads.

The folder is loaded back in a fresh interpreter where adapterhub_c cannot be imported, with plain
``AutoModelForCausalLM.from_pretrained(folder)`` on CPU, and its logits compared with our
``load_variant`` model's on a fixed input: within 1e-5 absolute (measured: 0.0, the same Ŵ in float32).
Asymmetric variants load only decompressed in transformers 5.25 + compressed-tensors 0.20.1
(``CompressedTensorsConfig(dequantize=True)``; see workflows/exports.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

IDS = [[5, 17, 99, 200, 3, 64, 128, 250, 7, 42, 11, 190]]
ATOL = 1e-5
CAL = ["--eval-tokens", "0", "--calib-samples", "4", "--calib-seq-len", "64"]

PLAIN_LOAD = textwrap.dedent("""
    import sys
    sys.modules["adapterhub_c"] = None  # importing it now raises ImportError
    import json, torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    folder, ids, out, dequantize = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits
    torch.save({"logits": logits, "dtype": str(model.dtype)}, out)
""")


def plain_load(folder: Path, tmp_path: Path, dequantize: bool = False) -> dict:
    out = tmp_path / f"plain-{folder.name}.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(IDS), str(out),
                        "1" if dequantize else "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


def _create(cli, *args: str) -> str:
    r = cli("variant", "create", "builtin:tiny-llama", "--quant", "gptq", *args, *CAL, "--json")
    assert r.code == 0, r.err
    return r.json()["name"]


@pytest.mark.parametrize("args, plain", [(["--bits", "4", "--sym"], True),
                                         (["--bits", "4", "--group-size", "32"], False)])
def test_gptq_export_loads_in_plain_transformers_with_the_variants_logits(cli, reg, tiny_base, tmp_path, args, plain):
    from safetensors import safe_open

    from adapterhub_c.runtime.variants import load_variant

    name = _create(cli, *args)
    out = tmp_path / "ct"
    r = cli("export", name, "--out", str(out), "--format", "compressed-tensors", "--json")
    assert r.code == 0, r.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["symmetric"] is plain and "lm_head" in qc["ignore"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight_packed" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    assert (out / "tokenizer_config.json").exists() or (out / "tokenizer.json").exists()
    got = plain_load(out, tmp_path, dequantize=not plain)
    with torch.no_grad():
        want = load_variant(reg, name)(torch.tensor(IDS)).logits
    diff = (got["logits"].float() - want).abs().max().item()
    assert diff <= ATOL, diff


def test_three_bit_gptq_is_refused_in_one_line(cli, tiny_base, tmp_path):
    name = _create(cli, "--bits", "3")
    r = cli("export", name, "--out", str(tmp_path / "ct"), "--format", "compressed-tensors")
    assert r.code == 2, (r.code, r.out, r.err)
    assert "3-bit" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "ct").exists()
