"""Hostile adapter folders at pull and validate (issue 20 item 4).

Each bad config field or weight file must end as one line "not a valid LoRA" (or a named
refusal) with exit 2 and nothing registered, never a TypeError from deep inside; files that
used to register but could not be used (``.default.`` keys, NaN or integer weights, hostile
base names) are refused or read correctly.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.hub.client import push_folder
from adapterhub_c.hub.validate import validate_lora_folder

sys.path.insert(0, str(Path(__file__).parent))

TINY = "builtin:tiny-llama"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A PEFT LoRA (q/v, r=4) of the tiny Llama, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(model, cfg).save_pretrained(out)
    _edit(out, base_model_name_or_path=TINY)
    return out


def _edit(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG).read_text())
    cfg.update(changes)
    (folder / CONFIG).write_text(json.dumps(cfg))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


BAD_CONFIGS = {
    "target_modules int": dict(target_modules=5),
    "target_modules list of ints": dict(target_modules=[1, 2]),
    "target_modules bad regex": dict(target_modules="(q_proj"),
    "rank_pattern list": dict(rank_pattern=["v_proj"]),
    "rank_pattern string value": dict(rank_pattern={"v_proj": "4"}),
    "rank_pattern bad regex": dict(rank_pattern={"[v_proj": 4}),
    "alpha_pattern zero": dict(alpha_pattern={"v_proj": 0}),
    "lora_alpha string": dict(lora_alpha="x"),
    "lora_alpha null": dict(lora_alpha=None),
    "lora_alpha zero": dict(lora_alpha=0),
    "lora_alpha inf": dict(lora_alpha=float("inf")),
    "r zero": dict(r=0),
    "r string": dict(r="4"),
    "r bool": dict(r=True),
    "use_rslora string": dict(use_rslora="yes"),
    "modules_to_save string": dict(modules_to_save="lm_head"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fields_are_not_a_valid_lora(lora_dir, tmp_path, case):
    folder = _copy(lora_dir, tmp_path / "a")
    _edit(folder, **BAD_CONFIGS[case])
    with pytest.raises(UsageError, match="not a valid LoRA: adapter_config.json"):
        validate_lora_folder(folder)


def test_deeply_nested_and_huge_configs_are_refused(lora_dir, tmp_path):
    folder = _copy(lora_dir, tmp_path / "a")
    (folder / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match="invalid JSON"):
        validate_lora_folder(folder)
    (folder / CONFIG).write_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}")
    with pytest.raises(UsageError, match="invalid JSON"):
        validate_lora_folder(folder)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit", [
    lambda h: h[_first_tensor(h)].update(data_offsets=[str(v) for v in h[_first_tensor(h)]["data_offsets"]]),
    lambda h: h[_first_tensor(h)].update(shape=[-1, 4]),
    lambda h: h[_first_tensor(h)].update(shape=[1.5, 4]),
    lambda h: h[_first_tensor(h)].update(dtype="F99"),
    lambda h: h[_first_tensor(h)].update(shape=[10**6, 10**6]),
    lambda h: h.__setitem__(_first_tensor(h), "not an object"),
], ids=["string offsets", "negative shape", "float shape", "unknown dtype", "shape beyond data", "entry not object"])
def test_malformed_safetensors_headers_are_integrity_errors(lora_dir, tmp_path, edit):
    folder = _copy(lora_dir, tmp_path / "a")
    _rewrite_header(folder / WEIGHTS, edit)
    with pytest.raises(IntegrityError):
        validate_lora_folder(folder)


@pytest.mark.parametrize("poison,needle", [("nan", "NaN"), ("int", "floating point")])
def test_nan_and_integer_weights_are_refused(lora_dir, tmp_path, poison, needle):
    folder = _copy(lora_dir, tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS))
    key = sorted(tensors)[0]
    if poison == "nan":
        tensors[key][0, 0] = float("nan")
    else:
        tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(IntegrityError, match=needle):
        validate_lora_folder(folder)


def test_missing_lora_alpha_means_peft_default_8(lora_dir, tmp_path):
    """PEFT's LoraConfig defaults lora_alpha to 8 (not r): the scale must follow it."""
    from peft import LoraConfig

    folder = _copy(lora_dir, tmp_path / "a")
    cfg = json.loads((folder / CONFIG).read_text())
    del cfg["lora_alpha"]
    (folder / CONFIG).write_text(json.dumps(cfg))
    adapter = validate_lora_folder(folder)
    peft_alpha = LoraConfig.from_pretrained(str(folder)).lora_alpha
    layer = next(iter(adapter.layers().values()))
    assert layer.scale == peft_alpha / cfg["r"] == 8 / 4


# ---- through `adapt pull`: exit 2, one line, nothing registered ---------------------------------
_counter = iter(range(10**6))


def _publish(hub, folder: Path) -> str:
    repo = f"mallory/hostile-{next(_counter)}"
    push_folder(folder, repo, token=hub.token, endpoint=hub.endpoint)
    return repo


def _one_line_exit_2(r, *needles):
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.code, r.out, r.err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_pull_refuses_hostile_configs_weights_and_base_names(cli, tiny_base, hf, lora_dir, tmp_path):
    cases = []
    for i, changes in enumerate([dict(lora_alpha="x"), dict(r=0), dict(target_modules=[3])]):
        folder = _copy(lora_dir, tmp_path / f"cfg{i}")
        _edit(folder, **changes)
        cases.append((folder, ("not a valid LoRA",)))
    nan = _copy(lora_dir, tmp_path / "nan")
    tensors = load_file(str(nan / WEIGHTS))
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, str(nan / WEIGHTS))
    cases.append((nan, ("not a valid LoRA", "NaN")))
    for i, base in enumerate(["../../etc/passwd", "x" * 10_000, "evil\u202etxt.exe", "/home/me/llama"]):
        folder = _copy(lora_dir, tmp_path / f"base{i}")
        _edit(folder, base_model_name_or_path=base)
        cases.append((folder, ("not a Hub model id", "--base")))
    for folder, needles in cases:
        _one_line_exit_2(cli("pull", _publish(hf, folder)), *needles)
    assert cli("ls", "artifacts", "--json").json() == []
    assert [b["name"] for b in cli("ls", "bases", "--json").json()] == [TINY]


def test_pull_reads_default_keys_and_a_path_base_attaches_with_base(cli, tiny_base, hf, lora_dir, tmp_path):
    """``….lora_A.default.weight`` keys count as modules (they used to count as 0); a LoRA
    whose base is a local path pulls with ``--base``."""
    folder = _copy(lora_dir, tmp_path / "named")
    tensors = load_file(str(folder / WEIGHTS))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, str(folder / WEIGHTS))
    _edit(folder, base_model_name_or_path="/home/me/checkpoints/llama")
    r = cli("pull", _publish(hf, folder), "--base", TINY, "--name", "named", "--json")
    assert r.code == 0, r.err
    shown = cli("show", "named", "--json").json()
    assert shown["metrics"]["modules"] == 4  # q and v of two layers
    assert cli("eval", "named", "--data", "builtin:task/reverse-words", "--max-examples", "1",
               "--max-tokens", "16", "--json").code == 0


# ---- round three, hole 6: what pulls, loads ------------------------------------------------------
def _generates(cli, name: str) -> None:
    r = cli("generate", name, "hello", "--max-new-tokens", "2")
    assert r.code == 0, (name, r.code, r.err[-600:])


def _with_bias(src: Path, dst: Path, *, module_factors: bool = True, **config) -> Path:
    """A copy of ``src`` with a ``lora_B.bias`` on its first module (and, without ``module_factors``,
    that module's lora_A / lora_B removed: a bias alone)."""
    folder = _copy(src, dst)
    tensors = load_file(str(folder / WEIGHTS))
    b_key = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[0]
    tensors[b_key.replace(".weight", ".bias")] = torch.full((tensors[b_key].shape[0],), 0.01)
    if not module_factors:
        del tensors[b_key], tensors[b_key.replace("lora_B", "lora_A")]
    save_file(tensors, str(folder / WEIGHTS))
    _edit(folder, **config)
    return folder


def test_what_pulls_loads(cli, reg, tiny_base, hf, lora_dir, tmp_path):
    # target_modules null: registered, and generate uses the modules its weights name (was a TypeError)
    null = _copy(lora_dir, tmp_path / "null")
    _edit(null, target_modules=None)
    assert cli("pull", _publish(hf, null), "--name", "null-targets").code == 0
    _generates(cli, "null-targets")
    # an extra lora_B.bias that PEFT has no place for (no lora_bias: true), or a bias alone: refused at pull
    _one_line_exit_2(cli("pull", _publish(hf, _with_bias(lora_dir, tmp_path / "bias"))), "not a valid LoRA",
                     "lora_bias")
    _one_line_exit_2(cli("pull", _publish(hf, _with_bias(lora_dir, tmp_path / "alone", module_factors=False,
                                                          lora_bias=True))), "not a valid LoRA", "no lora_A")
    # the same bias with lora_bias: true is what PEFT saves: pulled, and it loads
    ok = _with_bias(lora_dir, tmp_path / "lora-bias", lora_bias=True)
    assert cli("pull", _publish(hf, ok), "--name", "with-bias").code == 0
    _generates(cli, "with-bias")
    # a base the Hub does not have: refused (base add could never complete it), nothing registered
    other = _copy(lora_dir, tmp_path / "other")
    _edit(other, base_model_name_or_path="org/other")
    _one_line_exit_2(cli("pull", _publish(hf, other)), "'org/other' is not on the Hub", "--base",
                     "fits every module")
    assert sorted(b["name"] for b in cli("ls", "bases", "--json").json()) == [TINY]
    assert sorted(a["name"] for a in cli("ls", "artifacts", "--json").json()) == ["null-targets", "with-bias"]
    # a base the Hub has: a reference row, and the pull says so (output and the Result's warnings)
    hf.store.create_repo("org/other")
    repo = _publish(hf, other)
    r = cli("pull", repo, "--name", "other-base")
    assert r.code == 0 and "(reference only)" in r.out, r.err
    assert "warning: base 'org/other' is registered as a reference only" in r.err
    assert "adapt base add org/other" in r.err
    from adapterhub_c import api

    again = api.pull(repo, registry=reg)
    assert any("adapt base add org/other" in w for w in again.warnings)
