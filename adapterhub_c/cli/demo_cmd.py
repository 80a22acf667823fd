"""adapt demo."""
from __future__ import annotations

import time

import click

from ..demo import DEMO_MAX_TOKENS, run_demo
from ..models.builtin import SMOLLM2
from .render import print_table, progress_callback


@click.command("demo")
@click.option("--base", default=SMOLLM2, show_default=True, help="Base to run the demo on.")
@click.option("--max-tokens", type=int, default=DEMO_MAX_TOKENS, show_default=True)
@click.pass_obj
def demo_cmd(obj, base: str, max_tokens: int) -> None:
    """Run the whole flow on the built-in base and print each step's table."""
    t0 = time.monotonic()
    with progress_callback() as progress:
        for title, rows in run_demo(obj.registry, base=base, max_tokens=max_tokens, progress=progress):
            print_table(rows, list(rows[0]) if rows else [], title=title)
    click.echo(f"demo finished in {time.monotonic() - t0:.0f} s")


def register(cli) -> None:
    cli.add_command(demo_cmd)
