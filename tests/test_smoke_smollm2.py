"""Smoke test on the real SmolLM2-135M-Instruct base (converted once from the GGUF)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.smoke


def test_smollm2_registers_once_and_has_sane_perplexity(cli):
    r = cli("base", "add", "builtin:smollm2-135m")
    assert r.code == 0, r.err
    assert cli("base", "add", "builtin:smollm2-135m").code == 0
    bases = cli("ls", "bases", "--json").json()
    assert len(bases) == 1 and bases[0]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 130e6 < bases[0]["params"] < 140e6
    # stored in float32, the only standard dtype that holds the GGUF's values exactly (models/builtin.py)
    assert 3.9 * bases[0]["params"] < bases[0]["size_bytes"] < 4.1 * bases[0]["params"]
    r = cli("eval", "HuggingFaceTB/SmolLM2-135M-Instruct", "--data", "builtin:pydoc", "--max-tokens", "1024", "--json")
    assert r.code == 0, r.err
    assert 5 < r.json()["perplexity"] < 40
    r = cli("generate", "builtin:smollm2-135m", "What is the capital of France?", "--chat", "--max-new-tokens", "12")
    assert r.code == 0 and r.out.strip()
