"""The pack file: exact round trip, corruption detection, versions, PEFT loading, inspect."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.packing import (
    ENCODINGS,
    inspect_pack,
    pack_adapter,
    read_pack,
    read_pack_dense,
    tensors_digest,
    unpack_to_adapter,
    write_pack,
)
from adapterhub_c.packing.digest import tensors_digest as digest_fn
from adapterhub_c.packing.format import _file_content

BASE = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapter(lora_folder):
    return LoraAdapter.from_folder(lora_folder)


def _pack(adapter, encoding="golomb", **kw):
    return pack_adapter(adapter, density=0.1, alpha=2.0, base=BASE, encoding=encoding,
                        source_digest=tensors_digest(adapter.tensors), **kw)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_round_trip_exact(adapter, tmp_path, encoding, scope):
    pack = _pack(adapter, encoding, scope=scope)
    digest = write_pack(pack, tmp_path / "p.pack")
    back = read_pack(tmp_path / "p.pack", expected_base=BASE)
    assert back.pack_digest == digest and len(digest) == 64
    assert set(back.tensors) == set(adapter.tensors)
    assert all(back.tensors[n].same_as(pack.tensors[n]) for n in pack.tensors)
    assert (back.density, back.alpha, back.scope, back.encoding, back.base) == (0.1, 2.0, scope, encoding, BASE)
    assert back.source_digest == tensors_digest(adapter.tensors)
    assert back.adapter_config == json.loads(json.dumps(adapter.config, sort_keys=True))


def test_every_flipped_byte_is_detected(adapter, tmp_path):
    small = LoraAdapter(adapter.config, {k: v for k, v in sorted(adapter.tensors.items())[:2]})
    path = tmp_path / "p.pack"
    write_pack(_pack(small), path)
    data = path.read_bytes()
    bad = tmp_path / "bad.pack"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        bad.write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError):
            read_pack(bad)


def test_truncated_file_is_detected(adapter, tmp_path):
    path = tmp_path / "p.pack"
    write_pack(_pack(adapter), path)
    data = path.read_bytes()
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "t.pack").write_bytes(data[:cut])
        with pytest.raises(IntegrityError):
            read_pack(tmp_path / "t.pack")


def test_unknown_version_and_wrong_base_are_usage_errors(adapter, tmp_path):
    tensors, meta = _file_content(_pack(adapter))
    meta["format_version"] = "4"
    meta["pack_digest"] = digest_fn(tensors, meta)
    (tmp_path / "v4.pack").write_bytes(st_save(tensors, metadata=meta))
    for reader in (read_pack, read_pack_dense):
        with pytest.raises(UsageError, match="version"):
            reader(tmp_path / "v4.pack")
    write_pack(_pack(adapter), tmp_path / "p.pack")
    with pytest.raises(UsageError, match="base"):
        read_pack(tmp_path / "p.pack", expected_base="other/model")
    with pytest.raises(UsageError):
        read_pack(tmp_path / "missing.pack")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_unpacked_adapter_loads_in_plain_peft(adapter, tmp_path, encoding):
    from peft import PeftModel

    from adapterhub_c.models.tiny import build_tiny_llama

    write_pack(_pack(adapter, encoding), tmp_path / "p.pack")
    pack = read_pack(tmp_path / "p.pack")
    unpacked = unpack_to_adapter(pack)
    assert unpacked.config == pack.adapter_config
    for name, t in unpacked.tensors.items():
        assert t.dtype == adapter.tensors[name].dtype and t.shape == adapter.tensors[name].shape
        nz = t != 0
        if nz.any():  # global top-k may keep nothing of a small-valued tensor
            assert torch.equal(t[nz].abs().unique(), torch.tensor([pack.tensors[name].scale]).to(t.dtype))
    unpacked.to_folder(tmp_path / "unpacked")
    model, tok = build_tiny_llama()
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "unpacked"))
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    for name, t in unpacked.tensors.items():
        assert torch.equal(loaded[name], t)
    ids = tok("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(peft_model(ids).logits).all()


def test_raw_tensors_kept_verbatim(adapter, tmp_path):
    tensors = dict(adapter.tensors)
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(5, 3).to(torch.bfloat16)
    a2 = LoraAdapter(adapter.config, tensors)
    write_pack(_pack(a2), tmp_path / "p.pack")
    pack = read_pack(tmp_path / "p.pack")
    key = "base_model.model.lm_head.modules_to_save.default.weight"
    assert key not in pack.tensors and torch.equal(unpack_to_adapter(pack).tensors[key], tensors[key])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_inspect(adapter, tmp_path, encoding):
    write_pack(_pack(adapter, encoding), tmp_path / "p.pack")
    info = inspect_pack(tmp_path / "p.pack")
    json.dumps(info)
    t = info["totals"]
    n = adapter.num_parameters()
    assert t["numel"] == n and t["nnz"] == int(0.1 * n + 0.5)
    assert t["file_bytes"] == (tmp_path / "p.pack").stat().st_size
    for row in info["tensors"].values():
        assert row["bits_per_param"] == row["encoded_bits"] / row["numel"]
    if encoding == "bitmask":
        assert t["bits_per_param"] == 2.0
    else:  # small tensors: a few padding bits each
        assert t["bits_per_param"] < 1.05 * t["entropy_bits_per_param"]
    assert t["ratio_vs_fp16"] == pytest.approx(16 / t["bits_per_param"])
    assert info["kept_count"].startswith("round(k·n)") and "int(k·n)+1" in info["kept_count"]


def test_bad_pack_parameters(adapter):
    with pytest.raises(UsageError):
        _pack(adapter, "zip")
    with pytest.raises(UsageError):
        pack_adapter(adapter, density=1.5, base=BASE, source_digest="x")
    with pytest.raises(UsageError):
        pack_adapter(adapter, density=0.1, base="", source_digest="x")
