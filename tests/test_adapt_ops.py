"""adapt train / convert through the registry and the CLI, on the tiny base."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from adapterhub_c.errors import UsageError
from adapterhub_c.registry import Registry
from adapterhub_c.registry.models import Artifact, Evaluation, Run
from adapterhub_c.runtime.adapters import load_adapter_artifact
from adapterhub_c.workflows.training import convert_adapter, gap_closed, train_adapter

TASK = "builtin:task/reverse-words"
FAST = dict(steps=4, lr=3e-3, batch_size=2, seq_len=48, max_eval_tokens=300, max_eval_examples=2)
IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 44, 120, 200, 17]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One registry shared by the module: tiny base, an NF4 + wanda variant, an ffn-channels
    variant, and a source LoRA (q/v/up/down) trained on the base."""
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.variants import create_variant

    home = tmp_path_factory.mktemp("adapt_ops_home")
    reg = Registry(home=home)
    add_builtin_base(reg, "builtin:tiny-llama")
    nf4, _ = create_variant(reg, "builtin:tiny-llama", quant="nf4", prune="wanda", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0)
    ffn, _ = create_variant(reg, "builtin:tiny-llama", prune="ffn-channels", sparsity=0.5, calib_samples=4,
                            calib_seq_len=64, eval_tokens=0)
    source, report = train_adapter(reg, "builtin:tiny-llama", TASK, rank=4, alpha=8,
                                   targets=["q_proj", "v_proj", "up_proj", "down_proj"], name="src", **FAST)
    yield {"reg": reg, "home": home, "nf4": nf4, "ffn": ffn, "source": source, "report": report}
    reg.close()


def run_cli(home, capsys, *args):
    """Run ``adapt --home HOME ARGS`` in-process: (exit code, stdout, stderr)."""
    from adapterhub_c.cli.main import main

    capsys.readouterr()
    try:
        main(["--home", str(home), *args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def count(reg, cls) -> int:
    with reg.session() as s:
        return s.scalar(select(func.count()).select_from(cls))


def evaluations(reg, run_id) -> list[Evaluation]:
    with reg.session() as s:
        return list(s.scalars(select(Evaluation).where(Evaluation.run_id == run_id)))


def roles(reg, art) -> dict[str, str]:
    with reg.session() as s:
        return {parent.name: role for role, parent in reg.parents(s, s.get(Artifact, art.id))}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---------------------------------------------------------------------------------------
# train


def test_train_registers_a_peft_loadable_lora_with_summary_lineage_and_evaluations(world):
    from peft import PeftModel

    from adapterhub_c.models.tiny import build_tiny_llama

    reg, art, report = world["reg"], world["source"], world["report"]
    assert art.kind == "lora" and art.variant_id is None and art.source == "adapt train"
    assert roles(reg, art) == {"builtin:tiny-llama": "trained-on"}
    train = art.metrics["train"]
    assert train["steps"] == 4 and train["loss_end"] is not None
    assert train["tokens_per_s"] == pytest.approx(train["tokens"] / train["wall_s"], rel=0.02)
    assert report["after"]["completion_ppl"] < report["before"]["completion_ppl"]
    assert art.config["rank"] == 4 and art.config["targets"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
    rows = evaluations(reg, art.run_id)
    assert {(e.artifact_id, e.metric) for e in rows} == {
        (None, "completion_ppl"), (None, "exact_match"), (art.id, "completion_ppl"), (art.id, "exact_match")}
    assert all(e.dataset == TASK and e.split == "test" for e in rows)

    folder = reg.materialize(art)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "builtin:tiny-llama" and cfg["r"] == 4
    peft_model = PeftModel.from_pretrained(build_tiny_llama()[0], str(folder)).eval()
    assert not torch.equal(logits(peft_model), logits(build_tiny_llama()[0].eval()))
    # no checkpoint left behind by a completed run
    assert not any((reg.cache_dir / "checkpoints").glob("*/checkpoint.safetensors"))


def test_train_loss_goes_down(world):
    reg = world["reg"]
    art, report = train_adapter(reg, "builtin:tiny-llama", TASK, rank=4, alpha=8, baseline=False, name="longer",
                                **{**FAST, "steps": 24})
    t = report["train"]
    assert t["steps"] == 24 and t["loss_end_avg"] < t["loss_start_avg"]
    assert report["before"] is None


def test_interrupted_train_resumes_to_the_same_weights(world):
    reg = world["reg"]
    opts = dict(rank=4, alpha=8, baseline=False, checkpoint_every=2, **{**FAST, "steps": 6})
    ref, _ = train_adapter(reg, "builtin:tiny-llama", TASK, name="uninterrupted", **opts)

    def stop_at_3(desc, done, total):
        if desc == "training" and done == 3:
            raise KeyboardInterrupt

    arts = count(reg, Artifact)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(reg, "builtin:tiny-llama", TASK, name="resumed", progress=stop_at_3, **opts)
    assert count(reg, Artifact) == arts
    with reg.session() as s:
        last = s.scalars(select(Run).order_by(Run.started_at.desc())).first()
        assert last.status == "interrupted" and last.command == "adapt train"
    with pytest.raises(UsageError, match="lr"):
        train_adapter(reg, "builtin:tiny-llama", TASK, name="resumed", resume=True, **{**opts, "lr": 1e-3})
    art, report = train_adapter(reg, "builtin:tiny-llama", TASK, name="resumed", resume=True, **opts)
    assert report["train"]["resumed_from"] == 3
    a, b = load_adapter_artifact(reg, ref).lora.tensors, load_adapter_artifact(reg, art).lora.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_on_a_quantized_variant_is_qlora_and_targets_it(world):
    reg, nf4 = world["reg"], world["nf4"]
    art, report = train_adapter(reg, nf4.name, TASK, rank=4, alpha=8, baseline=False, name="qlora",
                                **{**FAST, "steps": 2})
    assert art.variant_id == nf4.id and roles(reg, art) == {nf4.name: "trained-on"}
    assert report["variant"] == nf4.name


# ---------------------------------------------------------------------------------------
# convert


def test_convert_with_data_registers_recovered_lora_and_four_rows(world):
    from adapterhub_c.training.recovery import FILE_NAME

    reg, nf4, src = world["reg"], world["nf4"], world["source"]
    art, report = convert_adapter(reg, "src", nf4.name, data=TASK, recover_rank=4, name="conv-full", **FAST)
    assert art.kind == "recovered-lora" and art.variant_id == nf4.id
    assert roles(reg, art) == {"src": "inherited-from", nf4.name: "targets"}
    assert (reg.materialize(art) / FILE_NAME).is_file()
    assert report["inherit"] and report["recover"] and report["distill"]
    assert report["train"]["steps"] == 4 and "distill_loss_end" in report["train"]
    assert [r["row"] for r in report["rows"]] == ["variant alone", "variant + source (naive)",
                                                  "base + source (teacher)", "variant + converted"]
    rows = evaluations(reg, art.run_id)
    assert len(rows) == 8  # 4 rows × (completion_ppl, exact match)
    ids = {(e.variant_id, e.artifact_id) for e in rows}
    assert ids == {(nf4.id, None), (nf4.id, src.id), (None, src.id), (nf4.id, art.id)}
    cfg = json.loads((reg.materialize(art) / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "builtin:tiny-llama"


def test_eval_of_the_converted_adapter_equals_load_adapted_by_hand(world, capsys):
    from adapterhub_c.evals.evaluate import evaluate_model
    from adapterhub_c.runtime.bases import load_base_tokenizer
    from adapterhub_c.runtime.variants import load_variant
    from adapterhub_c.training.convert import load_adapted
    from adapterhub_c.workflows.evals import run_eval

    reg, nf4 = world["reg"], world["nf4"]
    art, report = convert_adapter(reg, "src", nf4.name, data=TASK, recover_rank=4, name="conv-eval",
                                  reference_rows=False, **FAST)
    via_registry = run_eval(reg, "builtin:tiny-llama", TASK, variant=nf4.name, adapter="conv-eval",
                            max_tokens=300, max_examples=2)
    loaded = load_adapter_artifact(reg, art)
    assert loaded.recovery_state
    model = load_adapted(load_variant(reg, nf4), loaded.lora, loaded.recovery_state, loaded.recovery_config)
    tok = load_base_tokenizer(reg, reg.get("builtin:tiny-llama", "base"))
    by_hand = evaluate_model(model, tok, TASK, max_tokens=300, max_examples=2)
    assert via_registry["completion_ppl"] == by_hand["completion_ppl"]
    assert via_registry["exact_match"] == by_hand["exact_match"]
    converted = report["rows"][-1]
    assert converted["completion_ppl"] == pytest.approx(by_hand["completion_ppl"], rel=1e-5)
    code, out, err = run_cli(world["home"], capsys, "generate", "builtin:tiny-llama", "Reverse the words: a b",
                             "--variant", nf4.name, "--adapter", "conv-eval", "--max-new-tokens", "3")
    assert code == 0, err


def test_convert_without_data_is_inheritance_only_and_still_evaluated(world):
    from adapterhub_c.training.recovery import FILE_NAME

    reg, nf4, src = world["reg"], world["nf4"], world["source"]
    art, report = convert_adapter(reg, "src", nf4.name, name="conv-nodata", max_eval_tokens=300, max_eval_examples=2)
    assert report["train"] is None and not report["recover"] and not report["distill"]
    assert report["eval_data"] == TASK  # the source's own training data
    assert not (reg.materialize(art) / FILE_NAME).exists()
    a, b = load_adapter_artifact(reg, src).lora.tensors, load_adapter_artifact(reg, art).lora.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    by = {r["row"]: r for r in report["rows"]}
    # inherit only on a non-ffn variant: the converted adapter is the naive one
    assert by["variant + converted"]["completion_ppl"] == pytest.approx(by["variant + source (naive)"]["completion_ppl"],
                                                                    rel=1e-6)
    assert len(evaluations(reg, art.run_id)) == 8


@pytest.mark.parametrize("switch", ["inherit", "recover", "distill"])
def test_each_switch_turns_off_exactly_its_part(world, switch):
    from adapterhub_c.training.recovery import FILE_NAME

    reg, nf4 = world["reg"], world["nf4"]
    art, report = convert_adapter(reg, "src", nf4.name, data=TASK, recover_rank=4, name=f"conv-no-{switch}",
                                  reference_rows=False, **{switch: False}, **{**FAST, "steps": 2})
    on = {k: report[k] for k in ("inherit", "recover", "distill")}
    assert on == {k: k != switch for k in on}
    assert (reg.materialize(art) / FILE_NAME).exists() == (switch != "recover")
    assert ("distill_loss_end" in report["train"]) == (switch != "distill")
    role = roles(reg, art)["src"]
    assert role == ("converted-from" if switch == "inherit" else "inherited-from")
    assert art.config[switch] is False


def test_ffn_channels_variant_slices_the_source_through_the_registry(world, capsys):
    reg, ffn, src = world["reg"], world["ffn"], world["source"]
    from adapterhub_c.runtime.variants import variant_kept_indices

    kept = variant_kept_indices(reg, ffn)
    assert kept
    art, report = convert_adapter(reg, "src", ffn.name, name="conv-ffn", max_eval_tokens=300, max_eval_examples=2)
    assert art.config["ffn_sliced"] is True
    a, b = load_adapter_artifact(reg, src).lora.layers(), load_adapter_artifact(reg, art).lora.layers()
    for module, layer in a.items():
        parent, leaf = module.rsplit(".", 1)
        if leaf == "up_proj":
            assert torch.equal(b[module].B, layer.B.index_select(0, kept[parent]))
            assert torch.equal(b[module].A, layer.A)
        elif leaf == "down_proj":
            assert torch.equal(b[module].A, layer.A.index_select(1, kept[parent]))
            assert torch.equal(b[module].B, layer.B)
        else:
            assert torch.equal(b[module].A, layer.A) and torch.equal(b[module].B, layer.B)
    by = {r["row"]: r for r in report["rows"]}
    assert by["variant + converted"]["completion_ppl"] == pytest.approx(by["variant + source (naive)"]["completion_ppl"],
                                                                    rel=1e-6)
    # the sliced, converted adapter and the unsliced source both evaluate on the variant
    for adapter in ("conv-ffn", "src"):
        code, out, err = run_cli(world["home"], capsys, "eval", ffn.name, "--adapter", adapter, "--data", TASK,
                                 "--max-tokens", "300", "--max-examples", "2", "--json")
        assert code == 0, err
        assert json.loads(out)["completion_ppl"] == pytest.approx(by["variant + converted"]["completion_ppl"], rel=1e-5)


def test_gap_closed():
    rows = [{"row": "variant + source (naive)", "perplexity": 20.0, "exact_match": 0.2},
            {"row": "base + source (teacher)", "perplexity": 10.0, "exact_match": 0.6},
            {"row": "variant + converted", "perplexity": 12.0, "exact_match": 0.5}]
    assert gap_closed(rows) == pytest.approx({"perplexity": 0.8, "exact_match": 0.75})
    # on a task the perplexity gap is measured in completion NLL (log of completion_ppl)
    task = [{"row": "variant + source (naive)", "completion_ppl": math.e ** 3, "exact_match": 0.2},
            {"row": "base + source (teacher)", "completion_ppl": math.e ** 1, "exact_match": 0.6},
            {"row": "variant + converted", "completion_ppl": math.e ** 1.5, "exact_match": 0.5}]
    assert gap_closed(task) == pytest.approx({"completion_nll": 0.75, "exact_match": 0.75})


# ---------------------------------------------------------------------------------------
# the CLI and bad input


def test_cli_train_and_convert_json(world, capsys):
    home, nf4 = world["home"], world["nf4"]
    code, out, err = run_cli(home, capsys, "train", "builtin:tiny-llama", "--data", TASK, "--rank", "2",
                             "--targets", "q_proj,v_proj", "--steps", "2", "--seq-len", "32", "--batch-size", "2",
                             "--max-eval-tokens", "200", "--max-eval-examples", "1", "--name", "cli-lora", "--json")
    assert code == 0, err
    assert json.loads(out)["artifact"] == "cli-lora"
    code, out, err = run_cli(home, capsys, "convert", "cli-lora", "--variant", nf4.name, "--data", TASK,
                             "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--recover-rank", "2",
                             "--max-eval-tokens", "200", "--max-eval-examples", "1", "--name", "cli-conv")
    assert code == 0, err
    assert "variant + converted" in out and "base + source (teacher)" in out


def _other_base_lora(reg) -> str:
    """A LoRA registered on a second base (a copy of the tiny Llama under another name)."""
    from adapterhub_c.models.builtin import builtin_for
    from adapterhub_c.registry.artifacts import name_taken, register_artifact
    from adapterhub_c.workflows.bases import register_base_folder

    if not name_taken(reg, "other-lora"):
        with tempfile.TemporaryDirectory() as tmp:
            builtin_for("builtin:tiny-llama").export(Path(tmp))
            other, _ = register_base_folder(reg, "other-tiny", Path(tmp), None, None, None, None)
        register_artifact(reg, kind="lora", name="other-lora", base_id=other.id,
                          folder=reg.materialize(world_source(reg)))
    return "other-lora"


def world_source(reg):
    return reg.get("src", "artifact")


@pytest.mark.parametrize("args, message", [
    (["convert", "OTHER", "--variant", "NF4"], "other-tiny"),
    (["convert", "src", "--variant", "no-such-variant"], "no-such-variant"),
    (["convert", "src", "--variant", "NF4", "--data", TASK, "--steps", "-1"], "steps"),
    (["convert", "src", "--variant", "NF4", "--no-inherit"], "no-inherit"),
    (["convert", "src", "--variant", "NF4", "--recover-act", "tanh"], "activation"),
    (["convert", "src", "--variant", "NF4", "--name", "src"], "already exists"),
    (["train", "builtin:tiny-llama", "--data", TASK, "--steps", "-1"], "steps"),
    (["train", "builtin:tiny-llama", "--data", "missing.jsonl"], "not found"),
    (["train", "builtin:tiny-llama", "--data", "BAD_JSONL"], ":2:"),
    (["train", "builtin:tiny-llama", "--data", TASK, "--targets", "nope_proj"], "nope_proj"),
    (["train", "src", "--data", TASK], "artefact"),
    (["train", "builtin:tiny-llama", "--data", TASK, "--variant", "no-such-variant"], "no-such-variant"),
])
def test_bad_input_exits_2_with_nothing_registered(world, capsys, tmp_path, args, message):
    reg, home = world["reg"], world["home"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    other = _other_base_lora(reg)
    subst = {"OTHER": other, "NF4": world["nf4"].name, "BAD_JSONL": str(bad)}
    args = [subst.get(a, a) for a in args]
    before = count(reg, Artifact)
    code, out, err = run_cli(home, capsys, *args)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1
    assert count(reg, Artifact) == before
