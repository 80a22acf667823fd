"""adapt train / convert."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import (
    echo_already_done,
    echo_warnings,
    human_bytes,
    print_json,
    print_table,
    progress_callback,
)

TRAIN, CONVERT = api.TRAIN_DEFAULTS, api.CONVERT_DEFAULTS

DEVICE = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")


def _targets(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _metric_columns(rows: list[dict]) -> list[str]:
    return [m for m in ("perplexity", "completion_ppl", "exact_match") if any(m in r for r in rows)]


@click.command("train")
@click.argument("target")
@click.option("--data", required=True, help="builtin:pydoc, builtin:task/<name>, or a .txt/.jsonl file.")
@click.option("--variant", default=None, help="Train on this compressed variant of the base (QLoRA when quantized).")
@click.option("--rank", type=int, default=TRAIN["rank"], show_default=True)
@click.option("--alpha", type=float, default=TRAIN["alpha"], show_default=True)
@click.option("--targets", default=None, help="Comma-separated module names [default: the attention linears, "
              "e.g. q_proj,k_proj,v_proj,o_proj; c_attn,attn.c_proj on GPT-2].")
@click.option("--steps", type=int, default=TRAIN["steps"], show_default=True)
@click.option("--lr", type=float, default=TRAIN["lr"], show_default=True)
@click.option("--batch-size", type=int, default=TRAIN["batch_size"], show_default=True)
@click.option("--seq-len", type=int, default=TRAIN["seq_len"], show_default=True)
@click.option("--grad-accum", type=int, default=TRAIN["grad_accum"], show_default=True)
@click.option("--seed", type=int, default=TRAIN["seed"], show_default=True)
@click.option("--checkpoint-every", type=int, default=TRAIN["checkpoint_every"], show_default=True,
              help="Also checkpoint every N steps (always at the end and on Ctrl-C).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run with the same options.")
@click.option("--eval-data", default=None, help="Evaluate on this data instead of DATA.")
@click.option("--max-eval-tokens", type=int, default=TRAIN["max_eval_tokens"], show_default=True)
@click.option("--max-eval-examples", type=int, default=TRAIN["max_eval_examples"], show_default=True)
@DEVICE
@click.option("--name", default=None, help="Name of the new adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def train_cmd(obj, target, data, variant, rank, alpha, targets, steps, lr, batch_size, seq_len, grad_accum, seed,
              checkpoint_every, resume, eval_data, max_eval_tokens, max_eval_examples, device, name, as_json):
    """Train a LoRA on TARGET (a base or a variant) and register it."""
    with progress_callback() as progress:
        art = api.train(target, data, registry=obj.registry, variant=variant, rank=rank, alpha=alpha,
                        targets=_targets(targets), steps=steps, lr=lr, batch_size=batch_size,
                        seq_len=seq_len, grad_accum=grad_accum, seed=seed,
                        checkpoint_every=checkpoint_every, name=name, eval_data=eval_data,
                        max_eval_tokens=max_eval_tokens, max_eval_examples=max_eval_examples,
                        device=device, resume=resume, progress=progress)
    report = art.report
    if as_json:
        print_json(report)
        return
    if echo_already_done(report):
        return
    t = report["train"] or {}
    print_table([{"adapter": art.name, "on": report["variant"] or report["base"], "steps": t.get("steps"),
                  "loss start": t.get("loss_start_avg"), "loss end": t.get("loss_end_avg"),
                  "time (s)": t.get("wall_s"), "tokens/s": t.get("tokens_per_s"),
                  "size": human_bytes(report["size_bytes"])}],
                ["adapter", "on", "steps", "loss start", "loss end", "time (s)", "tokens/s", "size"],
                title="trained")
    rows = [{"model": "before training", **(report["before"] or {})}] if report["before"] else []
    rows.append({"model": art.name, **report["after"]})
    print_table(rows, ["model"] + _metric_columns(rows),
                title=f"{report['eval_data']} ({report['eval_split']})")


@click.command("convert")
@click.argument("adapter")
@click.option("--variant", required=True, help="The compressed variant to carry ADAPTER to.")
@click.option("--data", default=None, help="Training data; without it: inherit only, no training.")
@click.option("--eval-data", default=None, help="Evaluation data [default: DATA, else the adapter's own data].")
@click.option("--no-inherit", is_flag=True, help="Start the LoRA fresh instead of from ADAPTER.")
@click.option("--no-recover", is_flag=True, help="No recovery modules.")
@click.option("--recover", "recover_method", type=click.Choice(api.RECOVER_METHODS), default=None,
              help="modules: CA-LoRA recovery modules (trained with --data) [default]; lowrank: fold the "
                   "compression error into the LoRA (activation-weighted low rank, no data needed; plain PEFT).")
@click.option("--no-distill", is_flag=True, help="Task loss only, no teacher.")
@click.option("--recover-rank", type=int, default=CONVERT["recover_rank"], show_default=True,
              help="Recovery modules' rank; lowrank: the rank added to the source's on every layer.")
@click.option("--recover-act", default=CONVERT["recover_act"], show_default=True, help="gelu, relu, silu or identity.")
@click.option("--targets", "recover_targets", type=click.Choice(api.COMPENSATE_TARGETS),
              default=CONVERT["recover_targets"], show_default=True,
              help="lowrank: compensate the attention projections or all decoder linears.")
@click.option("--calib", default=None,
              help="lowrank: calibration data [default: the variant's own, else builtin:pydoc].")
@click.option("--calib-samples", type=int, default=CONVERT["calib_samples"], show_default=True,
              help="lowrank: calibration sequences (moments are cached per variant).")
@click.option("--calib-seq-len", type=int, default=CONVERT["calib_seq_len"], show_default=True,
              help="lowrank: tokens per calibration sequence.")
@click.option("--distill-alpha", type=float, default=CONVERT["distill_alpha"], show_default=True)
@click.option("--distill-on", type=click.Choice(api.DISTILL_ON), default=CONVERT["distill_on"], show_default=True)
@click.option("--steps", type=int, default=CONVERT["steps"], show_default=True)
@click.option("--lr", type=float, default=CONVERT["lr"], show_default=True)
@click.option("--batch-size", type=int, default=CONVERT["batch_size"], show_default=True)
@click.option("--seq-len", type=int, default=CONVERT["seq_len"], show_default=True)
@click.option("--grad-accum", type=int, default=CONVERT["grad_accum"], show_default=True)
@click.option("--seed", type=int, default=CONVERT["seed"], show_default=True)
@click.option("--checkpoint-every", type=int, default=CONVERT["checkpoint_every"], show_default=True)
@click.option("--resume", is_flag=True, help="Continue the interrupted run with the same options.")
@click.option("--max-eval-tokens", type=int, default=CONVERT["max_eval_tokens"], show_default=True)
@click.option("--max-eval-examples", type=int, default=CONVERT["max_eval_examples"], show_default=True)
@DEVICE
@click.option("--name", default=None, help="Name of the converted adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def convert_cmd(obj, adapter, variant, data, eval_data, no_inherit, no_recover, recover_method, no_distill,
                recover_rank, recover_act, recover_targets, calib, calib_samples, calib_seq_len, distill_alpha,
                distill_on, steps, lr, batch_size, seq_len, grad_accum, seed, checkpoint_every, resume,
                max_eval_tokens, max_eval_examples, device, name, as_json):
    """Carry ADAPTER to a compressed variant of its base (CA-LoRA: inherit, recover, distill)."""
    if no_recover and recover_method:
        raise click.UsageError("--no-recover and --recover exclude each other")
    with progress_callback() as progress:
        art = api.convert(adapter, variant, registry=obj.registry, data=data, eval_data=eval_data,
                          inherit=not no_inherit, recover=False if no_recover else (recover_method or True),
                          distill=not no_distill, recover_rank=recover_rank, recover_act=recover_act,
                          recover_targets=recover_targets, calib=calib, calib_samples=calib_samples,
                          calib_seq_len=calib_seq_len,
                          distill_alpha=distill_alpha, distill_on=distill_on, steps=steps, lr=lr,
                          batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, seed=seed,
                          checkpoint_every=checkpoint_every, name=name,
                          max_eval_tokens=max_eval_tokens, max_eval_examples=max_eval_examples,
                          device=device, resume=resume, progress=progress)
    report = art.report
    echo_warnings(art)
    if as_json:
        print_json(report)
        return
    if echo_already_done(report):
        return
    rows = [{**r, "size": human_bytes(r.get("size_bytes"))} for r in report["rows"]]
    mode = "+".join(("recover lowrank" if k == "recover" and report["recover_method"] == "lowrank" else k)
                    for k in ("inherit", "recover", "distill") if report[k]) or "fresh LoRA"
    t = report["train"]
    trained = f"{t['steps']} steps, loss {t['loss_start_avg']:.4g} → {t['loss_end_avg']:.4g}" if t else "no training"
    print_table(rows, ["row"] + _metric_columns(rows) + ["size"],
                title=f"{art.name} ({mode}; {trained}) on {report['eval_data']} ({report['eval_split']})")
    if report["gap_closed"]:
        click.echo("gap closed (converted vs naive, of teacher vs naive): "
                   + ", ".join(f"{k} {v:.0%}" for k, v in report["gap_closed"].items()))


def register(cli) -> None:
    cli.add_command(train_cmd)
    cli.add_command(convert_cmd)
