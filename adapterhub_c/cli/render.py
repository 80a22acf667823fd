"""Rendering for the CLI: tables, JSON, progress bars. No logic lives here."""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from typing import Any, Iterable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adapterhub_c.errors import UsageError
from adapterhub_c.units import human_bytes as human_bytes  # the commands format sizes through render

console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Print valid JSON on stdout (datetimes and paths as strings)."""
    click.echo(json.dumps(obj, indent=2, default=str, sort_keys=False))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def echo_already_done(report: dict[str, Any]) -> bool:
    """For a rerun whose artefact an identical earlier run registered: say so; True if it did."""
    if not report.get("already_done"):
        return False
    click.echo(f"already done: {report['name']} (id {report['id'][:8]}, {report['kind']}, registered by an "
               "identical earlier run); nothing was recomputed")
    return True


def echo_warnings(result: Any) -> None:
    """Print a result's warnings as ``warning: …`` lines on stderr."""
    for message in getattr(result, "warnings", ()) or ():
        click.echo(f"warning: {message}", err=True)


def print_table(rows: list[dict[str, Any]], columns: Iterable[str], title: str | None = None) -> None:
    """A table of the given columns of ``rows``."""
    columns = list(columns)
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[fmt(row.get(c)) for c in columns])
    console.print(table)


@contextlib.contextmanager
def progress_callback() -> Iterator[Any]:
    """A ``progress(description, completed, total)`` callback drawing rich bars on a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)
    tasks: dict[str, Any] = {}

    def update(description: str, completed: int, total: int | None) -> None:
        if description not in tasks:
            tasks[description] = bars.add_task(description, total=total)
        bars.update(tasks[description], completed=completed, total=total)

    with bars:
        yield update


TOKEN_WARNING = "warning: --token is visible in ps; prefer HF_TOKEN or --token-file"


def token_options(help_text: str, envvar: str | None = None):
    """``--token`` and ``--token-file PATH|-`` (read the token from a file or stdin) for a
    command taking ``token``; a ``--token`` given on the command line warns on stderr."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, token=None, token_file=None, **kwargs):
            ctx = click.get_current_context()
            from_cli = ctx.get_parameter_source("token") == click.core.ParameterSource.COMMANDLINE
            if token_file is not None:
                if from_cli:
                    raise UsageError("give --token or --token-file, not both")
                try:
                    text = sys.stdin.read() if token_file == "-" else open(token_file, encoding="utf-8").read()
                except OSError as e:
                    raise UsageError(f"--token-file {token_file}: {e.strerror or e}") from None
                token = text.strip()
                if not token or any(c.isspace() for c in token):
                    raise UsageError(f"--token-file {token_file}: expected one token on one line")
            elif from_cli:
                click.echo(TOKEN_WARNING, err=True)
            return fn(*args, token=token, **kwargs)

        wrapper = click.option("--token-file", default=None, metavar="PATH|-",
                               help="Read the token from this file ('-': stdin).")(wrapper)
        return click.option("--token", envvar=envvar, default=None, help=help_text)(wrapper)
    return deco
