"""adapt ui."""
from __future__ import annotations

import click

from adapterhub_c import api


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind (loopback by default; anything else needs a token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@click.option("--token", default=None, help="Token every page requires [$ADAPTERHUB_UI_TOKEN].")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.pass_obj
def ui_cmd(obj, host: str, port: int, token: str | None, open_browser: bool) -> None:
    """Serve a read-only web page over the registry: model trees, artefacts, compare, runs, search."""

    def ready(url: str, needs_token: bool) -> None:
        note = " (every page needs the token: send it once as ?token=…)" if needs_token else ""
        click.echo(f"adapt ui: {url}{note}; Ctrl-C to stop", err=False)
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    api.ui(host=host, port=port, token=token, home=obj.home, db=obj.db, ready=ready)


def register(cli) -> None:
    cli.add_command(ui_cmd)
