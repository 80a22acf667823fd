"""Smoke test on the real SmolLM2-135M-Instruct base (stored as its GGUF, dequantized at load)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.smoke


def test_smollm2_registers_once_and_has_sane_perplexity(cli, reg):
    r = cli("base", "add", "builtin:smollm2-135m")
    assert r.code == 0, r.err
    assert cli("base", "add", "builtin:smollm2-135m").code == 0
    bases = cli("ls", "bases", "--json").json()
    assert len(bases) == 1 and bases[0]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 130e6 < bases[0]["params"] < 140e6
    # stored as the Q4_1 GGUF file itself (+ tokenizer), dequantized to float32 at load (models/builtin.py)
    fp16 = 2 * bases[0]["params"]
    assert 0.3 * fp16 < bases[0]["size_bytes"] < 0.4 * fp16  # 98 MB of GGUF + 3.5 MB of tokenizer
    assert reg.get("builtin:smollm2-135m", "base").loaded_bytes == 4 * bases[0]["params"]  # float32 when loaded
    r = cli("eval", "HuggingFaceTB/SmolLM2-135M-Instruct", "--data", "builtin:pydoc", "--max-tokens", "1024", "--json")
    assert r.code == 0, r.err
    assert 5 < r.json()["perplexity"] < 40
    r = cli("generate", "builtin:smollm2-135m", "What is the capital of France?", "--chat", "--max-new-tokens", "12")
    assert r.code == 0 and r.out.strip()
