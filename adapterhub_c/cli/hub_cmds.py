"""adapt pull / search / push / hub serve."""
from __future__ import annotations

import sys

import click

from adapterhub_c import api
from adapterhub_c.cli.render import (
    echo_warnings,
    human_bytes,
    print_json,
    print_table,
    progress_callback,
    token_options,
)

TOKEN_HELP = "Hub token (default: HF_TOKEN or the stored login); never stored or printed."


@click.command("pull")
@click.argument("repo")
@click.option("--revision", default=None, help="Branch, tag or commit (same as REPO@REV).")
@click.option("--include", multiple=True, help="Only files matching this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip files matching this glob (repeatable).")
@click.option("--name", default=None, help="Registry name (default: the repo id).")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin weights (read with torch's safe loader, stored as safetensors).")
@click.option("--with-base", is_flag=True, help="Also fetch the base model's weights.")
@click.option("--base", "base", default=None,
              help="Attach to this registered base (config naming none, a -bnb-4bit/GPTQ/AWQ copy, …); "
                   "the shape check decides.")
@token_options(TOKEN_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def pull_cmd(obj, repo, revision, include, exclude, name, allow_pickle, with_base, base, token, as_json):
    """Pull a LoRA adapter REPO[@REV] from the Hub into the registry (HF_ENDPOINT, HF_HUB_OFFLINE honoured)."""
    with progress_callback() as progress:
        art = api.pull(repo, revision=revision, name=name, registry=obj.registry, progress=progress,
                       include=include or None, exclude=exclude or None, allow_pickle=allow_pickle, token=token,
                       with_base=with_base, base=base)
    row = art.report
    echo_warnings(art)
    if as_json:
        print_json(row)
        return
    state = "pulled" if art.created else "already in the registry"
    click.echo(f"{state}: {art.name} ({row['source']}, {human_bytes(row['size_bytes'])}, id {art.id[:8]}) "
               f"for base {row['base']}" + (" (reference only)" if row["base_reference_only"] else ""))


@click.command("search")
@click.option("--base", required=True, help="Base model (hub id or registered base).")
@click.option("--limit", type=int, default=50, show_default=True)
@token_options(TOKEN_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def search_cmd(obj, base, limit, token, as_json):
    """Find LoRA adapters of a base on the Hub (filter base_model:adapter:<BASE>)."""
    rows = api.search(base, limit=limit, token=token, registry=obj.registry)
    if as_json:
        print_json(rows)
        return
    for r in rows:
        r["pulled_as"] = ", ".join(r["pulled_as"]) or None
        r["sha8"] = (r.get("sha") or "")[:8] or None
    print_table(rows, ["id", "sha8", "last_modified", "pulled", "pulled_as"], title=f"adapters of {base}")


@click.command("push")
@click.argument("name")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (new repos only).")
@click.option("--format", "fmt", type=click.Choice(["peft", "pack", "both", "gguf"]), default="peft",
              show_default=True, help="PEFT folder, the pack file (packs only), or both; a variant: gguf pushes its "
                                      "GGUF + ollama Modelfile instead of its hf export.")
@click.option("--commit-message", default=None)
@click.option("--dry-run", is_flag=True, help="List the files that would be pushed; upload nothing.")
@token_options(TOKEN_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def push_cmd(obj, name, repo_id, private, fmt, commit_message, dry_run, token, as_json):
    """Push adapter NAME to the Hub repo REPO_ID (PEFT folder + adapterhub_c.json + model card)."""
    with progress_callback() as progress:
        out = api.push(name, repo_id, registry=obj.registry, progress=progress, private=private, fmt=fmt,
                       commit_message=commit_message, dry_run=dry_run, token=token).report
    if as_json:
        print_json(out)
        return
    rows = [{"file": f["path"], "size": human_bytes(f["size"]), "sha256": f["sha256"][:16]} for f in out["files"]]
    print_table(rows, ["file", "size", "sha256"], title=f"{'would push' if dry_run else 'pushed'} to {repo_id}")
    if not dry_run:
        what = "new commit" if out["uploaded"] else "unchanged, nothing uploaded"
        click.echo(f"{out['url']} @ {out['commit_sha']} ({what})")


@click.group("hub")
def hub_group() -> None:
    """A local Hugging Face Hub-compatible server."""


@hub_group.command("serve")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Folder holding the repos.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 picks a free port.")
@token_options("Writes (and private repos) need this token (env ADAPTERHUB_HUB_TOKEN).",
               envvar="ADAPTERHUB_HUB_TOKEN")
@click.option("--max-body-bytes", type=int, default=None,
              help="Largest JSON request body (create, preupload, paths-info, validate-yaml); 413 above. "
                   "Default 8 MiB.")
@click.option("--max-upload-bytes", type=int, default=None,
              help="Largest commit body (files inline or LFS); 413 above. Default: the server's.")
@click.pass_obj
def hub_serve(obj, root, host, port, token, max_body_bytes, max_upload_bytes) -> None:
    """Serve Hub repos from ROOT until interrupted; point clients at it with HF_ENDPOINT."""
    def ready(endpoint: str) -> None:
        click.echo(f"serving {root} at {endpoint} "
                   f"({'writes need the token' if token else 'no token: anyone who can connect may write'})")
        click.echo(f"use it with: export HF_ENDPOINT={endpoint} HF_HUB_DISABLE_XET=1")
        sys.stdout.flush()

    def warn(message: str) -> None:
        click.echo(f"warning: {message}", err=True)

    api.serve_hub(root, host=host, port=port, token=token, ready=ready, warn=warn,
                  max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)


def register(cli) -> None:
    cli.add_command(pull_cmd)
    cli.add_command(search_cmd)
    cli.add_command(push_cmd)
    cli.add_command(hub_group)
