"""adapt prompt learn / transfer (Compress, Then Prompt soft prompts)."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import echo_already_done, print_json, print_table, progress_callback

DEFAULTS = api.PROMPT_DEFAULTS


@click.group("prompt")
def prompt_group() -> None:
    """Soft prompts learned on compressed variants (Compress, Then Prompt)."""


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@prompt_group.command("learn")
@click.option("--variant", "target", required=True,
              help="Variant to learn the prompt on (a base name learns it on the uncompressed base).")
@click.option("--data", default=api.DEFAULT_CORPUS, show_default=True,
              help="Training text: builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file (train split).")
@click.option("--tokens", type=int, default=DEFAULTS["tokens"], show_default=True, help="Prompt length k.")
@click.option("--init", default="vocab-sample", show_default=True,
              help="vocab-sample (random real-token embeddings) or text:\"…\".")
@click.option("--steps", type=int, default=DEFAULTS["steps"], show_default=True)
@click.option("--lr", type=float, default=DEFAULTS["lr"], show_default=True)
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"], show_default=True)
@click.option("--seq-len", type=int, default=DEFAULTS["seq_len"], show_default=True)
@click.option("--eval-tokens", type=int, default=None,
              help="Measure before/after perplexity on at most this many test tokens.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Checkpoint every N steps (always at the end and on Ctrl-C).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint of an interrupted run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--name", default=None, help="Artefact name (default: prompt-<variant>-k<tokens>).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def prompt_learn(obj, target, data, tokens, init, steps, lr, batch_size, seq_len, eval_tokens,
                 checkpoint_every, resume, seed, device, name, as_json):
    """Learn a soft prompt on a variant; registered as a prompt artefact, before/after perplexity recorded."""
    with progress_callback() as progress:
        report = api.learn_prompt(target, registry=obj.registry, progress=progress, data=data, tokens=tokens,
                                  init=init, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                                  eval_tokens=eval_tokens, checkpoint_every=checkpoint_every, seed=seed, name=name,
                                  device=device, resume=resume).report
    if as_json:
        print_json(report)
    elif not echo_already_done(report):
        print_table([report], ["name", "learned_on", "tokens", "steps", "perplexity_before",
                               "perplexity_after", "final_loss", "train_wall_s"], title="prompt learned")


@prompt_group.command("transfer")
@click.option("--prompts", required=True, help="Comma-separated prompt artefacts (rows).")
@click.option("--variants", required=True, help="Comma-separated variants, or the base (columns).")
@click.option("--data", required=True, help="builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens per cell.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Write a heat map PNG here.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def prompt_transfer_cmd(obj, prompts, variants, data, split, max_tokens, plot, device, as_json):
    """Perplexity of every prompt on every variant: the transfer matrix (rows learned on, columns applied to)."""
    with progress_callback() as progress:
        matrix = api.transfer_prompts(_split_list(prompts), _split_list(variants), data, registry=obj.registry,
                                      progress=progress, split=split, plot=plot, max_tokens=max_tokens,
                                      device=device)
    if as_json:
        print_json(matrix)
        return
    rows = []
    for row, learned_on, line in zip(matrix["rows"], matrix["learned_on"], matrix["values"], strict=False):
        rows.append({"prompt": row, "learned on": learned_on or "-", **dict(zip(matrix["columns"], line, strict=False))})
    print_table(rows, ["prompt", "learned on", *matrix["columns"]],
                title=f"perplexity on {data} {split} ({matrix['tokens']} tokens)")
    if matrix.get("plot"):
        click.echo(f"heat map: {matrix['plot']}")


def register(cli) -> None:
    cli.add_command(prompt_group)
