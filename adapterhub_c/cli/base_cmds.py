"""adapt base add."""
from __future__ import annotations

import click

from ..models.ops import add_builtin_base
from .render import progress_callback


@click.group("base")
def base_group() -> None:
    """Base models."""


@base_group.command("add")
@click.argument("name")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.pass_obj
def base_add(obj, name: str, revision: str | None) -> None:
    """Register a base model: builtin:smollm2-135m, builtin:tiny-llama (or a Hub repo)."""
    with progress_callback() as progress:
        base, created = add_builtin_base(obj.registry, name, progress=progress)
    click.echo(f"{'added' if created else 'already registered'}: {base.name} ({base.params:,} parameters, id {base.id[:8]})")


def register(cli) -> None:
    cli.add_command(base_group)
