"""adapt batch convert / status."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.options import collect, options_from
from adapterhub_c.cli.render import print_json, print_table, progress_callback
from adapterhub_c.errors import AdaptError
from adapterhub_c.options.batch import BatchExecution, BatchItems, BatchSteps
from adapterhub_c.options.convert import ConvertOptions

# Options of a conversion a batch does not offer: its own --device applies to every step, and a
# batch resumes by re-running (not --resume).
BATCH_EXCLUDES = ("device", "resume")
ITEM_COLUMNS = ["#", "source", "state", "attempts", "result", "error"]


@click.group("batch")
def batch_group() -> None:
    """Many adapters at once: a resumable work queue in the registry, local or Ray workers."""


@batch_group.command("convert")
@click.option("--variant", default=None, help="The compressed variant to convert every adapter to.")
@options_from(BatchItems)
@options_from(ConvertOptions, exclude=BATCH_EXCLUDES)
@options_from(BatchSteps)
@click.option("--no-eval", is_flag=True, help="Skip the evaluate step (the pack is not measured).")
@options_from(BatchExecution)
@click.option("--name", default=None, help="Batch name (to resume or inspect it) [derived from the options].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def convert_cmd(obj, variant, no_eval, name, as_json, **fields):
    """Pull, convert to VARIANT, pack, evaluate and push many adapters; re-run to resume."""
    items, execution = collect(BatchItems, fields), collect(BatchExecution, fields)
    steps = collect(BatchSteps, fields, evaluate=not no_eval)
    convert = collect(ConvertOptions, fields, device=steps.device)
    with progress_callback() as progress:
        summary = api.run_batch(registry=obj.registry, variant=variant, name=name, convert=convert, items=items,
                                steps=steps.replace(eval_data=convert.eval_data), execution=execution,
                                progress=progress)
    _print_summary(summary, as_json)
    _fail_if_unfinished(summary)


@batch_group.command("status")
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status_cmd(obj, batch, as_json):
    """Items of BATCH: state, attempts, errors, leases, produced artefacts."""
    summary = api.batch_status(batch, registry=obj.registry)
    if as_json:
        print_json(summary)
        return
    rows = [_item_row(it, with_worker=True) for it in summary["items"]]
    print_table(rows, ITEM_COLUMNS[:4] + ["step", "worker", "lease until"] + ITEM_COLUMNS[4:],
                title=f"batch {summary['batch']} → {summary['variant']}")
    click.echo(_counts_line(summary))


def _item_row(it: dict, with_worker: bool = False) -> dict:
    err = it["error"] or ""
    row = {"#": it["position"], "source": it["source"], "state": it["state"], "attempts": it["attempts"],
           "result": it["result"], "error": (err[:117] + "…") if len(err) > 120 else (err or None)}
    if with_worker:
        row.update({"step": it["step"], "worker": it["worker"] if it["state"] == "running" else None,
                    "lease until": it["lease_expires_at"] if it["state"] == "running" else None})
    return row


def _counts_line(summary: dict) -> str:
    c = summary["counts"]
    return (f"{c['done']} done, {c['failed']} failed, {c['queued']} queued, {c['running']} running "
            f"of {summary['total']}")


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    run = summary["this_run"]
    print_table([_item_row(it) for it in summary["items"]], ITEM_COLUMNS,
                title=f"batch {summary['batch']} → {summary['variant']}")
    rate = f", {run['items_per_minute']:.3g} items/min" if run.get("items_per_minute") else ""
    if run["workers"] == 0:
        click.echo(f"{_counts_line(summary)}; this run: nothing left to do (out of retries or all done)")
    else:
        click.echo(f"{_counts_line(summary)}; this run: {run['done']} done, {run['failed']} failed in "
                   f"{run['elapsed_s']:.1f} s with {run['workers']} {run['executor']} worker(s){rate}")
    for lost in run["lost_workers"]:
        click.echo(f"worker {lost['worker']}: {lost['reason']} ({lost['items_returned']} item(s) returned)")


def _fail_if_unfinished(summary: dict) -> None:
    c = summary["counts"]
    if c["failed"] or c["queued"] or c["running"]:
        left = f"{c['failed']} failed" + (f", {c['queued'] + c['running']} unfinished"
                                          if c["queued"] or c["running"] else "")
        raise AdaptError(f"batch {summary['batch']!r}: {left} of {summary['total']} "
                         f"(see `adapt batch status {summary['batch']}`; run it again to retry)")


def register(cli) -> None:
    cli.add_command(batch_group)
