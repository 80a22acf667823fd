"""The options classes and the click options generated from them: parity, spellings, validation."""
from __future__ import annotations

import click
import pytest

from adapterhub_c.cli.adapt_cmds import convert_cmd, train_cmd
from adapterhub_c.cli.batch_cmds import BATCH_EXCLUDES
from adapterhub_c.cli.batch_cmds import convert_cmd as batch_convert_cmd
from adapterhub_c.cli.options import cli_fields, collect, flags_of
from adapterhub_c.errors import UsageError
from adapterhub_c.options import flag_of
from adapterhub_c.options.convert import ConvertOptions
from adapterhub_c.options.train import TrainOptions


def _flags(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts}


def test_convert_and_batch_convert_offer_every_convert_option():
    convert, batch = _flags(convert_cmd), _flags(batch_convert_cmd)
    every = flags_of(ConvertOptions)
    assert every <= convert  # adapt convert: every field of ConvertOptions the command line knows
    assert flags_of(ConvertOptions, exclude=BATCH_EXCLUDES) <= batch
    # what the batch leaves out is offered by the batch in its own words (--device for every step) or
    # makes no sense there (--resume: a batch resumes by running it again)
    assert {flag_of(f) for f in cli_fields(ConvertOptions) if f.name in BATCH_EXCLUDES} == {"--device", "--resume"}
    assert "--device" in batch and "--resume" not in batch
    # the drift of issue 24: these three were missing from `adapt batch convert`
    assert {"--calib-seq-len", "--grad-accum", "--checkpoint-every"} <= batch
    # nothing convert-like besides the fields: the commands' own flags only
    assert convert - every == {"--variant", "--name", "--json"}
    # the old spellings stay
    assert {"--no-recover", "--recover", "--no-inherit", "--no-distill", "--targets", "--no-reference-rows"} <= every


def test_train_offers_every_train_option():
    assert flags_of(TrainOptions) <= _flags(train_cmd)
    assert {"--data", "--rank", "--alpha", "--targets", "--grad-accum", "--checkpoint-every", "--resume"} <= \
        flags_of(TrainOptions)


def _parse(command: click.Command, args: list[str]) -> dict:
    ctx = command.make_context(command.name, list(args))
    return dict(ctx.params)


def test_collect_reads_the_old_spellings_into_one_recover_field():
    base = ["src", "--variant", "v"]
    assert collect(ConvertOptions, _parse(convert_cmd, base)).recover == "modules"
    assert collect(ConvertOptions, _parse(convert_cmd, base + ["--no-recover"])).recover == "none"
    assert collect(ConvertOptions, _parse(convert_cmd, base + ["--recover", "lowrank"])).recover == "lowrank"
    with pytest.raises(click.UsageError, match="exclude each other"):
        collect(ConvertOptions, _parse(convert_cmd, base + ["--recover", "lowrank", "--no-recover"]))
    opts = collect(ConvertOptions, _parse(convert_cmd, base + ["--no-inherit", "--no-distill", "--data", "d"]))
    assert (opts.inherit, opts.distill, opts.data) == (False, False, "d")
    assert collect(ConvertOptions, _parse(convert_cmd, base)) == ConvertOptions()


def test_train_targets_are_a_comma_list():
    opts = collect(TrainOptions, _parse(train_cmd, ["b", "--data", "d", "--targets", "v_proj, q_proj,,v_proj"]))
    assert opts.targets == ("q_proj", "v_proj")
    assert collect(TrainOptions, _parse(train_cmd, ["b", "--data", "d"])).targets is None


def test_options_validate_and_round_trip():
    opts = ConvertOptions(data="builtin:pydoc", recover="lowrank", calib_samples=4, steps=3)
    assert ConvertOptions.from_params(opts.params()) == opts
    assert TrainOptions.from_params(TrainOptions(data="x", targets=("q_proj",)).params()).targets == ("q_proj",)
    assert ConvertOptions(recover=False).recover == "none" and ConvertOptions(recover=True).recover == "modules"
    for bad, flag in (({"recover": "sometimes"}, "--recover"), ({"steps": -1}, "--steps"),
                      ({"distill_alpha": -1.0}, "--distill-alpha"), ({"recover_rank": 0}, "--recover-rank"),
                      ({"recover_targets": "mlp"}, "--targets"), ({"distill_on": "attention"}, "--distill-on"),
                      ({"recover_act": "tanh"}, "activation"), ({"inherit": False}, "--no-inherit"),
                      ({"recover": "lowrank", "calib_samples": 0}, "--calib-samples"), ({"lr": 0}, "--lr")):
        with pytest.raises(UsageError, match=flag):
            ConvertOptions(**bad)
    with pytest.raises(UsageError, match="unknown convert option"):
        ConvertOptions.from_params({"stepz": 3})
    for bad, flag in (({"rank": 0}, "--rank"), ({"alpha": 0}, "--alpha"), ({"steps": 0}, "--steps"),
                      ({"targets": (" ",)}, "--targets")):
        with pytest.raises(UsageError, match=flag):
            TrainOptions(data="x", **bad)


def test_the_options_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, adapterhub_c.options.convert, adapterhub_c.options.train, adapterhub_c.cli.adapt_cmds; "
            "print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_domain_reads_its_names_from_the_options():
    from adapterhub_c.adapters.recovery import ACTIVATIONS
    from adapterhub_c.options.convert import COMPENSATE_TARGETS, RECOVER_ACTS
    from adapterhub_c.training.compensate import TARGET_SETS

    assert tuple(TARGET_SETS) == COMPENSATE_TARGETS
    assert tuple(ACTIVATIONS) == RECOVER_ACTS


def test_pack_offers_every_pack_option_and_parses_density_and_alpha():
    from adapterhub_c.cli.pack_cmds import pack_create
    from adapterhub_c.options.pack import ALPHA_METRICS, PackOptions
    from adapterhub_c.packing.alpha import METRICS

    assert flags_of(PackOptions) <= _flags(pack_create) and "-k" in _flags(pack_create)
    assert METRICS == ALPHA_METRICS
    opts = collect(PackOptions, _parse(pack_create, ["a", "-k", "10%", "--alpha", "2"]))
    assert (opts.density, opts.alpha) == (0.1, 2.0)
    assert PackOptions(density="0.5", alpha="AUTO", eval_data="d").alpha == "auto"
    assert PackOptions.from_params(opts.params()) == opts
    for bad, message in (({"density": 0}, "density"), ({"density": "lots"}, "density"), ({"alpha": 0}, "alpha"),
                         ({"alpha": "auto"}, "--eval-data"), ({"scope": "global"}, "delta-fit"),
                         ({"encoding": "zip"}, "--encoding"), ({"max_tokens": 1}, "max tokens")):
        with pytest.raises(UsageError, match=message):
            PackOptions(**{"density": 0.1, **bad})


# ---- merge, compose, variant create, prompt learn / transfer (issue 24) -------------------------


def test_merge_and_compose_offer_every_option_and_parse_like_before():
    from adapterhub_c.cli.merge_cmds import compose_cmd, merge_cmd, merge_group
    from adapterhub_c.options.merge import ComposeOptions, MergeOptions

    merge, compose = _flags(merge_cmd), _flags(compose_cmd)
    assert flags_of(MergeOptions) <= merge and merge - flags_of(MergeOptions) == {"--name", "--json"}
    # every spelling adapt merge had before the options class
    assert {"--method", "--weights", "--density", "--majority", "--convention", "--rescale", "--space", "--rank",
            "--seed", "--svd", "--device", "--election"} == flags_of(MergeOptions)
    assert {"--examples", "--shots", "--budget", "--bounds", "--l1", "--optimizer", "--seed", "--device"} == \
        flags_of(ComposeOptions) and flags_of(ComposeOptions) <= compose
    assert set(merge_group.commands) >= {"replay"}
    opts = collect(MergeOptions, _parse(merge_cmd, ["a", "b", "--method", "ties", "--density", "0.5",
                                                    "--weights", "1,-0.5"]))
    assert (opts.method, opts.density, opts.weights, opts.rescale) == ("ties", 0.5, (1.0, -0.5), None)
    assert MergeOptions.from_params(opts.params()) == opts
    assert MergeOptions(method="task_arithmetic").method == "task-arithmetic"
    assert MergeOptions(method="linear").method == "task-arithmetic"
    c = collect(ComposeOptions, _parse(compose_cmd, ["a", "b", "--examples", "x.jsonl", "--bounds", "-1,2"]))
    assert (c.bounds, c.budget, c.l1, c.optimizer) == ((-1.0, 2.0), 40, 0.25, "NGOpt")
    assert collect(ComposeOptions, _parse(compose_cmd, ["a", "--examples", "x.jsonl"])).bounds == (-1.5, 1.5)
    for bad, message in (({"method": "ties"}, "needs a density"), ({"method": "task-arithmetic", "density": 0.5},
                         "density applies"), ({"method": "ties", "density": 1.5}, "density must be in"),
                         ({"method": "ties", "density": 0.5, "rank": 0}, "rank"), ({"method": "mean"}, "--method"),
                         ({"method": "ties", "density": 0.5, "rescale": "l1"}, "rescale applies"),
                         ({"method": "task-arithmetic", "weights": "1,x"}, "weights"),
                         ({"method": "task-arithmetic", "svd": "qr"}, "--svd"),
                         ({"method": "task-arithmetic", "election": "vote"}, "--election")):
        with pytest.raises(UsageError, match=message):
            MergeOptions(**bad)
    for bad, message in (({"budget": 0}, "budget"), ({"bounds": "1,1"}, "bounds"), ({"l1": -1.0}, "l1"),
                         ({"shots": 0}, "shots"), ({"bounds": "a,b"}, "bounds")):
        with pytest.raises(UsageError, match=message):
            ComposeOptions(examples="x.jsonl", **bad)


def test_the_merge_domain_reads_its_names_from_the_options():
    from adapterhub_c import merging
    from adapterhub_c.merging import compose, lowrank, spec
    from adapterhub_c.options import merge as options

    assert merging.METHODS is options.METHODS and spec.SPACES is options.SPACES and spec.MAJORITIES is options.MAJORITIES
    assert lowrank.SVD_ROUTINES is options.SVD_ROUTINES and compose.LORAHUB_L1 == options.LORAHUB_L1 == 0.25
    from adapterhub_c.workflows import merges

    assert merges.ELECTIONS is options.ELECTIONS


def test_merge_group_falls_through_to_the_merge(cli):
    """Every spelling of `adapt merge` that worked before still reaches the merge (and its errors)."""
    r = cli("merge", "--help")
    assert r.code == 0 and "Usage: adapt merge [OPTIONS] ADAPTERS..." in r.out and "--method" in r.out
    assert "merge replay CONFIG" in r.out
    r = cli("merge")
    assert r.code == 2 and "Missing argument 'ADAPTERS...'" in r.err and "adapt merge --help" in r.err
    r = cli("merge", "--method", "ties", "a")
    assert r.code == 2 and "density" in r.err
    assert cli("merge", "a", "b", "--method", "mean").code == 2
    r = cli("merge", "replay", "--help")
    assert r.code == 0 and "Usage: adapt merge replay [OPTIONS] CONFIG" in r.out


def test_variant_create_offers_every_option_and_keeps_the_default_calibration_marker():
    from adapterhub_c.cli.variant_cmds import variant_create
    from adapterhub_c.evals.data import DEFAULT_CORPUS
    from adapterhub_c.options.variant import DEFAULT_CALIB, DefaultCalib, VariantOptions
    from adapterhub_c.variants import recipe

    flags = _flags(variant_create)
    assert flags_of(VariantOptions) <= flags
    assert {"--quant", "--double-quant", "--prune", "--sparsity", "--granularity", "--calib", "--calib-samples",
            "--calib-seq-len", "--eval-tokens", "--device", "--name", "--json"} <= flags
    assert recipe.QUANT_METHODS is VariantOptions.__dataclass_fields__["quant"].metadata["choices"]
    assert DEFAULT_CALIB == DEFAULT_CORPUS
    # left out on the command line: the marker (dropped where unused), not an explicit name (refused there)
    opts = collect(VariantOptions, _parse(variant_create, ["b", "--quant", "nf4"]))
    assert isinstance(opts.calib, DefaultCalib) and opts == VariantOptions(quant="nf4")
    assert collect(VariantOptions, _parse(variant_create, ["b", "--calib", "none"])).calib is None
    assert collect(VariantOptions, _parse(variant_create, ["b", "--no-calib"])).calib is None
    explicit = collect(VariantOptions, _parse(variant_create, ["b", "--calib", "builtin:pydoc"])).calib
    assert explicit == "builtin:pydoc" and not isinstance(explicit, DefaultCalib)
    assert VariantOptions(quant="NF4", granularity="ROW").quant == "nf4"
    for bad, message in (({"quant": "int4"}, "--quant"), ({"prune": "random"}, "--prune"),
                         ({"eval_tokens": 1}, "--eval-tokens"), ({"eval_tokens": -1}, "--eval-tokens"),
                         ({"granularity": "block"}, "--granularity")):
        with pytest.raises(UsageError, match=message):
            VariantOptions(**bad)


def test_prompt_learn_and_transfer_offer_every_option():
    from adapterhub_c.cli.prompt_cmds import prompt_learn, prompt_transfer_cmd
    from adapterhub_c.evals.data import DEFAULT_CORPUS
    from adapterhub_c.options.prompt import DEFAULT_DATA, PromptOptions, TransferOptions

    learn, transfer = _flags(prompt_learn), _flags(prompt_transfer_cmd)
    assert flags_of(PromptOptions) <= learn and flags_of(TransferOptions) <= transfer
    assert {"--variant", "--data", "--tokens", "--init", "--steps", "--lr", "--batch-size", "--seq-len",
            "--eval-tokens", "--checkpoint-every", "--resume", "--seed", "--device", "--name", "--json"} <= learn
    assert {"--prompts", "--variants", "--data", "--split", "--max-tokens", "--plot", "--device", "--json"} <= transfer
    assert DEFAULT_DATA == DEFAULT_CORPUS
    opts = collect(PromptOptions, _parse(prompt_learn, ["--variant", "v", "--tokens", "8", "--resume"]))
    assert (opts.tokens, opts.resume, opts.steps, opts.lr) == (8, True, 200, 1e-2)
    assert PromptOptions.from_params(opts.params()) == opts
    assert PromptOptions.unkeyed() == ("eval_tokens",)
    for bad, message in (({"tokens": 0}, "--tokens"), ({"init": "zeros"}, "--init"), ({"eval_tokens": 1},
                         "--eval-tokens"), ({"lr": 0}, "--lr")):
        with pytest.raises(UsageError, match=message):
            PromptOptions(**bad)
    for bad, message in (({"split": "dev"}, "--split"), ({"max_tokens": 1}, "--max-tokens"),
                         ({"plot": "m.svg"}, "--plot")):
        with pytest.raises(UsageError, match=message):
            TransferOptions(**bad)


def test_evaluation_only_options_are_left_out_of_the_idempotency_key():
    from adapterhub_c.options.pack import PackOptions

    assert set(TrainOptions.unkeyed()) == {"eval_data", "eval_split", "max_eval_tokens", "max_eval_examples",
                                           "baseline"}
    assert set(ConvertOptions.unkeyed()) == {"eval_data", "eval_split", "max_eval_tokens", "max_eval_examples",
                                             "reference_rows"}
    assert PackOptions.unkeyed() == ()  # there eval data and budgets choose alpha: they change the pack


def test_api_reads_only_light_names():
    import subprocess
    import sys

    code = ("import sys, adapterhub_c.api as api, adapterhub_c.cli.merge_cmds, adapterhub_c.cli.variant_cmds, "
            "adapterhub_c.cli.prompt_cmds; names = [getattr(api, n) for n in api._LAZY_NAMES]; "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from adapterhub_c import api

    assert not [n for n in api._LAZY_NAMES if n.endswith("_DEFAULTS") and n not in ("TRAIN_DEFAULTS",
                                                                                     "CONVERT_DEFAULTS")]
