"""The public Python API: the README's example runs as written, results are plain data, the
package imports light, and the CLI is a thin shell over the same functions."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import adapterhub_c
from adapterhub_c import api
from adapterhub_c.errors import AdaptWarning
from adapterhub_c.hub.cards import model_card
from adapterhub_c.hub.client import push_folder
from adapterhub_c.models.builtin import TINY

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_python_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def tiny_lora_repo(hf, tmp_path, home):
    """``demo/tiny-lora`` on the local Hub server that HF_ENDPOINT points at."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.models.tiny import build_tiny_llama

    model, _ = build_tiny_llama()
    torch.manual_seed(0)
    folder = tmp_path / "lora"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": TINY}))
    (folder / "README.md").write_text(model_card(TINY, "tiny-lora"))
    push_folder(folder, "demo/tiny-lora", token=hf.token, endpoint=hf.endpoint)
    return hf


def test_readme_example_pulls_converts_and_packs(tiny_lora_repo, capsys):
    namespace: dict = {}
    exec(compile(_readme_python_example(), str(README), "exec"), namespace)  # noqa: S102 - our own README
    pack, model = namespace["pack"], namespace["model"]
    assert pack.kind == "pack" and pack.created
    assert pack.report["density"] == pytest.approx(0.1)
    assert pack.report["bits_per_param"] < 1 and pack.report["ratio_vs_fp16"] > 1  # tiny tensors: headers weigh
    assert "pack.safetensors" in pack.paths and Path(pack.paths["pack.safetensors"]).is_file()
    assert namespace["lora"].kind == "lora" and namespace["lora"].report["source"].startswith("demo/tiny-lora@")
    assert namespace["converted"].kind in ("lora", "recovered-lora")
    printed = capsys.readouterr().out
    assert pack.name in printed and "smaller than fp16" in printed
    # the loaded stack is the variant with the decoded pack attached, and it runs
    reg = namespace["reg"]
    lineage = api.lineage(pack.name, registry=reg)
    assert lineage["parents"][0]["name"] == namespace["converted"].name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_results_are_frozen_plain_data(reg, home):
    base = api.add_base("builtin:tiny-llama", registry=reg)
    assert isinstance(base, api.Result) and base.kind == "base" and base.created
    assert base.report["params"] > 0 and set(base.paths) >= {"config.json"}
    again = api.add_base("builtin:tiny-llama", registry=reg)
    assert (again.id, again.created) == (base.id, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.name = "other"  # type: ignore[misc]
    # no ORM rows leak out: every field is a builtin type
    for value in dataclasses.asdict(base).values():
        assert type(value).__module__ == "builtins"


def test_default_registry_follows_adapterhub_home(home, monkeypatch):
    monkeypatch.setattr(api, "_default_registries", {})
    res = adapterhub_c.add_base("builtin:tiny-llama")
    assert (home / "registry.db").is_file()
    assert [b["name"] for b in adapterhub_c.list_objects("bases")] == [res.name]


def _register_lopsided_lora(reg, tiny_base, tmp_path) -> None:
    """A LoRA whose v_proj update is ~1e-6 of q_proj's: a global top-k keeps none of it."""
    from adapterhub_c.adapters.lora import LoraAdapter
    from adapterhub_c.registry.artifacts import register_artifact

    torch.manual_seed(0)
    tensors = {}
    for m, scale in (("q_proj", 1.0), ("v_proj", 1e-6)):
        key = f"base_model.model.model.layers.0.self_attn.{m}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, 64) * scale
        tensors[f"{key}.lora_B.weight"] = torch.randn(64, 4) * scale
    folder = LoraAdapter(config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                 "peft_type": "LORA", "base_model_name_or_path": TINY},
                         tensors=tensors).to_folder(tmp_path / "lopsided")
    register_artifact(reg, kind="lora", name="lopsided", base_id=tiny_base.id, folder=folder)


def test_pack_warning_reaches_library_users(reg, tiny_base, tmp_path):
    _register_lopsided_lora(reg, tiny_base, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = api.pack("lopsided", 0.2, scope="global", method="compeft", registry=reg)
    ours = [str(w.message) for w in caught if issubclass(w.category, AdaptWarning)]
    assert ours and "zeroes the whole update of 1 module" in ours[0]
    assert res.warnings == tuple(ours)


def test_cli_prints_the_api_warning_once(cli, reg, tiny_base, tmp_path):
    _register_lopsided_lora(reg, tiny_base, tmp_path)
    r = cli("pack", "lopsided", "--density", "0.2", "--scope", "global", "--method", "compeft")
    assert r.code == 0, r.err
    assert r.err.count("warning: the pack zeroes the whole update of 1 module(s)") == 1
    assert "--scope tensor keeps every module" in r.err


def test_every_command_default_is_the_workflows_own(cli):
    import re

    from adapterhub_c.training.loop import TrainConfig

    train, convert = api.TrainOptions.defaults(), api.ConvertOptions.defaults()
    assert api.TRAIN_DEFAULTS == train and api.CONVERT_DEFAULTS == convert
    assert train["steps"] == TrainConfig.steps == convert["steps"]
    assert convert["lr"] == TrainConfig.lr
    assert api.ConvertOptions().train_config()["batch_size"] == TrainConfig.batch_size
    for command in (("batch", "convert"), ("convert",)):
        out = " ".join(cli(*command, "--help").out.split())
        assert re.search(rf"--steps INTEGER .*?\[default: {convert['steps']}\]", out)
        assert re.search(rf"--recover-rank INTEGER .*?\[default: {convert['recover_rank']}\]", out)


def test_batch_pack_alpha_is_parsed_by_the_library(reg, tiny_base):
    from adapterhub_c.errors import UsageError
    from adapterhub_c.workflows.variants import create_variant

    variant, _ = create_variant(reg, tiny_base, quant="nf4", eval_tokens=0)
    with pytest.raises(UsageError, match="alpha"):
        api.run_batch(registry=reg, variant=variant.name, sources=["artifact:none"], pack_density=0.1,
                      pack_alpha="lots")


def test_import_is_light_and_the_api_is_lazy():
    code = ("import sys, adapterhub_c; "
            "heavy = [m for m in ('torch', 'transformers', 'sqlalchemy', 'adapterhub_c.api') if m in sys.modules]; "
            "print(heavy); adapterhub_c.open_registry; print('adapterhub_c.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
    assert set(adapterhub_c.__all__) - {"__version__"} <= set(api.__all__)
    with pytest.raises(AttributeError):
        adapterhub_c.no_such_function  # noqa: B018


def test_api_names_are_not_shadowed_by_subpackages():
    """``adapterhub_c.pack`` must stay the function even after every subpackage is imported."""
    import importlib
    import pkgutil

    for m in pkgutil.walk_packages(adapterhub_c.__path__, "adapterhub_c."):
        if "migrations" not in m.name and not m.name.endswith("_triton") and ".cli" not in m.name:
            importlib.import_module(m.name)
    for name in adapterhub_c.__all__:
        if name != "__version__":
            assert callable(getattr(adapterhub_c, name)), name


def test_runtime_stack_pulls_in_no_workflow():
    code = ("import sys, adapterhub_c.runtime.stack; "
            "print(sorted(m for m in sys.modules if m.startswith(('adapterhub_c.workflows', 'adapterhub_c.hub', "
            "'adapterhub_c.batch', 'adapterhub_c.api', 'adapterhub_c.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
