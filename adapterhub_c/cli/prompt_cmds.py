"""adapt prompt learn / transfer (Compress, Then Prompt soft prompts)."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.options import collect, options_from
from adapterhub_c.cli.render import echo_already_done, print_json, print_table, progress_callback
from adapterhub_c.options.prompt import PromptOptions, TransferOptions


@click.group("prompt")
def prompt_group() -> None:
    """Soft prompts learned on compressed variants (Compress, Then Prompt)."""


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@prompt_group.command("learn")
@click.option("--variant", "target", required=True,
              help="Variant to learn the prompt on (a base name learns it on the uncompressed base).")
@options_from(PromptOptions)
@click.option("--name", default=None, help="Artefact name (default: prompt-<variant>-k<tokens>).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def prompt_learn(obj, target, name, as_json, **fields):
    """Learn a soft prompt on a variant; registered as a prompt artefact, before/after perplexity recorded."""
    options = collect(PromptOptions, fields)
    with progress_callback() as progress:
        report = api.learn_prompt(target, options, name=name, registry=obj.registry, progress=progress).report
    if as_json:
        print_json(report)
    elif not echo_already_done(report):
        print_table([report], ["name", "learned_on", "tokens", "steps", "perplexity_before",
                               "perplexity_after", "final_loss", "train_wall_s"], title="prompt learned")


@prompt_group.command("transfer")
@click.option("--prompts", required=True, help="Comma-separated prompt artefacts (rows).")
@click.option("--variants", required=True, help="Comma-separated variants, or the base (columns).")
@click.option("--data", required=True, help="builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file.")
@options_from(TransferOptions)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def prompt_transfer_cmd(obj, prompts, variants, data, as_json, **fields):
    """Perplexity of every prompt on every variant: the transfer matrix (rows learned on, columns applied to)."""
    options = collect(TransferOptions, fields)
    with progress_callback() as progress:
        matrix = api.transfer_prompts(_split_list(prompts), _split_list(variants), data, options,
                                      registry=obj.registry, progress=progress)
    if as_json:
        print_json(matrix)
        return
    rows = []
    for row, learned_on, line in zip(matrix["rows"], matrix["learned_on"], matrix["values"], strict=False):
        rows.append({"prompt": row, "learned on": learned_on or "-", **dict(zip(matrix["columns"], line, strict=False))})
    print_table(rows, ["prompt", "learned on", *matrix["columns"]],
                title=f"perplexity on {data} {options.split} ({matrix['tokens']} tokens)")
    if matrix.get("plot"):
        click.echo(f"heat map: {matrix['plot']}")


def register(cli) -> None:
    cli.add_command(prompt_group)
