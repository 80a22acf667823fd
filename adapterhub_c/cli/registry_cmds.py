"""adapt init / ls / show / lineage / rm / gc."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import console, human_bytes, print_json, print_table

COLUMNS = {
    "bases": ["name", "hub_id", "architecture", "params", "size", "reference_only", "id8"],
    "variants": ["name", "base", "recipe", "sparsity", "size", "id8"],
    "artifacts": ["name", "kind", "base", "variant", "source", "size", "id8"],
    "runs": ["id8", "command", "status", "started_at", "duration_s", "error"],
}


@click.command("init")
@click.pass_obj
def init_cmd(obj) -> None:
    """Create (or migrate) the registry and show where it lives."""
    reg = obj.registry
    click.echo(f"registry: {reg.url}\nhome: {reg.home}")


@click.command("ls")
@click.argument("what", type=click.Choice(api.LISTABLE), default="artifacts")
@click.option("--limit", type=int, default=None, help="At most this many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def ls_cmd(obj, what: str, limit: int | None, as_json: bool) -> None:
    """List bases, variants, artifacts (default) or runs."""
    rows = api.list_objects(what, limit=limit, registry=obj.registry)
    if as_json:
        print_json(rows)
        return
    for r in rows:
        r["id8"] = r["id"][:8]
        r["size"] = human_bytes(r.get("size_bytes"))
    print_table(rows, COLUMNS[what], title=what)


@click.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show_cmd(obj, name: str, as_json: bool) -> None:
    """Everything about one base, variant or artefact."""
    row = api.show(name, registry=obj.registry)
    if as_json:
        print_json(row)
        return
    for key in ("type", "name", "id", "kind", "base", "variant", "hub_id", "source", "source_sha",
                "architecture", "params", "recipe", "sparsity", "size_bytes", "metrics"):
        if row.get(key) not in (None, {}, []):
            console.print(f"[bold]{key}[/]: {row[key]}")
    if row["files"]:
        print_table([{"file": k, "sha256": v[:16]} for k, v in row["files"].items()], ["file", "sha256"], "files")
    if row["parents"] or row["children"]:
        print_table([{"relation": "parent", **p} for p in row["parents"]] +
                    [{"relation": "child", **c} for c in row["children"]],
                    ["relation", "role", "type", "name"], "lineage")
    if row["evaluations"]:
        print_table(row["evaluations"], ["dataset", "split", "metric", "value", "variant", "at"], "evaluations")


def _print_tree(nodes, key, depth=0) -> None:
    for n in nodes:
        click.echo(f"{'  ' * depth}{'└─ ' if depth else ''}{n['name']} ({n['type']}, {n['role']})")
        _print_tree(n[key], key, depth + 1)


@click.command("lineage")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def lineage_cmd(obj, name: str, as_json: bool) -> None:
    """Where an object comes from and what derives from it."""
    tree = api.lineage(name, registry=obj.registry)
    if as_json:
        print_json(tree)
        return
    click.echo(f"{tree['name']} ({tree['type']})")
    click.echo("derived from:" if tree["parents"] else "derived from: nothing")
    _print_tree(tree["parents"], "parents", 1)
    click.echo("used by:" if tree["children"] else "used by: nothing")
    _print_tree(tree["children"], "children", 1)


@click.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--cascade", is_flag=True, help="Also remove everything derived from it.")
@click.pass_obj
def rm_cmd(obj, name: str, yes: bool, cascade: bool) -> None:
    """Remove an object from the registry (blobs go at the next `adapt gc`)."""
    if not yes:
        click.confirm(f"remove {name}{' and everything derived from it' if cascade else ''}?", abort=True)
    removed = api.remove(name, cascade=cascade, registry=obj.registry)
    click.echo(f"removed: {', '.join(removed)}")


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def gc_cmd(obj, dry_run: bool, as_json: bool) -> None:
    """Close runs whose process died, delete staging folders and temp files of dead writers and
    blobs no row references."""
    result = api.gc(dry_run=dry_run, registry=obj.registry)
    if as_json:
        print_json(result)
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {result['blobs_removed']} blob(s), {result['temp_removed']} temp file(s), "
                   f"{len(result['staging_removed'])} staging folder(s), {human_bytes(result['bytes_freed'])}; "
                   f"{'would mark' if dry_run else 'marked'} {len(result['runs_interrupted'])} dead run(s) "
                   "interrupted")


def register(cli) -> None:
    for cmd in (init_cmd, ls_cmd, show_cmd, lineage_cmd, rm_cmd, gc_cmd):
        cli.add_command(cmd)
