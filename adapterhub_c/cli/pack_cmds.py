"""adapt pack / adapt pack inspect / adapt unpack."""
from __future__ import annotations

from pathlib import Path

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
from adapterhub_c.options.pack import PackOptions


class _PackGroup(click.Group):
    """``adapt pack NAME …`` runs ``pack create``; ``adapt pack inspect …`` the subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


@click.group("pack", cls=_PackGroup)
def pack_group():
    """ComPEFT packs: `adapt pack NAME --density K …` packs an adapter; `adapt pack inspect`."""


@pack_group.command("create")
@click.argument("adapter")
@options_from(PackOptions)
@click.option("--name", default=None, help="Name of the pack (default: <adapter>-k<percent>).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def pack_create(obj, adapter, name, as_json, **fields):
    """Pack ADAPTER (any LoRA artefact, converted ones with their recovery modules)."""
    options = collect(PackOptions, fields)
    with progress_callback() as progress:
        result = api.pack(adapter, options.density, options, registry=obj.registry, name=name, progress=progress)
    report = result.report
    if as_json:
        print_json(report)
        echo_warnings(result)
        return
    if echo_already_done(report):
        return
    row = dict(report)
    row["pack"] = human_bytes(report["pack_bytes"])
    row["fp16"] = human_bytes(report["fp16_bytes"])
    row["ratio vs fp16"] = f"{report['ratio_vs_fp16']:.1f}x"
    print_table([row], ["name", "source", "density", "alpha", "encoding", "scope", "pack", "fp16", "ratio vs fp16",
                        "bits_per_param", "ratio_to_bound", "recovery"], title="pack")
    search = report.get("alpha_search")
    if search:
        rows = [{**p, "best": "*" if p["alpha"] == search["best"] else ""} for p in search["curve"]]
        cols = ["alpha"] + [m for m in ("exact_match", "completion_ppl", "perplexity") if m in rows[0]] + ["best"]
        print_table(rows, cols, title=f"alpha search on {search['data']} (validation, by {search['metric']})")
    q = report.get("quality")
    if q:
        rows = [{"adapter": "unpacked", **q["unpacked"]}, {"adapter": "pack", **q["pack"]}]
        print_table(rows, ["adapter"] + list(q["pack"]), title=f"quality on {q['data']} (validation)")
    if report.get("alpha_curve_png"):
        click.echo(f"alpha curve: {report['alpha_curve_png']}")
    echo_warnings(result)


@pack_group.command("inspect")
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def pack_inspect(obj, pack, as_json):
    """Per tensor density, scale, bits/param and entropy bound of PACK (a name or a file)."""
    stats = api.inspect_pack(pack, registry=None if Path(pack).is_file() else obj.registry)
    if as_json:
        print_json(stats)
        return
    rows = [{"tensor": n, **r} for n, r in stats["tensors"].items()]
    print_table(rows, ["tensor", "shape", "numel", "density", "scale", "param", "bits_per_param",
                       "entropy_bits_per_param", "ratio_to_bound"],
                title=f"{stats.get('name') or stats['path']} ({stats['encoding']}, k={stats['density']:g}, "
                      f"alpha={stats['alpha']:g}, {stats['scope']})")
    t = stats["totals"]
    print_table([{**t, "file": human_bytes(t["file_bytes"])}],
                ["numel", "nnz", "density", "bits_per_param", "entropy_bits_per_param", "ratio_to_bound",
                 "ratio_vs_fp16", "file", "file_ratio_vs_fp16"], title="totals")
    click.echo(f"kept: {stats['kept_count']}")


@click.command("unpack")
@click.argument("pack")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder to write (default ./<pack name>); must not exist or be empty.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def unpack_cmd(obj, pack, out, as_json):
    """Decode PACK into a PEFT folder that plain PEFT loads."""
    folder = api.unpack(pack, out, registry=obj.registry)
    if as_json:
        print_json({"pack": pack, "path": folder.report["path"], "files": sorted(folder.paths)})
    else:
        click.echo(folder.report["path"])


def register(cli) -> None:
    cli.add_command(pack_group)
    cli.add_command(unpack_cmd)
