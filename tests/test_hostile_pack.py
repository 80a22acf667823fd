"""Hostile pack files (issue 20, item 3): the pack digest can be recomputed by anyone, so
every header field is checked on read; only IntegrityError / UsageError come out.

The cases start from the version-1 fixtures in tests/fixtures (written by the writer
before the reader was hardened), change one thing and re-sign the digest, so that the
change reaches the parser and the decoder instead of stopping at the digest check.
"""
from __future__ import annotations

import json
import math
import random
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.packing import inspect_pack, read_pack, unpack_recovery, unpack_to_adapter
from adapterhub_c.packing.digest import tensors_digest

FIXTURES = Path(__file__).parent / "fixtures"
ALLOWED = (IntegrityError, UsageError)


def _load(encoding: str = "golomb") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = (FIXTURES / f"v1-{encoding}.pack").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return dict(st_load(data)), dict(json.loads(data[8:8 + n])["__metadata__"])


def _signed(tmp_path: Path, tensors: dict, meta: dict, name: str = "hostile.pack") -> Path:
    """Write ``tensors`` + ``meta`` with a freshly computed (valid) pack digest."""
    meta = {k: v for k, v in meta.items() if k != "pack_digest"}
    meta["pack_digest"] = tensors_digest(tensors, meta)
    path = tmp_path / name
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def _with_info(meta: dict, row: int, field: int, value) -> dict:
    """``meta`` with field ``field`` (0 name, 1 shape, 2 dtype, 3 scale) of tensor ``row`` replaced."""
    info = json.loads(meta["tensors"])
    info[row][field] = value
    return {**meta, "tensors": json.dumps(info)}


def _refused(path: Path, match: str | None = None) -> None:
    with pytest.raises(IntegrityError, match=match):
        read_pack(path)
    with pytest.raises(IntegrityError, match=match):
        inspect_pack(path)


# ---- a handcrafted golomb stream (the layout of adapterhub_c.packing.encoding) ---------------
def _golomb_bytes(m: int, q: list[int], r: list[int], negative: list[bool]) -> np.ndarray:
    b = (m - 1).bit_length()
    w, u = max(b - 1, 0), (1 << b) - m
    unary = [bit for qi in q for bit in [0] * qi + [1]]
    prefix, extra = [], []
    for ri in r:
        p = (ri + u) >> 1 if ri >= u else ri
        prefix += [(p >> j) & 1 for j in range(w)]
        if ri >= u:
            extra.append((ri + u) & 1)
    bits = np.array(unary + prefix + [int(x) for x in negative] + extra, dtype=np.uint8)
    return np.packbits(bits, bitorder="little")


def _single_golomb_pack(tmp_path: Path, m: int, q: list[int], r: list[int]) -> Path:
    """A one-tensor golomb pack (the fixture's header) whose stream has Golomb parameter ``m``."""
    tensors, meta = _load("golomb")
    info = json.loads(meta["tensors"])[:1]
    numel = math.prod(info[0][1])
    bits = _golomb_bytes(m, q, r, [False] * len(q))
    row = [numel, len(q), m, sum(q) + len(q), 0, bits.size]
    tensors = {"index": torch.tensor([row], dtype=torch.int64), "scales": tensors["scales"][:1].clone(),
               "bits": torch.from_numpy(bits)}
    tensors.update({k: v for k, v in _load("golomb")[0].items() if k.startswith("raw::")})
    return _signed(tmp_path, tensors, {**meta, "tensors": json.dumps(info)})


# ---- packs written before the hardening still read -------------------------------------------
@pytest.mark.parametrize("encoding", ["golomb", "bitmask"])
def test_version_1_fixture_still_reads(encoding):
    pack = read_pack(FIXTURES / f"v1-{encoding}.pack", expected_base="builtin:tiny-llama")
    assert (pack.density, pack.alpha, pack.scope, pack.encoding) == (0.2, 1.5, "tensor", encoding)
    assert [t.nnz for _, t in sorted(pack.tensors.items())] == [26, 19, 26, 19]
    adapter = unpack_to_adapter(pack)
    assert len(adapter.tensors) == 5 and all(torch.isfinite(t.float()).all() for t in adapter.tensors.values())


def test_the_re_signed_fixture_reads(tmp_path):
    """The helpers themselves produce a valid pack when nothing is changed: it reads as the fixture does."""
    again = read_pack(_signed(tmp_path, *_load()))
    fixture = read_pack(FIXTURES / "v1-golomb.pack")
    assert (again.density, again.alpha, again.scope, again.encoding) == (0.2, 1.5, "tensor", "golomb")
    assert sorted(again.tensors) == sorted(fixture.tensors)
    a, b = unpack_to_adapter(again), unpack_to_adapter(fixture)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ---- one test per hostile case of issue 20, item 3 -------------------------------------------
def test_a_small_pack_claiming_1e12_elements_is_refused(tmp_path):
    tensors, meta = _load()
    tensors["index"] = tensors["index"].clone()
    tensors["index"][0, 0] = 10 ** 12
    path = _signed(tmp_path, tensors, _with_info(meta, 0, 1, [10 ** 6, 10 ** 6]))
    assert path.stat().st_size < 5000
    _refused(path)


def test_golomb_parameter_2_63_minus_1_is_refused(tmp_path):
    # q = 1 at the second non-zero: index = 5 + 2^63 in exact arithmetic, wraps negative in int64
    _refused(_single_golomb_pack(tmp_path, 2 ** 63 - 1, q=[0, 1], r=[5, 0]))


def test_unsorted_positions_are_refused(tmp_path):
    # q·m + r + 1 ≡ -1 (mod 2^64): the second position decodes one before the first
    _refused(_single_golomb_pack(tmp_path, 2 ** 63 - 1, q=[0, 2], r=[5, 0]))


def test_repeated_positions_are_refused(tmp_path):
    # q·m + r + 1 ≡ 0 (mod 2^64): the second position decodes equal to the first
    _refused(_single_golomb_pack(tmp_path, 2 ** 63 - 1, q=[0, 2], r=[5, 1]))


def test_negative_shape_is_refused(tmp_path):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, _with_info(meta, 0, 1, [-4, -32])))


def test_infinite_shape_is_refused(tmp_path):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, _with_info(meta, 0, 1, [4, float("inf")])))


@pytest.mark.parametrize("shape", [[4.0, 32.0], [True, 128], "4x32", [[4], 32], None])
def test_non_integer_shape_is_refused(tmp_path, shape):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, _with_info(meta, 0, 1, shape)))


@pytest.mark.parametrize("name", [5, None, ["a"], {"a": 1}])
def test_non_string_tensor_name_is_refused(tmp_path, name):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, _with_info(meta, 0, 0, name)))


@pytest.mark.parametrize("config", ["[1, 2]", "\"lora\"", "null", "3"])
def test_non_dict_adapter_config_is_refused(tmp_path, config):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, {**meta, "adapter_config": config}))


@pytest.mark.parametrize("density", ["7", "nan", "0", "-0.5", "inf"])
def test_density_out_of_range_is_refused(tmp_path, density):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, {**meta, "density": density}), match="density")


@pytest.mark.parametrize("alpha", ["0", "-1.5", "inf", "nan"])
def test_alpha_not_positive_finite_is_refused(tmp_path, alpha):
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, {**meta, "alpha": alpha}), match="alpha")


def test_infinite_scale_is_refused(tmp_path):
    tensors, meta = _load()
    tensors["scales"] = tensors["scales"].clone()
    tensors["scales"][0] = float("inf")
    _refused(_signed(tmp_path, tensors, _with_info(meta, 0, 3, float("inf"))), match="scale")


def test_scale_beyond_the_tensor_dtype_is_refused(tmp_path):
    # tensor 2 is bfloat16: a float32 scale above its largest finite value decodes to inf
    tensors, meta = _load()
    tensors["scales"] = tensors["scales"].clone()
    tensors["scales"][2] = 3.4e38
    scale = float(tensors["scales"][2])
    _refused(_signed(tmp_path, tensors, _with_info(meta, 2, 3, scale)), match="scale")


def test_the_writer_refuses_what_the_reader_would():
    import sys

    sys.path.insert(0, str(FIXTURES))
    from make_pack_fixtures import fixture_adapter

    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.packing import pack_adapter

    adapter = fixture_adapter()
    half = LoraAdapter(adapter.config, {k: v.to(torch.float16) for k, v in adapter.tensors.items()})
    with pytest.raises(UsageError, match="does not fit float16"):
        pack_adapter(half, density=0.2, alpha=1e6, base="b", source_digest="x", scope="tensor")
    raw_key = "base_model.model.lm_head.modules_to_save.default.weight"
    nan = LoraAdapter(adapter.config, {**adapter.tensors, raw_key: torch.full((3, 5), float("nan"))})
    with pytest.raises(UsageError, match="NaN"):
        pack_adapter(nan, density=0.2, base="b", source_digest="x")


# ---- the mutation campaign, bounded -----------------------------------------------------------
_HOSTILE_INTS = [0, 1, -1, 2, 31, 32, 127, 128, 129, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 32 + 1,
                 2 ** 62, 2 ** 63 - 1, -(2 ** 63), 10 ** 12]
_HOSTILE_JSON = [None, True, -1, 0, 1.5, 2 ** 63, float("inf"), float("nan"), "", "x", [], {}, [1, 2], [[1]]]
_HOSTILE_STRINGS = ["", "nan", "inf", "-inf", "-1", "0", "1e308", "7", "[]", "{}", "null", "\"x\"", "[[]]",
                    "1", "0.5", "golomb", "bitmask", "global", "tensor", "stc", "compeft", "{\"r\": 4}"]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    if rng.random() < 0.5:
        return bytes(b[:rng.randrange(len(b))])
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _mutate_tensor(rng: random.Random, tensors: dict) -> None:
    """One change to the tensors, weighted towards ones that reach the decoder."""
    roll = rng.random()
    streams = sorted(k for k in tensors if k in ("bits", "pos", "neg") and tensors[k].numel())
    if roll < 0.4 and streams:  # flip bits in the payload
        key = rng.choice(streams)
        t = tensors[key].clone()
        raw = t.view(torch.uint8)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(raw.numel())] ^= 1 << rng.randrange(8)
    elif roll < 0.75:  # one index cell: a hostile value, or a small step from the true one
        key, t = "index", tensors["index"].clone()
        cell = rng.randrange(t.numel())
        step = rng.choice([-8, -2, -1, 1, 2, 8])
        t.view(-1)[cell] = rng.choice(_HOSTILE_INTS) if rng.random() < 0.5 else int(t.view(-1)[cell]) + step
    elif roll < 0.85:  # truncate or extend a table or stream
        key = rng.choice(sorted(tensors))
        flat = tensors[key].reshape(-1)
        t = flat[:rng.randrange(flat.numel() + 1)] if rng.random() < 0.5 else torch.cat([flat, flat[:3]])
    elif roll < 0.95:  # another dtype or shape
        key = rng.choice(sorted(tensors))
        t = tensors[key]
        t = rng.choice([t.to(torch.float32), t.to(torch.int32), t.to(torch.bfloat16), t.reshape(-1),
                        t.reshape(1, -1), t.to(torch.int64)])
    else:
        del tensors[rng.choice(sorted(tensors))]
        return
    tensors[key] = t


def _mutate_meta(rng: random.Random, meta: dict) -> dict:
    meta = dict(meta)
    key = rng.choice(sorted(k for k in meta if k != "pack_digest"))
    if key == "tensors" and rng.random() < 0.8:
        info = json.loads(meta["tensors"])
        row = rng.randrange(len(info))
        field = rng.randrange(4)
        if field == 1 and rng.random() < 0.5:
            shape = list(info[row][1])
            shape[rng.randrange(len(shape))] = rng.choice(_HOSTILE_INTS + [0.5, float("inf")])
            info[row][1] = shape
        else:
            info[row][field] = rng.choice(_HOSTILE_JSON + _HOSTILE_INTS + ["float16", info[0][0]])
        meta["tensors"] = json.dumps(info)
    elif rng.random() < 0.2:
        del meta[key]
    else:
        meta[key] = rng.choice(_HOSTILE_STRINGS)
    return meta


def _check_accepted(path: Path) -> None:
    """A pack the reader accepts decodes to finite tensors of a size the file accounts for."""
    try:
        pack = read_pack(path)
        claimed = sum(t.numel for t in pack.tensors.values())
        assert claimed <= 1 << 24, f"accepted a claim of {claimed} elements from {path.stat().st_size} bytes"
        tensors = dict(unpack_to_adapter(pack).tensors)
        recovery = unpack_recovery(pack)
        if recovery:
            tensors.update(recovery[0])
    except ALLOWED:
        return
    for name, t in tensors.items():
        assert torch.isfinite(t.float()).all(), f"{name} decodes to inf/NaN"


@pytest.mark.parametrize("encoding", ["golomb", "bitmask"])
def test_mutation_campaign_raises_only_project_errors(tmp_path, encoding):
    rng = random.Random(20 + len(encoding))
    base_tensors, base_meta = _load(encoding)
    raw_file = (FIXTURES / f"v1-{encoding}.pack").read_bytes()
    tracemalloc.start()
    try:
        for i in range(400):
            kind = i % 4
            path = tmp_path / f"m{i}.pack"
            if kind == 0:  # raw byte flips and truncations: the digest catches them
                path.write_bytes(_mutate_bytes(rng, raw_file))
                with pytest.raises(ALLOWED):
                    read_pack(path)
                continue
            tensors, meta = dict(base_tensors), dict(base_meta)
            if kind in (1, 3):
                _mutate_tensor(rng, tensors)
            if kind in (2, 3):
                meta = _mutate_meta(rng, meta)
            path = _signed(tmp_path, tensors, meta, f"m{i}.pack")
            tracemalloc.reset_peak()
            _check_accepted(path)
            assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


# ---- issue 28: allocation bounded by the payload, LoRA geometry checked ------------------------
def _with_rows(tensors: dict, meta: dict, rows: list, recovery: dict | None = None) -> tuple[dict, dict]:
    """The fixture with packed entries [name, shape, dtype] added, each empty (no non-zeros, no stream)."""
    tensors, info = dict(tensors), json.loads(meta["tensors"])
    end = int(tensors["bits"].numel())
    index, scales = tensors["index"].tolist(), tensors["scales"].tolist()
    for name, shape, dtype in rows:
        info.append([name, shape, dtype, 1.0])
        index.append([math.prod(shape), 0, 1, 0, end, 0])
        scales.append(1.0)
    order = sorted(range(len(info)), key=lambda i: info[i][0])
    tensors["index"] = torch.tensor([index[i] for i in order], dtype=torch.int64)
    tensors["scales"] = torch.tensor([scales[i] for i in order], dtype=torch.float32)
    # offsets follow the name order again
    offset = 0
    for row in tensors["index"]:
        row[4] = offset
        offset += int(row[5])
    meta = {**meta, "tensors": json.dumps([info[i] for i in order])}
    if recovery is not None:
        meta["recovery_config"] = json.dumps(recovery)
    return tensors, meta


def test_a_tiny_density_does_not_raise_the_size_bound(tmp_path):
    """Issue 28, hole 1: density 1e-7 (global scope) and an empty fp64 entry of 4,292,608,000 elements (a LoRA B whose
    rank agrees with its A) in a file of about a kilobyte: the streams encode no non-zero for it, so the
    reader refuses the claim instead of allocating 34 GB."""
    from adapterhub_c.packing import read_pack_dense

    tensors, meta = _load()
    layer = "base_model.model.model.layers.2.self_attn.q_proj"
    tensors, meta = _with_rows(tensors, meta, [[f"{layer}.lora_A.weight", [4, 32], "float64"],
                                               [f"{layer}.lora_B.weight", [1073152000, 4], "float64"]])
    path = _signed(tmp_path, tensors, {**meta, "density": "1e-07", "scope": "global"})
    assert path.stat().st_size < 2000
    _refused(path, match="elements")
    with pytest.raises(IntegrityError, match="elements"):
        read_pack_dense(path)


def test_a_huge_empty_recovery_d_is_refused(tmp_path):
    """Issue 28, hole 1: a recovery D of shape [2, 2^31 - 512] with no stream behind it."""
    tensors, meta = _load()
    module = "recovery::model.layers.0.self_attn.q_proj"
    recovery = {"rank": 2, "alpha": 4.0, "act": "gelu", "dropout": 0.0}
    tensors, meta = _with_rows(tensors, meta, [[f"{module}.recovery_D", [2, 2 ** 31 - 512], "float32"],
                                               [f"{module}.recovery_U", [24, 2], "float32"]], recovery)
    _refused(_signed(tmp_path, tensors, {**meta, "density": "1e-07", "scope": "global"}), match="elements")


def test_a_non_zero_count_beyond_the_stream_is_refused(tmp_path):
    """The count of non-zeros is bounded by the bits of the tensor's own stream (2 bits each at least)."""
    tensors, meta = _load()
    tensors["index"] = tensors["index"].clone()
    tensors["index"][1, 1] = 8 * int(tensors["index"][1, 5]) + 1
    tensors["index"][1, 3] = tensors["index"][1, 1]
    _refused(_signed(tmp_path, tensors, meta))


@pytest.mark.parametrize("row, shape", [(0, [8, 16]), (1, [12, 8]), (0, [128]), (1, [96])],
                         ids=["A-rank-8", "B-rank-8", "A-1d", "B-1d"])
def test_a_and_b_ranks_that_disagree_are_refused(tmp_path, row, shape):
    """Issue 28, hole 2: A [8, 16] with B [24, 4] (same element counts, so the streams still fit)."""
    tensors, meta = _load()
    _refused(_signed(tmp_path, tensors, _with_info(meta, row, 1, shape)), match="rank|matri")


@pytest.mark.parametrize("change", [{"r": 10 ** 9}, {"r": 8}, {"rank_pattern": {"q_proj": 2}},
                                    {"target_modules": ["k_proj"]}, {"target_modules": "k_proj"},
                                    {"r": "4"}, {"peft_type": "IA3"}],
                         ids=["r-1e9", "r-8", "rank-pattern", "targets", "target-regex", "r-text", "ia3"])
def test_a_config_that_does_not_describe_the_tensors_is_refused(tmp_path, change):
    tensors, meta = _load()
    config = {**json.loads(meta["adapter_config"]), **change}
    path = _signed(tmp_path, tensors, {**meta, "adapter_config": json.dumps(config)})
    with pytest.raises(ALLOWED):
        read_pack(path)
    with pytest.raises(ALLOWED):
        inspect_pack(path)


def test_a_factor_without_its_pair_is_refused(tmp_path):
    tensors, meta = _load()
    layer = "base_model.model.model.layers.2.self_attn.q_proj"
    tensors, meta = _with_rows(tensors, meta, [[f"{layer}.lora_A.weight", [4, 32], "float32"]])
    _refused(_signed(tmp_path, tensors, meta), match="lora_B")


def test_a_magnitude_vector_of_the_wrong_length_is_refused(tmp_path):
    tensors, meta = _load()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[f"raw::{key}"] = torch.ones(23)
    raw = sorted(json.loads(meta["raw"]) + [key])
    config = {**json.loads(meta["adapter_config"]), "use_dora": True}
    path = _signed(tmp_path, tensors, {**meta, "raw": json.dumps(raw), "adapter_config": json.dumps(config)})
    _refused(path, match="magnitude")


def test_mismatched_recovery_ranks_are_refused(tmp_path):
    tensors, meta = _load()
    module = "recovery::model.layers.0.self_attn.q_proj"
    recovery = {"rank": 2, "alpha": 4.0, "act": "gelu", "dropout": 0.0}
    tensors, meta = _with_rows(tensors, meta, [[f"{module}.recovery_D", [2, 32], "float32"],
                                               [f"{module}.recovery_U", [24, 3], "float32"]], recovery)
    _refused(_signed(tmp_path, tensors, meta), match="rank")


def test_the_writer_refuses_a_density_the_reader_would(monkeypatch):
    """A golomb pack keeping fewer than one entry in NUMEL_PER_NONZERO (beyond the small-pack allowance)
    is refused when written, in words that say what to change, not only when read."""
    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.packing import format as fmt
    from adapterhub_c.packing import pack_adapter

    monkeypatch.setattr(fmt, "MIN_NUMEL_ALLOWANCE", 1000)
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    adapter = LoraAdapter({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
                          {f"{layer}.lora_A.weight": torch.randn(4, 2048), f"{layer}.lora_B.weight": torch.randn(24, 4)})
    with pytest.raises(UsageError, match="higher density"):
        pack_adapter(adapter, density=1e-4, base="b", source_digest="x")
    assert pack_adapter(adapter, density=0.01, base="b", source_digest="x").tensors
