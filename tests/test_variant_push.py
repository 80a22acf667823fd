"""adapt push VARIANT org/repo: the hf export + a model card on the (local) Hub; plain transformers loads it."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from adapterhub_c.hub.cards import parse_front_matter
from adapterhub_c.workflows.variants import create_variant

sys.path.insert(0, str(Path(__file__).parent))
from test_export import adapt_logits, plain_load

warnings.filterwarnings("ignore", message="MatMul8bitLt")


def test_push_variant_then_snapshot_download_loads_in_plain_transformers(cli, reg, tiny_base, hf, tmp_path):
    from huggingface_hub import snapshot_download

    row, _ = create_variant(reg, tiny_base.name, quant="nf4", prune="wanda", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=384)
    repo = "org/tiny-nf4-wanda50"
    dry = cli("push", row.name, repo, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {f["path"] for f in dry.json()["files"]}
    assert not hf.store.exists(repo)
    r = cli("push", row.name, repo, "--token", hf.token, "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["uploaded"] and out["variant"] == row.name and len(out["commit_sha"]) == 40
    again = cli("push", row.name, repo, "--token", hf.token, "--json")  # same content: no new commit
    assert again.code == 0 and not again.json()["uploaded"], again.err
    assert reg.get(row.name, "variant").stats["pushes"][0]["commit_sha"] == out["commit_sha"]

    snap = Path(snapshot_download(repo, endpoint=hf.endpoint, token=hf.token, cache_dir=str(tmp_path / "dl")))
    card = (snap / "README.md").read_text()
    meta = parse_front_matter(card)
    assert meta["base_model"] == "builtin:tiny-llama" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and "adapterhub-c" in meta["tags"]
    assert '"prune": "wanda"' in card and "| stored |" in card and "| export |" in card
    assert f"{row.stats['perplexity']:.6g}" in card
    got = plain_load(snap, tmp_path)  # plain from_pretrained, adapterhub_c not importable
    assert got["layer"] == "Linear4bit" and torch.equal(got["logits"], adapt_logits(reg, row.name))
    info = json.loads((snap / "adapterhub_c.json").read_text())
    assert info["variant"] == row.name and info["recipe"]["quant"] == "nf4"


def test_push_pruned_only_variant_has_no_quantized_relation_and_pack_format_is_refused(cli, reg, tiny_base, hf,
                                                                                        tmp_path):
    from huggingface_hub import hf_hub_download

    row, _ = create_variant(reg, tiny_base.name, prune="magnitude", sparsity=0.5, eval_tokens=0)
    r = cli("push", row.name, "org/pruned", "--format", "pack")
    assert r.code == 2 and "variant" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = cli("push", row.name, "org/pruned", "--token", hf.token, "--json")
    assert r.code == 0, r.err
    card = Path(hf_hub_download("org/pruned", "README.md", endpoint=hf.endpoint, token=hf.token,
                                cache_dir=str(tmp_path / "dl"))).read_text()
    meta = parse_front_matter(card)
    assert meta["base_model"] == "builtin:tiny-llama" and "base_model_relation" not in meta
