"""The adapter maths is written once (adapters/), and every consumer calls that one copy.

- the recovery forward: ``adapters.recovery.recovery_forward``; the training module and the
  server's multi-adapter layer both call it, and give identical numbers;
- a low-rank scale (alpha / r, alpha / √r): ``adapters.lora.rank_scale``; LoRA's scale and a
  recovery module's scale both come from it, and no other module divides an alpha by a rank;
- the ffn-channels slicing: ``adapters.slicing``.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import adapterhub_c
from adapterhub_c.adapters import lora as lora_mod
from adapterhub_c.adapters import recovery as rec_mod
from adapterhub_c.adapters.lora import lora_scale, rank_scale
from adapterhub_c.adapters.recovery import Recovery, RecoveryConfig, recovery_forward
from adapterhub_c.serve import layers as serve_layers
from adapterhub_c.serve.layers import (
    AdapterWeights,
    BatchContext,
    MultiAdapterLinear,
    RecoveryPart,
    Router,
    recovery_part_forward,
)

PACKAGE = Path(adapterhub_c.__file__).parent
RANK_SCALE_HOME = PACKAGE / "adapters" / "lora.py"
RECOVERY_HOME = PACKAGE / "adapters" / "recovery.py"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        yield path, source, ast.parse(source)


def _segment(source: str, node: ast.AST) -> str:
    return ast.get_source_segment(source, node) or ""


@pytest.mark.parametrize("act", sorted(rec_mod.ACTIVATIONS))
def test_served_recovery_equals_the_training_module(act):
    torch.manual_seed(0)
    config = RecoveryConfig(rank=6, alpha=5.0, act=act, dropout=0.3)
    module = Recovery(16, 12, config)
    with torch.no_grad():
        module.U.normal_()
    x = torch.randn(3, 7, 16, dtype=torch.float64)  # cast to float32 by both
    part = RecoveryPart(module.D.detach(), module.U.detach(), config.for_rank(6).scale, act)
    expected = module(x, training=False)
    assert expected.abs().sum() > 0
    assert torch.equal(recovery_part_forward(x, part), expected)
    assert torch.equal(recovery_forward(x, module.D, module.U, config.scale, act), expected)


def test_served_layer_adds_the_same_recovery_as_the_training_hook():
    torch.manual_seed(1)
    base = torch.nn.Linear(16, 12)
    config = RecoveryConfig(rank=4, act="silu")
    host = torch.nn.Linear(16, 12)
    host.load_state_dict(base.state_dict())
    rec = rec_mod.attach_module(host, Recovery(16, 12, config))
    with torch.no_grad():
        rec.U.normal_()
    host.eval()
    router = Router()
    served = MultiAdapterLinear(base, "layer", router)
    weights = AdapterWeights("k", "a", recovery={"layer": RecoveryPart(rec.D.detach(), rec.U.detach(),
                                                                         config.for_rank(4).scale, "silu")})
    x = torch.randn(2, 5, 16)
    router.context = BatchContext([weights, weights])
    with torch.no_grad():
        assert torch.equal(served(x), host(x))


def test_one_recovery_forward_called_by_both_consumers():
    assert serve_layers.recovery_forward is rec_mod.recovery_forward
    calls = []
    original = rec_mod.recovery_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module = Recovery(8, 8, RecoveryConfig(rank=2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rec_mod, "recovery_forward", counting)
        module(torch.randn(1, 8), training=False)
    assert calls == [1]
    # the activation table is applied in exactly one function of the package
    uses = [(path, node.lineno) for path, source, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and _segment(source, node.value).endswith("ACTIVATIONS")]
    assert len(uses) == 1 and uses[0][0] == RECOVERY_HOME, uses


def test_scales_come_from_rank_scale():
    assert rank_scale(32, 16) == 2.0 and rank_scale(32, 16, rslora=True) == 8.0
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 3}}
    assert lora_scale(config, "model.layers.0.self_attn.q_proj") == rank_scale(16, 4) == 4.0
    assert lora_scale(config, "model.layers.0.self_attn.v_proj") == rank_scale(3, 8)
    assert lora_scale({**config, "use_rslora": True}, "k_proj") == 16 / math.sqrt(8)
    assert RecoveryConfig(rank=16).scale == rank_scale(32.0, 16) == 2.0
    cfg = RecoveryConfig(rank=8, alpha=3.0, act="relu", dropout=0.1, init_seed=5)
    for rank in (1, 3, 8, 7):
        other = cfg.for_rank(rank)
        assert other.rank == rank and other.scale == pytest.approx(cfg.scale, rel=1e-15)
        assert (other.act, other.dropout, other.init_seed) == ("relu", 0.1, 5)


_ALPHA_NAMES = ("alpha", "lora_alpha")


def _is_alpha(source: str, node: ast.AST) -> bool:
    text = _segment(source, node).lower()
    return any(name in text for name in _ALPHA_NAMES)


def _is_rank(source: str, node: ast.AST) -> bool:
    text = _segment(source, node).replace(" ", "")
    if isinstance(node, ast.Call):  # math.sqrt(r), sqrt(rank)
        return text.split("(")[0].endswith("sqrt") and all(_is_rank(source, a) for a in node.args)
    leaf = text.rsplit(".", 1)[-1]
    return leaf in ("r", "rank", "'r']", '"r"]') or text.endswith(('["r"]', "['r']", ".rank", "shape[0]"))


def test_no_module_rederives_an_alpha_over_rank_scale():
    found = []
    for path, source, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                    _is_alpha(source, node.left) and _is_rank(source, node.right):
                found.append((str(path.relative_to(PACKAGE)), node.lineno, _segment(source, node)))
    home = str(RANK_SCALE_HOME.relative_to(PACKAGE))
    assert [f for f in found if f[0] != home] == [], "compute the scale with adapters.lora.rank_scale"
    lines = {f[1] for f in found}
    defs = [n for n in ast.walk(ast.parse(RANK_SCALE_HOME.read_text())) if isinstance(n, ast.FunctionDef)
            and any(n.lineno <= line <= n.end_lineno for line in lines)]
    assert [d.name for d in defs] == ["rank_scale"], found


def test_the_checks_catch_a_rederived_scale():
    source = "def f(cfg, D):\n    return cfg['lora_alpha'] / cfg['r'] + cfg.alpha / D.shape[0] + alpha / math.sqrt(r)\n"
    tree = ast.parse(source)
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
            and _is_alpha(source, n.left) and _is_rank(source, n.right)]
    assert len(hits) == 3


def test_slicing_lives_in_adapters():
    """No module outside models/, variants/ (which build the variant) and adapters/slicing.py reads
    the MLP pairing to slice a tensor to an ffn-channels variant."""
    allowed = {PACKAGE / "adapters" / "slicing.py"}
    users = {path for path, source, _ in _modules() if ".mlp_of(" in source or "channel_rows_for_size(" in source}
    users = {p for p in users if p.parent.name not in ("models", "variants")}
    assert users == allowed, users
    assert lora_mod.rank_scale is rank_scale
