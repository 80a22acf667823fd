"""adapt base add."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import progress_callback, token_options


@click.group("base")
def base_group() -> None:
    """Base models."""


@base_group.command("add")
@click.argument("name")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--allow-pickle", is_flag=True, help="Hub repos: accept .bin weights (converted to safetensors).")
@token_options("Hub token (default: HF_TOKEN); never stored or printed.")
@click.pass_obj
def base_add(obj, name: str, revision: str | None, allow_pickle: bool, token: str | None) -> None:
    """Register a base model: builtin:smollm2-135m, builtin:tiny-llama, or a Hub repo REPO[@REV]."""
    with progress_callback() as progress:
        base = api.add_base(name, revision=revision, allow_pickle=allow_pickle, token=token,
                            registry=obj.registry, progress=progress)
    click.echo(f"{'added' if base.created else 'already registered'}: {base.name} "
               f"({base.report['params']:,} parameters, id {base.id[:8]})")


def register(cli) -> None:
    cli.add_command(base_group)
