"""adapt export."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import human_bytes, print_json, print_table, progress_callback


@click.command("export")
@click.argument("variant", metavar="NAME")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write (created).")
@click.option("--format", "fmt", type=click.Choice(api.EXPORT_FORMATS), default="hf", show_default=True,
              help="hf: transformers folder (bitsandbytes-serialized when quantized); compressed-tensors: "
                   "sparse-bitmask / pack-quantized; gguf: one .gguf llama.cpp loads + an ollama Modelfile.")
@click.option("--variant", "on_variant", default=None,
              help="gguf of an adapter: the variant it runs on (default: its own variant, else its base).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def export_cmd(obj, variant, out, fmt, on_variant, force, as_json) -> None:
    """Write VARIANT as a standalone folder that plain transformers (or llama.cpp / ollama: gguf) loads;
    or an adapter (--format gguf) as a GGUF LoRA beside its model's GGUF, with an ollama Modelfile."""
    with progress_callback() as progress:
        res = api.export(variant, out, fmt, force=force, registry=obj.registry, progress=progress,
                         on_variant=on_variant).report
    if as_json:
        print_json(res)
        return
    ratio = f" ({res['weights_bytes'] / res['base_fp16_bytes']:.3f}x the fp16 base)" if res["base_fp16_bytes"] else ""
    what = f"{res['adapter']} (on {res['variant']})" if res.get("adapter") else res["variant"]
    click.echo(f"exported {what} as {res['format']} to {res['out']}: weights "
               f"{human_bytes(res['weights_bytes'])}{ratio}")
    for note in res.get("notes") or ():
        click.echo(f"note: {note}")
    print_table([{"file": f["path"], "size": human_bytes(f["size"])} for f in res["files"]], ["file", "size"])


def register(cli) -> None:
    cli.add_command(export_cmd)
