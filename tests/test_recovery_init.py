"""Recovery D drawn from a seed, and packs that store D's change from it (D − D₀)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.packing import pack_adapter, read_pack, read_pack_dense, unpack_recovery, write_pack
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.training.convert import build_student
from adapterhub_c.training.recovery import RecoveryConfig, attach_recovery, recovery_state, seeded_d_init

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
Q = "model.layers.0.self_attn.q_proj"


def test_seeded_init_is_pinned_bounded_and_depends_on_seed_and_name():
    d = seeded_d_init("model.layers.0.mlp.up_proj", 4, 64, seed=7)
    assert d.dtype == torch.float32 and d.shape == (4, 64)
    assert torch.equal(d, seeded_d_init("model.layers.0.mlp.up_proj", 4, 64, seed=7))
    assert not torch.equal(d, seeded_d_init("model.layers.0.mlp.up_proj", 4, 64, seed=8))
    assert not torch.equal(d, seeded_d_init("model.layers.1.mlp.up_proj", 4, 64, seed=7))
    assert d.abs().max() <= 1 / 8 and d.std().item() == pytest.approx(1 / 8 / 3 ** 0.5, rel=0.15)
    # pinned: packs written today hold D − D₀, so these bits must never change
    want = np.array([0.04383821785449982, 0.10897833108901978, 0.08631965517997742, 0.07783312350511551],
                    dtype=np.float32)
    np.testing.assert_array_equal(d[0, :4].numpy(), want)


def test_attach_and_convert_use_the_seeded_init():
    model, _ = build_tiny_llama()
    mods = attach_recovery(model, RecoveryConfig(rank=4, init_seed=3))
    for name, rec in mods.items():
        assert torch.equal(rec.D.detach(), seeded_d_init(name, 4, rec.D.shape[1], 3))
        assert not rec.U.any()
    source = LoraAdapter(dict(CONFIG), {f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 64),
                                        f"base_model.model.{Q}.lora_B.weight": torch.zeros(64, 4)})
    student = build_student(build_tiny_llama()[0], source, recover_rank=4, seed=11)
    assert student.recovery.init_seed == 11 and RecoveryConfig.from_dict(student.recovery.to_dict()).init_seed == 11
    for key, d in student.recovery_state().items():
        if key.endswith("recovery_D"):
            assert torch.equal(d, seeded_d_init(key.removesuffix(".recovery_D"), 4, d.shape[1], 11))
    with pytest.raises(UsageError, match="init seed"):
        RecoveryConfig(init_seed=-1)


def _converted(seed: int | None, change: float = 0.002):
    """A tiny converted adapter: D = D₀ + a small trained change, U trained from zero."""
    model, _ = build_tiny_llama()
    config = RecoveryConfig(rank=4, init_seed=seed)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        mods = attach_recovery(model, config)
    with torch.no_grad():
        for rec in mods.values():
            rec.D.add_(change * torch.randn(rec.D.shape, generator=g))
            rec.U.normal_(0, 0.05, generator=g)
    lora = LoraAdapter(dict(CONFIG), {f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 64, generator=g),
                                      f"base_model.model.{Q}.lora_B.weight": 0.1 * torch.randn(64, 4, generator=g)})
    return lora, recovery_state(model), config


@pytest.mark.parametrize("method", ["delta-fit", "compeft"])
def test_a_pack_stores_d_minus_its_seeded_start_and_decodes_d(tmp_path, method):
    lora, state, config = _converted(seed=5)
    pack = pack_adapter(lora, density=0.1, base="b", source_digest="x", scope="tensor", method=method,
                        alpha=1.0 if method == "delta-fit" else 4.0, recovery_state=state,
                        recovery_config=config.to_dict())
    assert pack.recovery_config["d_from_init"] is True
    path = tmp_path / "p.pack"
    write_pack(pack, path)
    assert _meta(path)["format_version"] == "3"  # readers of versions 1-2 refuse it, not decode a wrong D
    for decoded in (unpack_recovery(read_pack(path)), read_pack_dense(path).recovery()):
        got, cfg = decoded
        assert "d_from_init" not in cfg and cfg["init_seed"] == 5
        for key, d in state.items():
            if key.endswith("recovery_D"):
                # D₀ comes back exactly; only the small change went through the ternary code
                err = (got[key] - d).norm() / d.norm()
                assert err < 0.1, (key, float(err))
    # the same adapter without a seed packs D itself: its error is that of a random matrix at k = 10%
    lora, state, config = _converted(seed=None)
    pack = pack_adapter(lora, density=0.1, base="b", source_digest="x", scope="tensor", method=method,
                        alpha=1.0 if method == "delta-fit" else 4.0, recovery_state=state,
                        recovery_config=config.to_dict())
    assert "d_from_init" not in pack.recovery_config
    write_pack(pack, tmp_path / "old.pack")
    assert _meta(tmp_path / "old.pack")["format_version"] == "2"
    got, _ = unpack_recovery(pack)
    key = next(k for k in state if k.endswith("recovery_D"))
    assert (got[key] - state[key]).norm() / state[key].norm() > 0.5


def _meta(path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]


@pytest.mark.parametrize("bad, version", [
    ({"d_from_init": True}, "3"), ({"d_from_init": True, "init_seed": -1}, "3"),
    ({"d_from_init": True, "init_seed": "7"}, "3"), ({"d_from_init": 1, "init_seed": 7}, "3"),
    ({"d_from_init": True, "init_seed": True}, "3"),
    ({"d_from_init": True, "init_seed": 5}, "2"),  # an older version cannot hold D − D₀
    ({"init_seed": 5}, "3"),  # version 3 without it
])
def test_a_pack_claiming_d_from_init_without_a_seed_is_corrupt(tmp_path, bad, version):
    lora, state, config = _converted(seed=5)
    pack = pack_adapter(lora, density=0.1, base="b", source_digest="x", scope="tensor",
                        recovery_state=state, recovery_config=config.to_dict())
    path = tmp_path / "p.pack"
    write_pack(pack, path)
    tensors = load_file(str(path))
    meta = _meta(path)
    rc = {k: v for k, v in json.loads(meta["recovery_config"]).items() if k not in ("d_from_init", "init_seed")}
    meta["recovery_config"] = json.dumps({**rc, **bad})
    meta["format_version"] = version
    meta = {k: v for k, v in meta.items() if k != "pack_digest"}
    meta["pack_digest"] = tensors_digest(tensors, meta)
    save_file(tensors, str(tmp_path / "bad.pack"), metadata=meta)
    for reader in (read_pack, read_pack_dense):
        with pytest.raises(IntegrityError, match="d_from_init"):
            reader(tmp_path / "bad.pack")
