"""The ``adapt`` command: global options, error handling, and the command groups."""
from __future__ import annotations

import sys
import traceback

import click

from adapterhub_c import __version__, api
from adapterhub_c.errors import AdaptError, AdaptWarning


class Context:
    """What every command gets: the registry, opened lazily with the global options."""

    def __init__(self, db: str | None, home: str | None, debug: bool):
        self.db, self.home, self.debug = db, home, debug
        self._registry = None

    @property
    def registry(self):
        if self._registry is None:
            self._registry = api.open_registry(home=self.home, db=self.db)
        return self._registry


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapt")
@click.option("--db", envvar="ADAPTERHUB_DB_URL", help="Registry database URL (default: SQLite in the home folder).")
@click.option("--home", envvar="ADAPTERHUB_HOME", help="Home folder for the registry and blobs.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, db: str | None, home: str | None, debug: bool) -> None:
    """adapterhub-c: many LoRA adapters on compressed models."""
    ctx.obj = Context(db, home, debug)
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Our own progress bars replace those of transformers and huggingface_hub."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # deprecation chatter of the libraries, not actionable by a user of `adapt`
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # ours reach the user as `warning: …` lines from each command's result
    warnings.filterwarnings("ignore", category=AdaptWarning)
    # transformers reads these when imported; most commands never import it (listings stay fast)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


COMMAND_MODULES = ("registry_cmds", "base_cmds", "eval_cmds", "variant_cmds", "hub_cmds", "adapt_cmds",
                   "pack_cmds", "merge_cmds", "prompt_cmds", "batch_cmds", "demo_cmd", "serve_cmds", "export_cmds", "ui_cmds")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(cli)


_register_commands()


def _one_line(message: str) -> str:
    """click's messages (e.g. a missing Choice option lists its choices one per line) on one line."""
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit 2 / 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="adapt", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except AdaptError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still one line without --debug
        if debug:
            traceback.print_exc()
        click.echo(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
