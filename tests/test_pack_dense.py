"""The compiled decoder (read_pack_dense) against its numpy twin, and pack format version 2.

Bit for bit on random packs of every encoding, density and dtype (empty tensors, nnz = 0,
numel not a multiple of 8 or 32); on hostile files both readers refuse the same inputs;
the version-2 table is compact (file ≤ 1.05 × the entropy bound on LoRA shapes) and its
own hostile cases are refused with IntegrityError.
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.kernels import unpack_cpu
from adapterhub_c.packing import (
    ENCODINGS,
    inspect_pack,
    pack_adapter,
    read_pack,
    read_pack_dense,
    unpack_recovery,
    unpack_to_adapter,
    write_pack,
)
from adapterhub_c.packing import dense as dense_mod
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.packing.encoding import encode
from adapterhub_c.packing.table import MAX_NDIM
from adapterhub_c.packing.ternary import TernaryTensor

FIXTURES = Path(__file__).parent / "fixtures"
ALLOWED = (IntegrityError, UsageError)
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (A, B) shapes of LoRA modules the reader accepts (issue 28 checks their geometry): 1x1, 3x7 and
# 5x13 are not multiples of 8 or 32; 5x0 and 0x5 are empty; (2, 3, 5) with (7, 2, 1) is a conv1d
# LoRA; the 70-output module has a 1-d bias; the zeros B keeps nnz = 0
SHAPES = [((4, 32), (24, 4)), ((1, 1), (3, 1)), ((3, 7), (13, 3)), ((5, 13), (1, 5)), ((5, 0), (0, 5)),
          ((2, 3, 5), (7, 2, 1)), ((2, 9), (70, 2))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _lora(tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    """A LoRA of ``tensors``: every A without its B gets one of a single output (ones), and the
    config names each module's rank (the reader checks A, B and the config against each other)."""
    tensors = dict(tensors)
    ranks = {}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        A = tensors[key]
        tensors.setdefault(f"{module}.lora_B.weight", torch.ones(1, A.shape[0], *[1] * (A.dim() - 2), dtype=A.dtype))
        ranks[module.removeprefix("base_model.model.")] = A.shape[0]
    return LoraAdapter({**CONFIG, "rank_pattern": ranks}, tensors)


def _adapter(dtypes, seed=0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (a, b) in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        tensors[f"base_model.model.layers.{i}.q_proj.lora_A.weight"] = torch.randn(*a, generator=g).to(dtype)
        tensors[f"base_model.model.layers.{i}.q_proj.lora_B.weight"] = torch.randn(*b, generator=g).to(dtype)
    tensors["base_model.model.layers.6.q_proj.lora_B.bias"] = torch.randn(70, generator=g).to(dtypes[0])
    tensors["base_model.model.layers.9.q_proj.lora_A.weight"] = torch.randn(4, 6, generator=g).to(dtypes[0])
    tensors["base_model.model.layers.9.q_proj.lora_B.weight"] = torch.zeros(6, 4, dtype=dtypes[0])
    return _lora(tensors)


def _assert_same(path: Path) -> None:
    """Compiled decoder == numpy twin == unpack_to_adapter(read_pack), bit for bit."""
    ref = unpack_to_adapter(read_pack(path)).tensors
    for impl in ("numba", "ref"):
        got = read_pack_dense(path, impl=impl).to_adapter().tensors
        assert list(got) == list(ref)
        for name, t in ref.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert torch.equal(_bits(got[name]), _bits(t)), (impl, name)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_compiled_decoder_equals_the_numpy_twin(tmp_path, encoding, dtype, density):
    adapter = _adapter([dtype])
    for scope in ("global", "tensor"):
        pack = pack_adapter(adapter, density=density, alpha=1.5, base="b", scope=scope, encoding=encoding,
                            source_digest="x")
        write_pack(pack, tmp_path / "p.pack")
        _assert_same(tmp_path / "p.pack")
    assert any(t.nnz == 0 for t in pack.tensors.values())


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_mixed_dtypes_decode_into_one_buffer_each(tmp_path, encoding):
    pack = pack_adapter(_adapter(DTYPES, seed=1), density=0.2, base="b", encoding=encoding, source_digest="x")
    write_pack(pack, tmp_path / "p.pack")
    _assert_same(tmp_path / "p.pack")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_decoding_split_over_threads_gives_the_same_bits(tmp_path, monkeypatch, encoding, threads):
    monkeypatch.setattr(dense_mod, "PARALLEL_MIN_NUMEL", 0)  # split even these small packs
    monkeypatch.setenv("ADAPTERHUB_DECODE_THREADS", str(threads))
    assert dense_mod.decode_threads() == threads
    # per-tensor scope: every tensor has its own scale, which each thread must take with its rows
    pack = pack_adapter(_adapter([torch.float32, torch.bfloat16], seed=2), density=0.3, base="b",
                        scope="tensor", encoding=encoding, source_digest="x")
    assert len({t.scale for t in pack.tensors.values()}) > 3
    write_pack(pack, tmp_path / "p.pack")
    _assert_same(tmp_path / "p.pack")


def test_a_pack_dominated_by_one_tensor_is_not_split(tmp_path, monkeypatch):
    monkeypatch.setattr(dense_mod, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setenv("ADAPTERHUB_DECODE_THREADS", "4")
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(256, 256),
               "base_model.model.layers.1.q_proj.lora_A.weight": torch.randn(300, 1)}  # sorts after the big one
    pack = pack_adapter(_lora(tensors), density=0.2, base="b", scope="tensor", source_digest="x")
    write_pack(pack, tmp_path / "p.pack")
    _assert_same(tmp_path / "p.pack")


def test_a_large_pack_is_split_and_a_bad_tensor_is_named_whatever_its_thread(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(5)
    tensors = {f"base_model.model.layers.{i}.q_proj.lora_A.weight": torch.randn(64, 1024, generator=g)
               for i in range(8)}  # 512K elements: over PARALLEL_MIN_NUMEL
    pack = pack_adapter(_lora(tensors), density=0.1, base="b", scope="tensor", source_digest="x")
    path = tmp_path / "p.pack"
    write_pack(pack, path)
    calls = []
    real = dense_mod._run_split
    monkeypatch.setattr(dense_mod, "_run_split", lambda k, ix, st, vs, n, *during: calls.append(n) or real(k, ix, st, vs, n, *during))
    monkeypatch.setenv("ADAPTERHUB_DECODE_THREADS", "2")
    _assert_same(path)
    assert calls and set(calls) == {2}
    # a stream broken in the last tensor (the second thread's) is reported under that tensor's name
    t, meta = _load_path(path)
    bits = t["bits"].clone()
    last = sorted(pack.encoded)[-1]
    start = bits.numel() - pack.encoded[last].data["bits"].size
    bits[start + 1:start + 4] = 255  # ones added to its unary stream: more non-zeros than it holds
    with pytest.raises(IntegrityError, match="layers.7.q_proj"):
        read_pack_dense(_signed(tmp_path / "bad.pack", {**t, "bits": bits}, meta))


def _kernel_dense(enc, scale: float, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """One tensor through the compiled kernel: (status, dense flat tensor)."""
    words = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    out = torch.full((enc.numel,), 7.0, dtype=dtype)  # garbage the kernel must overwrite
    s = torch.tensor([0.0, scale, -scale], dtype=torch.float32).to(dtype)
    vals = s.view(words[s.element_size()]).numpy().reshape(1, 3)
    stream = enc.data["bits" if enc.encoding == "golomb" else "pos"]
    index = np.array([[enc.numel, enc.nnz, enc.param, enc.unary_bits, 0, stream.size]], dtype=np.int64)
    start = np.zeros(1, dtype=np.int64)
    target = out.view(words[out.element_size()]).numpy()
    if enc.encoding == "golomb":
        _, status = unpack_cpu.golomb_dense(unpack_cpu.padded_words(stream), index, start, vals, target)
    else:
        _, status = unpack_cpu.bitmask_dense(enc.data["pos"], enc.data["neg"], index, start, vals, target)
    return status, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_any_golomb_parameter_and_size(dtype):
    """m = 1 (no remainder bits), powers of two (no truncation), large m (long unary runs)."""
    rng = np.random.default_rng(3)
    for n in (1, 31, 33, 1000, 20011):
        for k in (0.0, 0.002, 0.1, 0.7, 1.0):
            t = np.where(rng.random(n) < k, np.where(rng.random(n) < 0.5, -1, 1), 0)
            idx = np.flatnonzero(t)
            for m in (None, 1, 2, 3, 8, 100, 5000):
                for encoding in ENCODINGS:
                    enc = encode(idx, t[idx] < 0, n, encoding, m=m if encoding == "golomb" else None)
                    status, got = _kernel_dense(enc, 0.37, dtype)
                    want = TernaryTensor(idx.astype(np.int64), t[idx] < 0, 0.37, (n,), str(dtype)[6:]).to_dense()
                    assert status == 0 and torch.equal(_bits(got), _bits(want)), (n, k, m, encoding)


# ---- hostile streams: both decoders refuse the same inputs -----------------------------------
def _outcome(fn):
    try:
        return fn()
    except ALLOWED:
        return "refused"


def _same_verdict(path: Path) -> str:
    """Both readers refuse, or both give the same bits; returns which."""
    ref = _outcome(lambda: read_pack_dense(path, impl="ref").tensors)
    got = _outcome(lambda: read_pack_dense(path).tensors)
    if isinstance(ref, str) or isinstance(got, str):
        assert ref == got, (ref if isinstance(ref, str) else "accepted", got if isinstance(got, str) else "accepted")
        return "refused"
    assert list(ref) == list(got)
    assert all(torch.equal(_bits(ref[n]), _bits(got[n])) for n in ref)
    return "accepted"


def _load(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _load_path(FIXTURES / name)


def _load_path(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return dict(st_load(data)), dict(json.loads(data[8:8 + n])["__metadata__"])


def _signed(path: Path, tensors: dict, meta: dict) -> Path:
    meta = {k: v for k, v in meta.items() if k != "pack_digest"}
    meta["pack_digest"] = tensors_digest(tensors, meta)
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fixture", ["v1-golomb.pack", "v1-bitmask.pack", "v2-golomb.pack", "v2-bitmask.pack"])
def test_stream_mutations_get_the_same_verdict_from_both_decoders(tmp_path, monkeypatch, fixture, threads):
    monkeypatch.setattr(dense_mod, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setenv("ADAPTERHUB_DECODE_THREADS", str(threads))
    rng = random.Random(17)
    tensors, meta = _load(fixture)
    streams = [k for k in ("bits", "pos", "neg") if k in tensors]
    verdicts = set()
    for i in range(150):
        mutated = dict(tensors)
        key = rng.choice(streams)
        raw = mutated[key].clone()
        b = raw.view(torch.uint8)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(b.numel())] ^= 1 << rng.randrange(8)
        mutated[key] = raw
        verdicts.add(_same_verdict(_signed(tmp_path / f"m{i}.pack", mutated, meta)))
    assert verdicts == {"refused", "accepted"}  # the campaign reaches both outcomes


def _table_body(tensors) -> bytes:
    return zlib.decompress(tensors["table"].numpy().tobytes())


def _with_table(tensors: dict, body: bytes) -> dict:
    return {**tensors, "table": torch.frombuffer(bytearray(zlib.compress(body)), dtype=torch.uint8)}


def _refused(path: Path, match: str | None = None) -> None:
    for reader in (read_pack, read_pack_dense, inspect_pack):
        with pytest.raises(IntegrityError, match=match):
            reader(path)


def _ints(body: bytes) -> tuple[int, int, np.ndarray]:
    n, d = struct.unpack_from("<QQ", body)
    planes = np.frombuffer(body, np.uint8, count=8 * (6 * n + d), offset=16).reshape(8, -1)
    return n, d, np.ascontiguousarray(planes.T).view("<i8").reshape(-1).copy()


def _put_ints(body: bytes, ints: np.ndarray) -> bytes:
    shuffled = np.ascontiguousarray(ints.astype("<i8").view(np.uint8).reshape(-1, 8).T).tobytes()
    return body[:16] + shuffled + body[16 + len(shuffled):]


def test_table_inflating_past_its_cap_is_refused(tmp_path):
    tensors, meta = _load("v2-golomb.pack")
    bomb = {**tensors, "table": torch.frombuffer(bytearray(zlib.compress(b"\0" * (64 << 20))), dtype=torch.uint8)}
    _refused(_signed(tmp_path / "bomb.pack", bomb, meta), match="cap")


@pytest.mark.parametrize("case", ["not deflate", "truncated", "trailing", "count", "names", "unsorted", "ndim",
                                  "negative dim", "dtype", "huge shape", "scale"])
def test_hostile_tables_are_refused(tmp_path, case):
    tensors, meta = _load("v2-golomb.pack")
    body = _table_body(tensors)
    n, d, ints = _ints(body)
    names_at = 16 + 8 * (6 * n + d) + 4 * n
    if case == "not deflate":
        tensors = {**tensors, "table": torch.tensor(list(b"not deflate data"), dtype=torch.uint8)}
    elif case == "truncated":
        blob = zlib.compress(body)[:-4]
        tensors = {**tensors, "table": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    elif case == "trailing":
        tensors = {**tensors, "table": torch.frombuffer(bytearray(zlib.compress(body) + b"x"), dtype=torch.uint8)}
    elif case == "count":
        tensors = _with_table(tensors, struct.pack("<QQ", 10 ** 15, d) + body[16:])
    elif case == "names":
        tensors = _with_table(tensors, body[:names_at] + json.dumps(["a", 5, "c", "d"]).encode())
    elif case == "unsorted":
        names = json.loads(body[names_at:])
        tensors = _with_table(tensors, body[:names_at] + json.dumps(names[::-1]).encode())
    else:
        column = {"ndim": 0, "dtype": 1}.get(case)
        if column is not None:
            ints[column * n] = MAX_NDIM + 1 if case == "ndim" else 9
        elif case == "negative dim":
            ints[6 * n] = -4
        elif case == "huge shape":
            ints[6 * n:6 * n + 2] = 1 << 31
        else:  # scale: +inf in float32 (byte planes: 0x7f800000 little-endian)
            at = 16 + 8 * (6 * n + d)
            planes = bytearray(body[at:at + 4 * n])
            for j, byte in enumerate((0x00, 0x00, 0x80, 0x7F)):
                planes[j * n] = byte
            body = body[:at] + bytes(planes) + body[at + 4 * n:]
        tensors = _with_table(tensors, _put_ints(body, ints) if case != "scale" else body)
    _refused(_signed(tmp_path / "t.pack", tensors, meta))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_version_2_fixture_still_reads(encoding):
    """Written by tests/fixtures/make_pack_fixtures.py at version 2; must read in later versions."""
    path = FIXTURES / f"v2-{encoding}.pack"
    pack = read_pack(path, expected_base="builtin:tiny-llama")
    assert (pack.density, pack.alpha, pack.scope, pack.encoding) == (0.2, 1.5, "tensor", encoding)
    assert [t.nnz for _, t in sorted(pack.tensors.items())] == [26, 19, 26, 19]
    assert [t.dtype for _, t in sorted(pack.tensors.items())] == ["float32", "float32", "bfloat16", "bfloat16"]
    _assert_same(path)
    assert unpack_recovery(pack) is None and read_pack_dense(path).recovery() is None


def test_version_3_fixture_reads_and_adds_the_seeded_d_back():
    """Written by tests/fixtures/make_pack_fixtures.py at version 3 (recovery D stored as D − D₀)."""
    from adapterhub_c.training.recovery import seeded_d_init

    path = FIXTURES / "v3-golomb.pack"
    pack = read_pack(path, expected_base="builtin:tiny-llama")
    assert (pack.method, pack.recovery_config["init_seed"], pack.recovery_config["d_from_init"]) == ("delta-fit", 9, True)
    assert [t.nnz for _, t in sorted(pack.tensors.items())] == [26, 19, 26, 19, 13, 10, 13, 10]
    _assert_same(path)
    for state, config in (unpack_recovery(pack), read_pack_dense(path).recovery()):
        assert "d_from_init" not in config and config["init_seed"] == 9
        for layer in (0, 1):
            name = f"model.layers.{layer}.self_attn.q_proj"
            change = state[f"{name}.recovery_D"] - seeded_d_init(name, 2, 32, 9)
            # what is left after taking D₀ away is the packed ternary change: 13 entries of one size
            nz = change[change.abs() > 1e-6]
            assert nz.numel() == 13 and torch.allclose(nz.abs(), nz.abs()[0].expand(13), rtol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_version_1_and_2_fixtures_decode_to_the_same_adapter(encoding):
    """The fixtures pack the same seeded factors: the format changed, the tensors did not (the raw
    lm_head copy is left out: the torch that wrote version 1 drew other numbers for it)."""
    v1 = read_pack_dense(FIXTURES / f"v1-{encoding}.pack").tensors
    v2 = read_pack_dense(FIXTURES / f"v2-{encoding}.pack").tensors
    assert list(v1) == list(v2) and all(torch.equal(_bits(v1[n]), _bits(v2[n])) for n in v1)
    _assert_same(FIXTURES / f"v1-{encoding}.pack")


def test_writer_refuses_tensors_of_too_many_dimensions(tmp_path):
    adapter = LoraAdapter(dict(CONFIG), {"a.lora_A.weight": torch.randn(*[2] * (MAX_NDIM + 1))})
    with pytest.raises(UsageError, match="dimensions"):
        write_pack(pack_adapter(adapter, density=0.5, base="b", source_digest="x"), tmp_path / "p.pack")


# ---- size ------------------------------------------------------------------------------------
def _smollm2_shaped_lora() -> LoraAdapter:
    """r = 16 on q/k/v/o of 30 blocks with SmolLM2-135M's shapes (1.84 M parameters, 240 tensors)."""
    g = torch.Generator().manual_seed(17)
    tensors = {}
    for layer in range(30):
        for proj, out in (("q", 576), ("k", 192), ("v", 192), ("o", 576)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}_proj"
            tensors[f"{key}.lora_A.weight"] = torch.randn(16, 576, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 16, generator=g) * (0.5 + layer / 30)
    return LoraAdapter(dict(CONFIG, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), tensors)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_pack_file_within_5_percent_of_the_entropy_bound(tmp_path, scope):
    """Header, table and padding included, at k = 10% on LoRA shapes (version 1: 1.31-1.37)."""
    adapter = _smollm2_shaped_lora()
    pack = pack_adapter(adapter, density=0.1, base="builtin:smollm2-135m", scope=scope,
                        source_digest=tensors_digest(adapter.tensors))
    write_pack(pack, tmp_path / "p.pack")
    totals = inspect_pack(tmp_path / "p.pack")["totals"]
    assert totals["file_bits_per_param"] <= 1.05 * totals["entropy_bits_per_param"]


def _mutate_v2(rng: random.Random, tensors: dict, meta: dict) -> tuple[dict, dict]:
    """One change: table bytes (inflated, changed, deflated again), a stream, a key or a metadata value."""
    tensors, meta = dict(tensors), dict(meta)
    roll = rng.random()
    if roll < 0.5:
        body = bytearray(_table_body(tensors))
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        tensors = _with_table(tensors, bytes(body))
    elif roll < 0.8:
        key = rng.choice([k for k in tensors if k != "table"])
        flat = tensors[key].reshape(-1)
        tensors[key] = flat[:rng.randrange(flat.numel() + 1)] if rng.random() < 0.5 else torch.cat([flat, flat[:2]])
    elif roll < 0.9:
        del tensors[rng.choice(sorted(tensors))]
    else:
        key = rng.choice(sorted(k for k in meta if k != "pack_digest"))
        meta[key] = rng.choice(["", "1", "nan", "[]", "{}", "golomb", "bitmask", "tensor", "0.5", "7"])
    return tensors, meta


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_version_2_mutation_campaign_raises_only_project_errors(tmp_path, encoding):
    import tracemalloc

    rng = random.Random(170 + len(encoding))
    base = _load(f"v2-{encoding}.pack")
    tracemalloc.start()
    try:
        for i in range(200):
            path = _signed(tmp_path / f"m{i}.pack", *_mutate_v2(rng, *base))
            tracemalloc.reset_peak()
            verdict = _same_verdict(path)
            assert (_outcome(lambda p=path: read_pack(p)) == "refused") == (verdict == "refused")
            assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


# ---- decoding into another dtype ---------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_decoding_into_a_dtype_equals_the_numpy_decode_cast(tmp_path, monkeypatch, encoding, target):
    """Every source dtype (mixed in one pack) into ``target``: the numpy decoder's tensors cast,
    bit for bit, whatever the threads; raw tensors cast as well."""
    monkeypatch.setattr(dense_mod, "PARALLEL_MIN_NUMEL", 0)
    adapter = _adapter(DTYPES, seed=4)
    adapter.tensors["base_model.model.lm_head.weight"] = torch.randn(3, 5)  # a raw (modules_to_save) tensor
    pack = pack_adapter(adapter, density=0.3, alpha=1.5, base="b", scope="tensor", encoding=encoding,
                        source_digest="x")
    write_pack(pack, tmp_path / "p.pack")
    ref = unpack_to_adapter(read_pack(tmp_path / "p.pack")).tensors
    for threads in ("1", "2"):
        monkeypatch.setenv("ADAPTERHUB_DECODE_THREADS", threads)
        for impl in ("numba", "ref"):
            got = read_pack_dense(tmp_path / "p.pack", impl=impl, dtype=target).to_adapter().tensors
            assert list(got) == list(ref)
            for name, t in ref.items():
                assert got[name].dtype == target and got[name].shape == t.shape, name
                assert torch.equal(_bits(got[name]), _bits(t.to(target))), (impl, threads, name)


def test_decoding_into_a_dtype_keeps_recovery_tensors_in_their_own(tmp_path):
    path = FIXTURES / "v3-golomb.pack"
    want = read_pack_dense(path)
    got = read_pack_dense(path, dtype=torch.float16)
    for (state, _), (ref, _) in ((got.recovery(), want.recovery()),):
        assert all(torch.equal(_bits(state[k]), _bits(ref[k])) for k in ref)
    lora = got.to_adapter().tensors
    assert all(t.dtype == torch.float16 for t in lora.values())


def test_a_scale_that_does_not_fit_the_target_dtype_is_refused(tmp_path):
    adapter = _lora({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((2, 8), 1e6)})
    write_pack(pack_adapter(adapter, density=0.5, base="b", source_digest="x"), tmp_path / "p.pack")
    assert torch.isinf(unpack_to_adapter(read_pack(tmp_path / "p.pack")).tensors[
        "base_model.model.layers.0.q_proj.lora_A.weight"].to(torch.float16)).any()
    for impl in ("numba", "ref"):
        with pytest.raises(UsageError, match="does not fit float16"):
            read_pack_dense(tmp_path / "p.pack", impl=impl, dtype=torch.float16)
        read_pack_dense(tmp_path / "p.pack", impl=impl, dtype=torch.bfloat16)  # bf16 holds it
    with pytest.raises(UsageError, match="cannot be decoded into"):
        read_pack_dense(tmp_path / "p.pack", dtype=torch.int8)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_corrupt_packs_are_refused_when_decoded_into_a_dtype(tmp_path, encoding):
    """A flipped payload byte, a changed header value, a truncated file: refused on the fast path too."""
    pack = pack_adapter(_smollm2_shaped_lora(), density=0.1, base="b", scope="tensor", encoding=encoding,
                        source_digest="x")
    good = tmp_path / "good.pack"
    write_pack(pack, good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    flipped = bytearray(data)
    flipped[-100] ^= 0x10  # in the streams (the last tensor's data)
    header = data.replace(b'"density":"0.1"', b'"density":"0.2"')
    assert header != data
    for name, content in (("flipped", bytes(flipped)), ("header", header), ("truncated", data[:len(data) // 2]),
                          ("truncated header", data[:8 + n // 2])):
        (tmp_path / name).write_bytes(content)
        for dtype in (torch.float16, torch.bfloat16):
            with pytest.raises(IntegrityError, match="corrupt|truncated|digest"):
                read_pack_dense(tmp_path / name, dtype=dtype)


# ---- LoRA keys: the string fast path against the key regex ---------------------------------------
def test_lora_key_part_agrees_with_the_key_regex_on_any_key():
    from adapterhub_c.adapters import lora as lora_mod

    def reference(key):
        m = lora_mod._ANY_KEY_RE.match(key)
        if m is None or key != lora_mod.canonical_key(key):
            return None
        return lora_mod._strip(m["module"]), m["part"] + (".bias" if key.endswith(".bias") else "")

    pieces = ["base_model.model.", "base_model", ".model", "model.layers.0", ".", "..", "q_proj", ".lora_A",
              ".lora_B", "lora_A", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector", ".weight",
              ".bias", ".default", "\n", "x", ".lora_", "lora_AB", ".modules_to_save.default."]
    rng = random.Random(29)
    keys = [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{p}" for i in range(3)
            for p in ("A.weight", "B.weight", "B.bias", "A.bias", "embedding_A", "magnitude_vector")]
    keys += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))) for _ in range(20000)]
    keys += ["base_model.model." + k for k in keys[-5000:]]
    want = [reference(key) for key in keys]
    assert [lora_mod.lora_key_part(key) for key in keys] == want
    assert sum(w is not None for w in want) > 500  # the campaign reaches both answers
    # split together: chunks of prefixed keys (the joined checks pass) and of any keys (they fail)
    prefixed = [i for i, k in enumerate(keys) if k.startswith(lora_mod.PREFIX) and "\n" not in k]
    for chunk in ([prefixed[a:a + 50] for a in range(0, len(prefixed), 50)]
                  + [list(range(a, a + 50)) for a in range(0, len(keys) - 50, 997)]):
        assert lora_mod.lora_key_parts([keys[i] for i in chunk]) == [want[i] for i in chunk]
    assert lora_mod.lora_key_parts([]) == []


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_geometry_refusals_while_other_threads_decode(tmp_path, monkeypatch, threads):
    """The checks no decoder relies on run while the streams decode: a pack whose config does not
    fit its factors, or whose dtype a scale does not fit, is still refused, with the same error
    as before the decode (ahead of a broken stream), whatever the threads."""
    monkeypatch.setattr(dense_mod, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setenv("ADAPTERHUB_DECODE_THREADS", threads)
    adapter = _smollm2_shaped_lora()
    path = tmp_path / "p.pack"
    write_pack(pack_adapter(adapter, density=0.1, base="b", scope="tensor", source_digest="x"), path)
    t, meta = _load_path(path)
    config = json.loads(meta["adapter_config"])
    bad_rank = _signed(tmp_path / "rank.pack", t, {**meta, "adapter_config": json.dumps({**config, "r": 8})})
    bits = t["bits"].clone()
    bits[-40:] = 255  # and a broken stream in the last tensors
    both = _signed(tmp_path / "both.pack", {**t, "bits": bits},
                   {**meta, "adapter_config": json.dumps({**config, "r": 8})})
    for bad in (bad_rank, both):
        for dtype in (None, torch.float16):
            for impl in ("numba", "ref"):
                with pytest.raises(IntegrityError, match="geometry is inconsistent.*rank 16"):
                    read_pack_dense(bad, impl=impl, dtype=dtype)
    with pytest.raises(IntegrityError, match="golomb"):
        read_pack_dense(_signed(tmp_path / "stream.pack", {**t, "bits": bits}, meta))
    assert read_pack_dense(path, dtype=torch.float16).to_adapter().tensors.keys() == adapter.tensors.keys()
