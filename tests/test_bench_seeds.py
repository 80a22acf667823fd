"""The verdicts the issue-25 benchmark tables print (soft_prompt.py --set fig3, ca_lora.py --seeds)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(label, without, with_prompt, base):
    sp = _load("soft_prompt")
    return {"label": label, "pydoc_without": without, "pydoc_with": with_prompt,
            "pydoc_gap_closed": sp.gap_closed(base, without, with_prompt) if with_prompt else None}


def test_soft_prompt_checks_judge_the_claim_rows_and_the_equal_budget_pairs():
    sp = _load("soft_prompt")
    results = [_row("base", 20.0, None, 20.0),
               _row("gptq 3-bit", 40.0, 28.0, 20.0),        # closes 60 %
               _row("sparsegpt 62.5%", 60.0, 44.0, 20.0),   # closes 40 %
               _row("sparsegpt 50%", 30.0, 25.0, 20.0),
               _row("wanda 50%", 33.0, 24.0, 20.0),
               _row("gptq 4-bit", 19.0, 18.0, 20.0)]        # no gap: not judged as a share
    text = sp.checks_md(results)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert "60% | holds" in lines["gptq 3-bit: prompt closes >= 50% of the gap"]
    assert "40% | short by 10% of the gap" in lines["sparsegpt 62.5%: prompt closes >= 50% of the gap"]
    assert "sparsegpt 50% loses less" in lines["sparsegpt 50% vs wanda 50%, without a prompt"]
    assert "wanda 50% loses less" in lines["sparsegpt 50% vs wanda 50%, with its prompt"]
    assert not any("nf4" in key for key in lines)   # a pair with a variant not in the run is left out
    assert sp.gap_closed(20.0, 19.0, 18.0) is None


def test_ca_lora_seeds_gap_is_measured_from_the_as_is_row_to_the_ceiling():
    ca = _load("ca_lora")
    calora = ca.S_CALORA.format(n=5)

    def rows(a, b, c):
        return [{"row": ca.S_CEIL, "em": a, "nll": 0.1}, {"row": ca.S_NAIVE, "em": b, "nll": 2.0},
                {"row": calora, "em": c, "nll": 0.5}]

    assert math.isclose(ca.seeds_gap(rows(0.9, 0.1, 0.7), calora, "em"), 0.75)
    assert math.isclose(ca.seeds_gap(rows(0.9, 0.1, 0.7), calora, "nll"), 1.5 / 1.9)
    assert ca.seeds_gap(rows(0.5, 0.5, 0.7), calora, "em") is None
    assert ca.seeds_gap(rows(0.9, 0.1, 0.0), calora, "em") < 0
