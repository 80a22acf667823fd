"""adapt demo."""
from __future__ import annotations

import time

import click

from adapterhub_c import api
from adapterhub_c.cli.render import print_table, progress_callback


@click.command("demo")
@click.option("--base", default=api.DEFAULT_DEMO_BASE, show_default=True, help="Base to run the demo on.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Perplexity token budget per evaluation (default: the demo's).")
@click.pass_obj
def demo_cmd(obj, base: str, max_tokens: int | None) -> None:
    """Run the whole flow on the built-in base and print each step's table.

    Base and perplexity, the NF4 + 50% Wanda variant, short task LoRAs, push/pull through a
    local hub, CA-LoRA conversion, a pack, merge and compose, a soft prompt.
    """
    t0 = last = time.monotonic()
    with progress_callback() as progress:
        for title, rows in api.demo(base=base, max_tokens=max_tokens, registry=obj.registry, progress=progress):
            now = time.monotonic()
            print_table(rows, list(rows[0]) if rows else [], title=f"{title} [{now - last:.0f} s]")
            last = now
    click.echo(f"demo finished in {time.monotonic() - t0:.0f} s")
    click.echo(f"browse what it made: {api.ui_command(home=obj.home, db=obj.db)}")


def register(cli) -> None:
    cli.add_command(demo_cmd)
