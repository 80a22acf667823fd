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
