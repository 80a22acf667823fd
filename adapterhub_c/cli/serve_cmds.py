"""adapt serve."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.options.serve import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES


@click.command("serve")
@click.argument("target")
@click.option("--host", default=api.SERVE_HOST, show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: any free one).")
@click.option("--adapters", default=None, help="Serve these adapters / prompts (comma-separated), loaded at start.")
@click.option("--all", "serve_all", is_flag=True, help="Serve every adapter and prompt of TARGET's base (on demand).")
@click.option("--max-resident", type=int, default=None, help="Keep at most N adapters in memory (LRU).")
@click.option("--max-resident-mb", type=float, default=None, help="Keep at most M MiB of adapters in memory (LRU).")
@click.option("--token", default=None, help=f"Bearer token required on every endpoint but /health [${api.SERVE_TOKEN_ENV}].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--allow-pull", is_flag=True, help="/v1/load_adapter may pull a Hub repo (owner/name) on demand.")
@click.option("--log-requests", is_flag=True, help="Record every request (prompt included) as a runs row.")
@click.option("--max-batch", type=int, default=64, show_default=True, help="Sequences generated at once.")
@click.option("--batch-window-ms", type=float, default=5.0, show_default=True,
              help="Wait this long after a request for others to batch with it.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BODY_BYTES, show_default=True,
              help="Larger request bodies are refused with 413, unread.")
@click.option("--body-timeout", "body_timeout_s", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_BODY_TIMEOUT_S, show_default=True,
              help="Seconds a request body may take to arrive; then 408 and the connection is closed.")
@click.pass_obj
def serve_cmd(obj, target, host, port, adapters, serve_all, max_resident, max_resident_mb, token, device,
              allow_pull, log_requests, max_batch, batch_window_ms, max_body_bytes, body_timeout_s):
    """Serve TARGET (a base or variant) and its adapters behind an OpenAI-compatible API."""
    api.serve(target, host=host, port=port, registry=obj.registry,
              adapters=[a.strip() for a in adapters.split(",") if a.strip()] if adapters else None,
              all=serve_all, max_resident=max_resident, max_resident_mb=max_resident_mb, token=token, device=device,
              allow_pull=allow_pull, log_requests=log_requests, max_batch=max_batch, batch_window_ms=batch_window_ms,
              max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
              ready=lambda endpoint, srv: click.echo(f"serving {srv.target.name} at {endpoint} "
                                                     f"(OpenAI base_url {endpoint}/v1); Ctrl-C to stop", err=True),
              warn=lambda message: click.echo(f"warning: {message}", err=True))


def register(cli) -> None:
    cli.add_command(serve_cmd)
