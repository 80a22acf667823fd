"""The hostile-input campaign (issue 20), shared by ``tests/test_hostile.py`` (a few hundred
seeded cases, in the suite) and ``benchmarks/fuzz.py`` (the full campaign, ≥ 10,000).

Four families, each a seeded generator of cases and a runner that classifies every outcome:

- **pack files**: the version-1 fixtures with bytes flipped, cut short, or a header field,
  index cell, scale or stream changed and the digest re-signed (anyone can recompute it, so
  the change reaches the parser and the decoder);
- **adapter folders**: a PEFT LoRA with a config field set to a hostile value, its JSON
  garbled, a safetensors header entry changed, weight bytes flipped or keys renamed;
- **HTTP requests** to a loopback Hub server: odd targets (control characters, non-Latin-1
  names, 5,000-character names), malformed JSON / ndjson bodies, huge headers and ranges;
- **names and secrets**: hostile artefact names against the one name rule, URLs with
  credentials against ``redact_url``.

Outcomes: ``refused`` (only IntegrityError / UsageError), ``accepted`` (the result is checked:
finite, in range, shapes as claimed), ``accepted_invalid`` (accepted, but the check failed),
``unexpected:<Type>`` (any other exception), ``http_5xx`` and ``dropped`` for requests. Memory:
the process's peak resident size (``ru_maxrss``, which sees torch's allocations too) is read
after every case; growth above the campaign's start by more than ``ALLOC_CAP`` counts as
``over_cap`` for the case that caused it (the peak only grows, so no over-cap case is missed).
"""
from __future__ import annotations

import base64
import http.client
import json
import math
import random
import resource
import socket
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.packing import read_pack, read_pack_dense, unpack_to_adapter
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.packing.format import MIN_NUMEL_ALLOWANCE

FIXTURES = Path(__file__).parent / "fixtures"
ALLOWED = (IntegrityError, UsageError)
# what a reader may legitimately allocate for a tiny pack (MIN_NUMEL_ALLOWANCE elements at ~9
# bytes each, see packing/format.py) plus headroom for the interpreter
ALLOC_CAP = 9 * MIN_NUMEL_ALLOWANCE + (32 << 20)

HOSTILE_VALUES = [None, True, False, 0, -1, 1, 7, 2**31, 2**63 - 1, 2**64, -2**63, 1.5, 1e308, -1e308,
                  float("nan"), float("inf"), float("-inf"), "", "x", "0", "-1", "nan", "inf", "1e12", "7",
                  "(", "[a-", "*", "a" * 5000, "\x00", "\u202e", "日本", [], {}, [1], [-1, 4], ["x"], [None],
                  {"a": 1}, {"(": 4}, [[[]]], [10**12], [1e12], [2**62, 2**62]]


class AcceptedThenRefused(Exception):
    """Validation passed but using the result failed (counted as ``unexpected:AcceptedThenRefused``)."""


class Tally:
    """Outcome counts per family, with an example of each unexpected kind and the peak memory."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}
        self.examples: dict[str, str] = {}
        self.peak: dict[str, int] = {}
        self.start_rss = _max_rss()  # in a test process, earlier tests' peak hides growth below it

    def add(self, family: str, outcome: str, detail: str = "", rss: int = 0) -> None:
        """Count one case; ``rss``: the peak resident size after it (0: not measured)."""
        peak = max(0, rss - self.start_rss)
        self.counts.setdefault(family, Counter())[outcome] += 1
        self.counts[family]["cases"] += 1
        if peak > ALLOC_CAP:
            self.counts[family]["over_cap"] += 1
        self.peak[family] = max(self.peak.get(family, 0), peak)
        if outcome not in ("refused", "accepted") and outcome not in self.examples:
            self.examples[f"{family}/{outcome}"] = detail[:300]

    def bad(self) -> dict[str, int]:
        """Counts that must be zero: unexpected exceptions, invalid acceptances, 5xx, drops, over cap."""
        out: Counter = Counter()
        for family, c in self.counts.items():
            for k, v in c.items():
                if k.startswith(("unexpected", "accepted_invalid", "http_5xx", "dropped", "over_cap")):
                    out[f"{family}/{k}"] += v
        return dict(out)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measured(fn: Callable[[], str]) -> tuple[str, str, int]:
    """(outcome, detail, the process's peak resident size after it) of one case."""
    try:
        outcome, detail = fn(), ""
    except ALLOWED as e:
        outcome, detail = "refused", str(e)
    except Exception as e:  # noqa: BLE001 - the campaign's point: classify, never crash
        outcome, detail = f"unexpected:{type(e).__name__}", f"{type(e).__name__}: {e}"
    return outcome, detail, _max_rss()


# ---- pack files -----------------------------------------------------------------------------
def load_fixture(name: str) -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    """(bytes, tensors, metadata) of ``tests/fixtures/<name>.pack`` (e.g. ``v2-golomb``)."""
    data = (FIXTURES / f"{name}.pack").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data, dict(st_load(data)), dict(json.loads(data[8:8 + n])["__metadata__"])


def _signed(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    meta = {k: v for k, v in meta.items() if k != "pack_digest"}
    meta["pack_digest"] = tensors_digest(tensors, meta)
    return st_save(tensors, metadata=meta)


def _hostile_text(rng: random.Random) -> str:
    v = rng.choice(HOSTILE_VALUES)
    return v if isinstance(v, str) and rng.random() < 0.5 else json.dumps(v)


FIXTURE_NAMES = ("v1-golomb", "v1-bitmask", "v2-golomb", "v2-bitmask")


def pack_cases(rng: random.Random, n: int) -> Iterator[tuple[str, bytes]]:
    """``n`` (kind, file bytes) mutations of the fixtures of both format versions."""
    fixtures = {name: load_fixture(name) for name in FIXTURE_NAMES if (FIXTURES / f"{name}.pack").is_file()}
    v1 = ["flip", "truncate", "meta", "tensor_info", "index", "scales", "stream", "drop_tensor",
          "scale_bounds", "scale_bounds", "empty_stream", "cross_geometry", "cross_geometry"]
    v2 = ["flip", "truncate", "meta", "table", "table", "stream", "drop_tensor",
          "scale_bounds", "scale_bounds", "empty_stream"]
    for _ in range(n):
        fixture = rng.choice(sorted(fixtures))
        data, tensors, meta = fixtures[fixture]
        kind = rng.choice(v1 if fixture.startswith("v1") else v2)
        tensors = {k: v.clone() for k, v in tensors.items()}
        meta = dict(meta)
        if kind == "flip":
            b = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            yield kind, bytes(b)
            continue
        if kind == "truncate":
            yield kind, data[:rng.randrange(len(data))]
            continue
        if kind == "meta":
            meta[rng.choice(sorted(meta))] = _hostile_text(rng)
        elif kind == "tensor_info":
            info = json.loads(meta["tensors"])
            row = rng.choice(info)
            row[rng.randrange(len(row))] = rng.choice(HOSTILE_VALUES)
            meta["tensors"] = json.dumps(info)
        elif kind == "table":  # version 2: the deflated table, changed inside and re-deflated
            raw = bytearray(zlib.decompress(tensors["table"].numpy().tobytes()))
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
            if rng.random() < 0.2:
                raw = raw[:rng.randrange(len(raw))]
            tensors["table"] = torch.frombuffer(bytearray(zlib.compress(bytes(raw))), dtype=torch.uint8)
        elif kind == "index":
            index = tensors["index"]
            r, c = rng.randrange(index.shape[0]), rng.randrange(index.shape[1])
            index[r, c] = rng.choice([0, -1, 1, 2**31, 2**62, 2**63 - 1, -2**63, int(index[r, c]) + rng.randint(-3, 3)])
        elif kind in ("scale_bounds", "empty_stream", "cross_geometry"):
            _ROUND3_PACK[kind](rng, tensors, meta)
        elif kind == "scales":
            scales = tensors["scales"]
            scales[rng.randrange(scales.numel())] = rng.choice([0.0, -1.0, 1e38, float("nan"), float("inf"), 1e-45])
        elif kind == "stream":
            key = rng.choice([k for k in ("bits", "pos", "neg") if k in tensors])
            t = tensors[key].view(torch.uint8) if tensors[key].dtype != torch.uint8 else tensors[key]
            if t.numel():
                for _ in range(rng.randint(1, 4)):
                    t[rng.randrange(t.numel())] = rng.randrange(256)
        else:
            del tensors[rng.choice(sorted(tensors))]
        yield kind, _signed(tensors, meta)


# round three (issue 28): the mutations that reached the pack holes the first campaign missed
SCALES = [2, 3, 16, 1024, 2**20, 2**31, 2**40]


def _scale_bounds(rng: random.Random, tensors: dict, meta: dict) -> None:
    """A header number that sizes what the reader allocates, multiplied: density, a shape
    entry, an index cell (v1) or one of the table's leading counts or cells (v2)."""
    k = rng.choice(SCALES)
    where = rng.choice(["density", "shape", "index"] if "index" in tensors else ["density", "table", "table"])
    if where == "density":
        meta["density"] = rng.choice([repr(float(meta["density"]) * k), "1", "1.0", "0.9999999"])
    elif where == "shape":
        info = json.loads(meta["tensors"])
        row = rng.choice(info)
        row[1][rng.randrange(len(row[1]))] *= k
        meta["tensors"] = json.dumps(info)
    elif where == "index":
        index = tensors["index"]
        r, c = rng.randrange(index.shape[0]), rng.randrange(index.shape[1])
        index[r, c] = min(int(index[r, c]) * k, 2**63 - 1)
    else:
        raw = bytearray(zlib.decompress(tensors["table"].numpy().tobytes()))
        if rng.random() < 0.5:  # the little-endian counts at the front
            at = rng.choice([0, 8])
            (v,) = struct.unpack_from("<Q", raw, at)
            struct.pack_into("<Q", raw, at, min(v * k, 2**64 - 1))
        else:
            at = rng.randrange(16, len(raw))
            raw[at] = min(raw[at] * k, 255)
        tensors["table"] = torch.frombuffer(bytearray(zlib.compress(bytes(raw))), dtype=torch.uint8)


def _empty_stream(rng: random.Random, tensors: dict, meta: dict) -> None:
    """A stream (golomb bits, bitmask planes) emptied while every shape still claims elements,
    sometimes with a shape scaled up as well."""
    key = rng.choice([k for k in ("bits", "pos", "neg") if k in tensors])
    tensors[key] = tensors[key][:0].clone()
    if "tensors" in meta and rng.random() < 0.5:
        _scale_bounds(rng, tensors, meta)


def _cross_geometry(rng: random.Random, tensors: dict, meta: dict) -> None:
    """Shapes that are fine one by one and wrong together: A and B of a module swapped or given
    another rank, two modules' geometries exchanged, a rank off by one (same element count kept
    where it can be, so the streams still decode)."""
    info = json.loads(meta["tensors"])
    op = rng.randrange(4)
    i, j = rng.sample(range(len(info)), 2)
    if op == 0:
        info[i][1], info[j][1] = info[j][1], info[i][1]
    elif op == 1:
        info[i][1] = info[i][1][::-1]
    elif op == 2:
        a, b = info[i][1]
        if a % 2 == 0:
            info[i][1] = [a // 2, b * 2]
    else:
        info[i][1][0] += rng.choice([-1, 1])
    meta["tensors"] = json.dumps(info)


_ROUND3_PACK = {"scale_bounds": _scale_bounds, "empty_stream": _empty_stream, "cross_geometry": _cross_geometry}


def _geometry_ok(adapter) -> bool:
    """Every decoded module's A [r, in] and B [out, r] agree on r."""
    return all(layer.A.shape[0] == layer.B.shape[1] for layer in adapter.layers().values())


def _check_pack(path: Path) -> str:
    """Both readers: the numpy reference (``read_pack``) and the compiled one the runtime uses
    (``read_pack_dense``) must refuse the same files and, when they accept, agree bit for bit."""
    results = []
    for read in (lambda: unpack_to_adapter(read_pack(path)), lambda: read_pack_dense(path)):
        try:
            results.append(read())
        except ALLOWED as e:
            results.append(e)
    adapter, dense = results
    if isinstance(adapter, Exception) and isinstance(dense, Exception):
        raise adapter  # refused by both
    if isinstance(adapter, Exception) or isinstance(dense, Exception):
        return "accepted_invalid"  # one reader accepts what the other refuses
    for name, t in dense.tensors.items():
        if not torch.equal(t, adapter.tensors[name]):
            return "accepted_invalid"
    pack = dense
    if not (0 < pack.density <= 1) or not math.isfinite(pack.alpha) or pack.alpha <= 0:
        return "accepted_invalid"
    for t in adapter.tensors.values():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return "accepted_invalid"
    if not _geometry_ok(adapter):
        return "accepted_invalid"
    return "accepted"


def warm_up(tmp: Path) -> None:
    """Read every seed fixture once through both readers: the compiled decoder's JIT (numba,
    LLVM: ~150 MB) must not count as a case's allocation. Call before creating the Tally."""
    for name in FIXTURE_NAMES:
        path = tmp / f"warm-{name}.pack"
        path.write_bytes(load_fixture(name)[0])
        _check_pack(path)


def run_pack_cases(tally: Tally, tmp: Path, seed: int, n: int) -> None:
    rng = random.Random(seed)
    path = tmp / "case.pack"
    for kind, data in pack_cases(rng, n):
        path.write_bytes(data)
        outcome, detail, peak = _measured(lambda: _check_pack(path))
        tally.add("pack", outcome, f"{kind}: {detail}", peak)


# ---- adapter folders ------------------------------------------------------------------------
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
               "peft_type", "modules_to_save", "fan_in_fan_out", "base_model_name_or_path"]


def seed_adapter() -> LoraAdapter:
    """A valid q/v LoRA (r = 4) of the tiny Llama's shapes (v_proj is 32 wide: grouped KV), seeded."""
    g = torch.Generator().manual_seed(20)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(4, 64, generator=g)
            tensors[f"{p}.lora_B.weight"] = torch.randn(64 if proj == "q_proj" else 32, 4, generator=g)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "builtin:tiny-llama", "task_type": "CAUSAL_LM"}
    return LoraAdapter(config, tensors)


def _rewrite_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def adapter_cases(rng: random.Random, n: int, folder_bytes: tuple[bytes, bytes]) -> Iterator[tuple[str, bytes, bytes]]:
    """``n`` (kind, config bytes, weights bytes) mutations of the seed adapter folder."""
    cfg_bytes, weights = folder_bytes
    for _ in range(n):
        kind = rng.choice(["config_field", "config_field", "config_text", "header", "data", "keys", "bias",
                           "target_null"])
        cfg, w = cfg_bytes, weights
        if kind in ("bias", "target_null"):
            cfg, w = _use_case(rng, kind, cfg, w)
        elif kind == "config_field":
            config = json.loads(cfg)
            for _ in range(rng.randint(1, 2)):
                key = rng.choice(CONFIG_KEYS)
                if key in ("rank_pattern", "alpha_pattern") and rng.random() < 0.5:
                    config[key] = {rng.choice(["v_proj", "(", "q_proj", "*", ""]): rng.choice(HOSTILE_VALUES)}
                else:
                    config[key] = rng.choice(HOSTILE_VALUES)
            cfg = json.dumps(config).encode()
        elif kind == "config_text":
            choice = rng.randrange(4)
            if choice == 0:
                cfg = cfg[:rng.randrange(len(cfg))]
            elif choice == 1:
                cfg = b"[" * rng.randint(100, 200_000)
            elif choice == 2:
                b = bytearray(cfg)
                b[rng.randrange(len(b))] = rng.randrange(256)
                cfg = bytes(b)
            else:
                cfg = json.dumps(rng.choice(HOSTILE_VALUES)).encode()
        elif kind == "header":
            def edit(h: dict) -> None:
                key = rng.choice([k for k in h if k != "__metadata__"])
                if rng.random() < 0.2:
                    h[key] = rng.choice(HOSTILE_VALUES)
                else:
                    h[key][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(
                        HOSTILE_VALUES + ["F32", "I32", "BF16", "F99", [4, 64], [64, 4], [0, 1024]])
            w = _rewrite_header(w, edit)
        elif kind == "data":
            b = bytearray(w)
            (hn,) = struct.unpack("<Q", w[:8])
            for _ in range(rng.randint(1, 16)):
                b[rng.randrange(8 + hn, len(b))] = rng.choice([0xFF, 0x7F, 0x80, rng.randrange(256)])
            w = bytes(b)
        else:
            tensors = st_load(w)
            key = rng.choice(sorted(tensors))
            op = rng.randrange(5)
            if op == 0:
                tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)
            elif op == 1:
                tensors[key.replace("lora_A", "lora_down").replace("lora_B", "lora_up")] = tensors.pop(key)
            elif op == 2:
                del tensors[key]
            elif op == 3:
                tensors[key.replace("base_model.model.", "")] = tensors.pop(key)
            else:
                tensors[key] = tensors[key].to(rng.choice([torch.int32, torch.float16, torch.bfloat16, torch.int8]))
            w = st_save(tensors)
        yield kind, cfg, w


def _use_case(rng: random.Random, kind: str, cfg: bytes, w: bytes) -> tuple[bytes, bytes]:
    """Round three (issue 28): what validated but could not be used. ``target_null``: a null
    ``target_modules`` (with other fields); ``bias``: a ``lora_B.bias`` of some shape on some module
    (or alone), with ``lora_bias`` true, false or absent."""
    config = json.loads(cfg)
    if kind == "target_null":
        config["target_modules"] = None
        if rng.random() < 0.5:
            config[rng.choice(["rank_pattern", "alpha_pattern"])] = {"v_proj": rng.choice([2, 4, 8])}
        return json.dumps(config).encode(), w
    tensors = st_load(w)
    key = rng.choice(sorted(k for k in tensors if k.endswith(".lora_B.weight")))
    out = tensors[key].shape[0]
    tensors[key.replace(".weight", ".bias")] = torch.zeros(rng.choice([[out], [out - 1], [4], [out, 1], []]))
    if rng.random() < 0.2:  # the bias alone: its module's factors gone
        del tensors[key], tensors[key.replace("lora_B", "lora_A")]
    bias = rng.choice([True, False, None, "yes"])
    if bias is not None:
        config["lora_bias"] = bias
    return json.dumps(config).encode(), st_save(tensors)


_TINY_MODEL: list = []


def loads(adapter) -> bool:
    """What pulls, loads: ``adapter`` attaches to a (fresh copy of the) tiny Llama the way ``use``
    attaches it, and its forward pass is finite."""
    import copy

    from adapterhub_c.adapters.attach import load_adapted
    from adapterhub_c.models.tiny import build_tiny_llama

    if not _TINY_MODEL:
        _TINY_MODEL.append(build_tiny_llama()[0].eval())
    model = load_adapted(copy.deepcopy(_TINY_MODEL[0]), adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    return bool(torch.isfinite(logits).all())


def _check_adapter(folder: Path) -> str:
    from adapterhub_c.hub.validate import validate_lora_folder

    adapter = validate_lora_folder(folder)
    try:
        if not loads(adapter):
            return "accepted_invalid"
    except ALLOWED as e:  # validated, then refused at use: the hole this family looks for
        raise AcceptedThenRefused(str(e)) from None
    for t in adapter.tensors.values():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            return "accepted_invalid"
    layers = adapter.layers()
    if not layers:
        return "accepted_invalid"
    for layer in layers.values():
        if layer.A.shape[0] != layer.B.shape[1] or not math.isfinite(layer.scale) or layer.scale <= 0:
            return "accepted_invalid"
        if not bool(torch.isfinite(layer.delta()).all()):
            return "accepted_invalid"
    return "accepted"


def run_adapter_cases(tally: Tally, tmp: Path, seed: int, n: int) -> None:
    rng = random.Random(seed)
    src = seed_adapter().to_folder(tmp / "seed")
    base = ((src / "adapter_config.json").read_bytes(), (src / "adapter_model.safetensors").read_bytes())
    folder = tmp / "case"
    folder.mkdir(exist_ok=True)
    for kind, cfg, weights in adapter_cases(rng, n, base):
        (folder / "adapter_config.json").write_bytes(cfg)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        outcome, detail, peak = _measured(lambda: _check_adapter(folder))
        tally.add("adapter", outcome, f"{kind}: {detail}", peak)


# ---- HTTP requests to a loopback Hub server ---------------------------------------------------
from hubutil import TOKEN  # noqa: E402  (tests/ is on sys.path for the suite and for benchmarks/fuzz.py)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CARD = "---\nlibrary_name: peft\ntags:\n- lora\n---\n# target\n"
HEADER = {"key": "header", "value": {"summary": "hostile"}}


def raw_request(endpoint: str, request: bytes, timeout: float = 10) -> tuple[int | None, dict[str, str]]:
    """Send raw bytes; (status, headers), or (None, {}) when the server dropped the connection."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        return None, {}
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if ":" in h)}
    return status, headers


def request_bytes(method: str, target: str, headers: dict | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "DELETE"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def file_op(path: str, data: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "encoding": "base64", "content": base64.b64encode(data).decode()}}


COMMITS = [
    ndjson({"key": "header", "value": [1]}),
    ndjson({"key": "header", "value": None}, file_op("a.txt")),
    ndjson(HEADER, {"key": "file", "value": "a.txt"}),
    ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": 5}}),
    ndjson(HEADER, {"key": "file", "value": {"content": "eA=="}}),
    ndjson(HEADER, {"key": "lfsFile", "value": {"path": "a.bin", "oid": 5}}),
    ndjson(HEADER, {"key": "deletedFolder", "value": {"path": 5}}),
    ndjson(HEADER, {"key": "deletedFile", "value": ["README.md"]}),
    ndjson({"key": "header", "value": {"summary": 5}}, file_op("a.txt")),
    ndjson({"key": "header", "value": {"summary": "x", "parentCommit": 5}}, file_op("a.txt")),
    ndjson({"key": "header", "value": {"summary": "x", "description": []}}, file_op("a.txt")),
    ndjson(HEADER) + b"\xff\xfe\n",
]
ODD = ["%00", "%0D", "%0A", "%0D%0A", "..", "%2e%2e", "%E6%97%A5%E6%9C%AC", "%FF", "%25",
       "%20", "~", "@%7B", "*", "a:b", ".git", "%5C", "main", "README.md", "config.json"]


def _odd(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return "a" * rng.choice([97, 256, 1000, 5000])
    return "".join(rng.choice(ODD) for _ in range(rng.randint(1, 3)))


def _odd_target(rng: random.Random) -> str:
    ns, name, rev, path = (rng.choice(["alice", "target", _odd(rng)]) for _ in range(4))
    name = rng.choice(["target", name])
    return rng.choice([
        f"/{ns}/{name}/resolve/{rev}/{path}",
        f"/alice/target/resolve/{rev}/{path}",
        f"/api/models/{ns}/{name}",
        f"/api/models/alice/target/revision/{rev}",
        f"/api/models/alice/target/tree/{rev}/{path}",
        f"/api/models/alice/target/commits/{rev}",
        f"/api/models?limit={_odd(rng)}&search={_odd(rng)}",
    ])


def _mutated_json(rng: random.Random) -> bytes:
    valid = rng.choice([
        {"name": "fuzz", "organization": "alice", "private": False},
        {"files": [{"path": "a.txt", "sample": "", "size": 1}]},
        {"paths": ["README.md", "config.json"]},
        {"content": CARD},
    ])
    raw = json.dumps(valid).encode()
    kind = rng.randrange(5)
    if kind == 0:
        return raw[:rng.randrange(len(raw))]
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == 2:
        return b"[" * rng.randint(1000, 50_000)
    if kind == 3:
        key = rng.choice(list(valid))
        return json.dumps({key: rng.choice([None, 5, "x", [1], {"a": {}}, [[]]])}).encode()
    return json.dumps(rng.choice([[], "x", 5, None, [valid]])).encode()


def hostile_request(rng: random.Random) -> bytes:
    """One seeded hostile request (raw HTTP/1.1 bytes)."""
    kind = rng.randrange(6)
    if kind == 0:
        return request_bytes(rng.choice(["GET", "HEAD"]), _odd_target(rng))
    if kind == 1:
        path = rng.choice(["/api/repos/create", "/api/models/alice/target/preupload/main",
                           "/api/models/alice/target/paths-info/main", "/api/validate-yaml"])
        return request_bytes("POST", path, {**AUTH, "Content-Type": "application/json"}, _mutated_json(rng))
    if kind == 2:
        ops = [HEADER, file_op(_odd(rng).replace("%", "")), rng.choice(COMMITS)]
        body = b"".join(json.dumps(o).encode() + b"\n" if isinstance(o, dict) else o
                        for o in rng.sample(ops, rng.randint(1, 3)))
        return request_bytes("POST", "/api/models/alice/target/commit/main",
                             {**AUTH, "Content-Type": "application/x-ndjson"}, body)
    if kind == 3:
        value = rng.choice(["x" * rng.choice([1000, 20_000, 100_000]), "%0D", "\x7f\xff"])
        return request_bytes("GET", "/api/models/alice/target", {"X-Junk": value})
    if kind == 4:
        rng_value = rng.choice(["bytes=", "bytes=-0", "bytes=5-1", "bytes=1-2,3-4", "bits=0-1",
                                "bytes=" + "9" * rng.randint(18, 6000) + "-", "bytes=-" + "9" * 30,
                                "bytes=0x10-", "bytes= 1 - 2 "])
        return request_bytes("GET", "/alice/target/resolve/main/weights.safetensors", {"Range": rng_value})
    return rng.choice([b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
                       b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"])


def seed_hub(store) -> None:
    """The repo the requests aim at."""
    store.create_repo("alice/target")
    store.commit("alice/target", message="seed", add={
        "README.md": CARD.encode(), "config.json": b'{"a": 1}', "weights.safetensors": bytes(range(256)) * 16})


def run_http_cases(tally: Tally, endpoint: str, seed: int, n: int) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        request = hostile_request(rng)
        try:
            status, _ = raw_request(endpoint, request, timeout=10)
        except OSError as e:  # reset or timeout: the server did not answer
            tally.add("http", "dropped", f"{type(e).__name__}: {request[:120]!r}")
            continue
        rss = _max_rss()  # the server runs in this process (a thread)
        if status is None:
            tally.add("http", "dropped", repr(request[:120]), rss)
        elif status >= 500:
            tally.add("http", "http_5xx", f"{status}: {request[:120]!r}", rss)
        else:
            tally.add("http", "refused" if status >= 400 else "accepted", rss=rss)


# ---- model cards: values YAML allows and JSON does not (round three, hole 5) ---------------------
YAML_VALUES = [".nan", ".NaN", ".inf", "-.inf", "!!float 1e400", "!!binary aGVsbG8=", "!!binary /w==", "!!set {a, b}",
               "0x" + "f" * 40, "0x" + "f" * 4000, '"\\ud800"', "2024-01-01", "2001-12-14t21:59:43.10-05:00", "~",
               "[]", "{}", "{a: .nan}", "[x, .inf]", "[lora, !!binary /w==]", "yes", "'ok'", "12", "-0", "1.5",
               "!!str .nan", "9" * 30, "peft", "org/base", "[org/base, .nan]", "{a: {b: {c: [.inf]}}}"]
CARD_FIELDS = ["tags", "base_model", "library_name", "license", "pipeline_tag", "datasets", "model-index", "x"]


def card_text(rng: random.Random) -> str:
    """A README whose front matter holds 1-4 fields (or keys) with values from YAML_VALUES."""
    lines = ["---"]
    for _ in range(rng.randint(1, 4)):
        field, value = rng.choice(CARD_FIELDS), rng.choice(YAML_VALUES)
        form = rng.randrange(4)
        if form == 0:
            lines.append(f"{field}: {value}")
        elif form == 1:
            lines += [f"{field}:", "- lora", f"- {value}"]
        elif form == 2:
            lines.append(f"{value}: {field}")
        else:
            lines += [f"{field}:", f"  inner: {value}"]
    return "\n".join(lines) + "\n---\n# card\n"


def _card_expected(text: str) -> dict | None:
    """The cardData a Hub must answer for ``text`` (None: no metadata, and a commit refuses it)."""
    from adapterhub_c.hubserver.cardcache import card_metadata

    try:
        return json.loads(json.dumps(card_metadata(text)))
    except Exception:  # noqa: BLE001 - any parse failure means "no metadata"
        return None


def _card_case(endpoint: str, store, repo: str, text: str, full: bool) -> tuple[str, str]:
    """Plant ``text`` (past the upload check), read it back, list, then commit it over HTTP."""
    expected = _card_expected(text)
    store.commit(repo, message="card", add={"README.md": text.encode()})
    status, body = _get_json(endpoint, f"/api/models/{repo}")
    if status != 200:
        return ("http_5xx" if status is None or status >= 500 else "accepted_invalid"), f"info {status}"
    if body.get("cardData") != (expected if expected is not None else {}):
        return "accepted_invalid", f"cardData {str(body.get('cardData'))[:100]} for {text[:100]!r}"
    if full:
        status, _ = _get_json(endpoint, "/api/models?full=true&cardData=true")
        if status != 200:
            return "http_5xx", f"listing {status}"
    status, _ = raw_request(endpoint, request_bytes(
        "POST", f"/api/models/{repo}/commit/main", {**AUTH, "Content-Type": "application/x-ndjson"},
        ndjson(HEADER, file_op("README.md", text.encode()))), timeout=30)
    if status is None or status >= 500:
        return "http_5xx", f"commit {status}"
    if (status == 400) != (expected is None) or status not in (200, 400):
        return "accepted_invalid", f"commit answered {status} for {text[:100]!r}"
    return ("refused" if status == 400 else "accepted"), ""


def _get_json(endpoint: str, target: str) -> tuple[int | None, dict]:
    import httpx2

    try:
        r = httpx2.get(endpoint + target, timeout=30)
    except httpx2.TransportError:
        return None, {}
    return r.status_code, (r.json() if r.status_code == 200 and target.count("/") > 2 else {})


def run_card_cases(tally: Tally, endpoint: str, store, seed: int, n: int) -> None:
    """Cards with YAML-only values: model info and listings always 200 with cardData as JSON data
    (or {}), a commit of the same README 400 exactly when it has no JSON metadata."""
    rng = random.Random(seed)
    repos = [f"cards/c{i}" for i in range(8)]
    for repo in repos:
        if not store.exists(repo):
            store.create_repo(repo)
    for i in range(n):
        text = card_text(rng)
        try:
            outcome, detail = _card_case(endpoint, store, repos[i % len(repos)], text, full=i % 25 == 0)
        except OSError as e:
            outcome, detail = "dropped", f"{type(e).__name__}: {text[:100]!r}"
        tally.add("card", outcome, detail, _max_rss())


# ---- names and secrets ------------------------------------------------------------------------
NAME_PIECES = ["..", ".", "/", "\\", " ", "\x00", "\n", "\r", "\u202e", "日本", "a", "b", "-", "_", "~", "%2e",
               "con", ":", "@", "*", "$(id)", "`", "'", "\""]


def run_name_cases(tally: Tally, seed: int, n: int) -> None:
    """Random names against the name rule; a name that passes must be Hub-like (no escape)."""
    import re

    from adapterhub_c.registry.artifacts import check_name_syntax

    good = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$")
    rng = random.Random(seed)
    for _ in range(n):
        name = "".join(rng.choice(NAME_PIECES) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.05:
            name = "a" * rng.choice([96, 97, 1000])

        def check(name=name) -> str:
            check_name_syntax(name)
            parts = name.split("/")
            ok = good.match(name) and not any(p in (".", "..") for p in parts) and all(len(p) <= 96 for p in parts)
            return "accepted" if ok else "accepted_invalid"

        outcome, detail, rss = _measured(check)
        tally.add("name", outcome, f"{name!r}: {detail}", rss)


def run_secret_cases(tally: Tally, seed: int, n: int) -> None:
    """URLs (and messages holding them) with credentials: the secret never survives redact_url."""
    from adapterhub_c.fsutil import redact_url

    rng = random.Random(seed)
    for _ in range(n):
        secret = "hf_" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789") for _ in range(20))
        user = rng.choice(["", "user", "u.s-e_r", "x%40y"])
        scheme = rng.choice(["http", "https", "HTTP", "git+https"])
        host = rng.choice(["hub.example", "127.0.0.1:8080", "[::1]:9", "h"])
        url = f"{scheme}://{user}{':' if user else ''}{secret}@{host}/{rng.choice(['', 'api/models', 'a@b'])}"
        text = rng.choice(["{}", "error talking to {}: timeout", "{} and {}", "see <{}>"]).replace("{}", url)
        shown = redact_url(text)
        tally.add("secret", "accepted" if secret not in shown else "accepted_invalid", shown)


# ---- adapt serve: random OpenAI-shaped request bodies ----------------------------------------
# Each field of the OpenAI completions / chat schema, with values of the right type (most of the
# time, so requests also get past validation and run) and of every other JSON type.
_ODD_VALUES = [None, True, False, -1, 0, 1, 2**63, -(2**31), 1e-300, 1e300, -0.0, 0.5, "", "x" * 3000, "日本語\u202e",
               [], {}, [1, "a"], {"a": {"b": [None]}}, "\x00", "NaN"]


def _valid_field(rng: random.Random, field: str, models: list[str]) -> Any:
    """A value of ``field`` the server should accept (small, so accepted requests stay cheap)."""
    choices = {
        "model": lambda: rng.choice(models[:3]) if rng.random() < 0.9 else rng.choice(models),
        "prompt": lambda: rng.choice(["hello", "Reverse the words: a b\nAnswer:", "", " ", "日本", ["a", "b"]]),
        "max_tokens": lambda: rng.randint(0, 6),
        "temperature": lambda: rng.choice([0, 0.0, 1e-300, 1e-6, 0.7, 1.0, 2.0]),
        "top_p": lambda: rng.choice([0.0, 1e-9, 0.5, 1.0]),
        "n": lambda: rng.choice([1, 2]),
        "stream": lambda: rng.random() < 0.3,
        "stop": lambda: rng.choice(["\n", ["a", "b"], None, ""]),
        "seed": lambda: rng.randint(0, 2**31),
        "messages": lambda: [{"role": rng.choice(["user", "system", "assistant"]),
                              "content": rng.choice(["hi", "", "Reverse: x y"])} for _ in range(rng.randint(1, 3))],
        "user": lambda: "fuzz",
        "logprobs": lambda: rng.choice([None, 1]),
        "echo": lambda: rng.random() < 0.2,
    }
    return choices[field]()


_COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "user",
                      "logprobs", "echo"]
_CHAT_FIELDS = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "user"]


def serve_case(rng: random.Random, models: list[str]) -> tuple[str, bytes]:
    """(path, body) of one request: a valid body (half of them), or one with a field of another type,
    missing or unknown, or several such; now and then no JSON object at all. Valid and hostile bodies
    are sent together, so cohorts hold poisoned rows beside good ones."""
    chat = rng.random() < 0.4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    roll = rng.random()
    if roll < 0.03:
        return path, rng.choice([b"", b"[]", b"42", b'"x"', b"{", b"\xff\xfe", b"null"])
    fields = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    body: dict[str, Any] = {f: _valid_field(rng, f, models) for f in fields
                            if f in ("model", "prompt", "messages", "max_tokens") or rng.random() < 0.5}
    for _ in range(0 if roll < 0.5 else rng.choice([1, 1, 1, 2, 4])):
        field = rng.choice(fields)
        r = rng.random()
        if r < 0.6:
            body[field] = rng.choice(_ODD_VALUES)
        elif r < 0.85:
            body.pop(field, None)
        else:
            body[_hostile_text(rng)[:40] or "unknown"] = rng.choice(_ODD_VALUES)
    if "max_tokens" not in body or not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 6:
        body.setdefault("max_tokens", 4)  # keep what the server accepts cheap; odd types still reach it
    return path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def _post(endpoint: str, path: str, body: bytes, token: str, timeout: float) -> int | None:
    """The status of one POST (the whole body read, streams included); None if the connection dropped."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def current_rss() -> int:
    """Resident bytes of this process now (not the peak): what a run must give back."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_serve_cases(tally: Tally, endpoint: str, token: str, models: list[str], seed: int, n: int,
                    threads: int = 8, timeout: float = 60) -> None:
    """``n`` random bodies sent ``threads`` at a time (so they batch into cohorts); 5xx and drops are tallied."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(seed)
    cases = [serve_case(rng, models) for _ in range(n)]

    def one(case: tuple[str, bytes]) -> tuple[int | None, tuple[str, bytes]]:
        return _post(endpoint, *case, token, timeout), case

    with ThreadPoolExecutor(threads) as pool:
        for status, (path, body) in pool.map(one, cases):
            detail = f"{path} {body[:200]!r}"
            if status is None:
                tally.add("serve", "dropped", detail)
            elif status >= 500:
                tally.add("serve", "http_5xx", f"{status}: {detail}")
            else:
                tally.add("serve", "refused" if status >= 400 else "accepted")


SERVE_TOKEN = "fuzz-token"


def serve_world(home: Path) -> tuple[Any, str, list[str]]:
    """A registry with the tiny base, a random LoRA of it and its pack: (registry, base, model names to ask for)."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.registry import Registry
    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.training import peft_io
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.packs import pack_artifact

    reg = Registry(home=home)
    base, _ = add_builtin_base(reg, "builtin:tiny-llama")
    model, _ = load_base_model(reg, base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    lora = peft_io.extract_lora(peft_model)
    lora.config["base_model_name_or_path"] = base.name
    register_artifact(reg, kind="lora", name="fuzz-lora", base_id=base.id, folder=lora.to_folder(home / "lora"))
    pack_artifact(reg, "fuzz-lora", density=0.3, name="fuzz-pack")
    return reg, base.name, [base.name, "fuzz-lora", "fuzz-pack", "fuzz-lora+none", "no-such-model", ""]
