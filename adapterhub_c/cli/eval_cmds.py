"""adapt eval / generate."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import print_json, print_table, progress_callback

STACK_OPTIONS = [
    click.option("--variant", default=None, help="Run on this compressed variant of the base."),
    click.option("--adapter", default=None, help="Apply this adapter (LoRA, converted LoRA or pack)."),
    click.option("--prompt", "soft_prompt", default=None, help="Prepend this learned soft prompt."),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto."),
]


def stack_options(fn):
    for opt in reversed(STACK_OPTIONS):
        fn = opt(fn)
    return fn


@click.command("eval")
@click.argument("target")
@click.option("--data", required=True, help="builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens (perplexity).")
@click.option("--max-examples", type=int, default=None, help="Score at most this many examples (tasks).")
@stack_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def eval_cmd(obj, target, data, split, max_tokens, max_examples, variant, adapter, soft_prompt, device, as_json):
    """Measure perplexity (text) or completion perplexity and exact match (tasks) of TARGET; results are recorded."""
    with progress_callback() as progress:
        row = api.evaluate(target, data, registry=obj.registry, split=split, variant=variant, adapter=adapter,
                           prompt=soft_prompt, max_tokens=max_tokens, max_examples=max_examples, device=device,
                           progress=progress).report
    if as_json:
        print_json(row)
    else:
        print_table([row], [k for k in row], title="evaluation")


@click.command("generate")
@click.argument("target")
@click.argument("text")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the text in the model's chat template.")
@stack_options
@click.pass_obj
def generate_cmd(obj, target, text, max_new_tokens, chat, variant, adapter, soft_prompt, device):
    """Greedy continuation of TEXT by TARGET."""
    out = api.generate(target, text, registry=obj.registry, max_new_tokens=max_new_tokens, chat=chat,
                       variant=variant, adapter=adapter, prompt=soft_prompt, device=device)
    click.echo(out.report["text"])


def register(cli) -> None:
    cli.add_command(eval_cmd)
    cli.add_command(generate_cmd)
