"""adapt train / convert."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.options import collect, options_from
from adapterhub_c.cli.render import (
    echo_already_done,
    echo_warnings,
    human_bytes,
    print_json,
    print_table,
    progress_callback,
)
from adapterhub_c.options.convert import ConvertOptions
from adapterhub_c.options.train import TrainOptions


def _metric_columns(rows: list[dict]) -> list[str]:
    return [m for m in ("perplexity", "completion_ppl", "exact_match") if any(m in r for r in rows)]


@click.command("train")
@click.argument("target")
@options_from(TrainOptions)
@click.option("--name", default=None, help="Name of the new adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def train_cmd(obj, target, name, as_json, **fields):
    """Train a LoRA on TARGET (a base or a variant) and register it."""
    options = collect(TrainOptions, fields)
    with progress_callback() as progress:
        art = api.train(target, options.data, options, registry=obj.registry, name=name, progress=progress)
    report = art.report
    if as_json:
        print_json(report)
        return
    if echo_already_done(report):
        return
    t = report["train"] or {}
    print_table([{"adapter": art.name, "on": report["variant"] or report["base"], "steps": t.get("steps"),
                  "loss start": t.get("loss_start_avg"), "loss end": t.get("loss_end_avg"),
                  "time (s)": t.get("wall_s"), "tokens/s": t.get("tokens_per_s"),
                  "size": human_bytes(report["size_bytes"])}],
                ["adapter", "on", "steps", "loss start", "loss end", "time (s)", "tokens/s", "size"],
                title="trained")
    rows = [{"model": "before training", **(report["before"] or {})}] if report["before"] else []
    rows.append({"model": art.name, **report["after"]})
    print_table(rows, ["model"] + _metric_columns(rows),
                title=f"{report['eval_data']} ({report['eval_split']})")


@click.command("convert")
@click.argument("adapter")
@click.option("--variant", required=True, help="The compressed variant to carry ADAPTER to.")
@options_from(ConvertOptions)
@click.option("--name", default=None, help="Name of the converted adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def convert_cmd(obj, adapter, variant, name, as_json, **fields):
    """Carry ADAPTER to a compressed variant of its base (CA-LoRA: inherit, recover, distill)."""
    options = collect(ConvertOptions, fields)
    with progress_callback() as progress:
        art = api.convert(adapter, variant, options, registry=obj.registry, name=name, progress=progress)
    report = art.report
    echo_warnings(art)
    if as_json:
        print_json(report)
        return
    if echo_already_done(report):
        return
    rows = [{**r, "loaded": human_bytes(r.get("loaded_bytes"))} for r in report["rows"]]
    mode = "+".join(("recover lowrank" if k == "recover" and report["recover_method"] == "lowrank" else k)
                    for k in ("inherit", "recover", "distill") if report[k]) or "fresh LoRA"
    t = report["train"]
    trained = f"{t['steps']} steps, loss {t['loss_start_avg']:.4g} → {t['loss_end_avg']:.4g}" if t else "no training"
    print_table(rows, ["row"] + _metric_columns(rows) + ["loaded"],
                title=f"{art.name} ({mode}; {trained}) on {report['eval_data']} ({report['eval_split']})")
    if report["gap_closed"]:
        click.echo("gap closed (converted vs naive, of teacher vs naive): "
                   + ", ".join(f"{k} {v:.0%}" for k, v in report["gap_closed"].items()))


def register(cli) -> None:
    cli.add_command(train_cmd)
    cli.add_command(convert_cmd)
