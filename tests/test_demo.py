"""`adapt demo` on the tiny base: every step runs, registers its artefacts, and a re-run reuses them."""
from __future__ import annotations

from collections import Counter

SECTIONS = ("base", "perplexity on builtin:pydoc test", "task LoRAs on builtin:tiny-llama",
            "push to a local hub and pull back", "to tiny-llama-nf4-wanda50 (CA-LoRA", "pack at k = 10% (delta-fit, no data)",
            "merge demo-tiny-llama-uppercase + demo-tiny-llama-reverse-words", "compose on 3 examples of sort-numbers",
            "soft prompt (4 tokens, 2 steps) on tiny-llama-nf4-wanda50",
            "adapt serve tiny-llama-nf4-wanda50: one request per adapter")


def _kinds(cli) -> Counter:
    return Counter(a["kind"] for a in cli("ls", "artifacts", "--json").json())


def _weights(art) -> dict[str, str]:
    return {f: d for f, d in art.files.items() if f.endswith(".safetensors")}


def test_demo_runs_every_step_and_reruns_by_reusing(cli, reg):
    r = cli("demo", "--base", "builtin:tiny-llama", "--max-tokens", "200")
    assert r.code == 0, r.err
    flat = " ".join(r.out.split())
    for title in SECTIONS:
        assert title in flat, title
    assert "True" in flat  # the pulled weights are bit-identical to the pushed ones
    # ...said in the push/pull table itself (its one boolean, weights_bit_identical), and true in the registry
    hub_table = flat[flat.index(SECTIONS[3]):flat.index(SECTIONS[4])]
    assert "True" in hub_table and "False" not in hub_table, hub_table
    pushed = reg.get("demo-tiny-llama-uppercase", "artifact")
    pulled = reg.get("demo-tiny-llama-uppercase-pulled", "artifact")
    assert pulled.source.startswith("demo/tiny-llama-uppercase-lora@")
    assert _weights(pushed) and _weights(pulled) == _weights(pushed)
    serve_table = flat[flat.index(SECTIONS[-1]):]
    for kind in ("recovered-lora", "pack", "prompt", "recovered-lora+prompt"):
        assert f" {kind} " in serve_table, (kind, serve_table)
    kinds = _kinds(cli)
    assert kinds == Counter({"lora": 4, "recovered-lora": 1, "pack": 1, "merged": 2, "composed": 1, "prompt": 1})
    assert [v["name"] for v in cli("variant", "ls", "--json").json()] == ["tiny-llama-nf4-wanda50"]
    lineage = cli("lineage", "demo-tiny-llama-uppercase-pack", "--json").json()
    assert "demo-tiny-llama-uppercase-on-tiny-llama-nf4-wanda50" in str(lineage)

    again = cli("demo", "--base", "builtin:tiny-llama", "--max-tokens", "200")
    assert again.code == 0, again.err
    assert "reused" in again.out
    assert _kinds(cli) == kinds  # nothing made twice
