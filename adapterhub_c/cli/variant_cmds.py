"""adapt variant create / ls."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import human_bytes, print_json, print_table, progress_callback

DEFAULTS = api.VARIANT_DEFAULTS

LS_COLUMNS = ["name", "base", "recipe", "params kept", "sparsity", "bits/weight", "stored", "ideal", "perplexity",
              "base ppl"]


def _table_row(v: dict) -> dict:
    kept = v["params_kept"]
    frac = v["params_kept_frac"]
    stored = human_bytes(v["stored_bytes"])
    if v.get("shares_base_weights"):
        stored = f"{human_bytes(v['own_bytes'])} + base"  # quantization-only: the base's weight blobs are reused
    return {
        "name": v["name"],
        "base": v["base"],
        "recipe": v["recipe"],
        "params kept": "-" if kept is None else f"{kept / 1e6:.2f}M ({frac:.0%})" if frac is not None else f"{kept:,}",
        "sparsity": v["sparsity"],
        "bits/weight": v["bits_per_weight"],
        "stored": stored,
        "ideal": human_bytes(v["ideal_bytes"]),
        "perplexity": v["perplexity"],
        "base ppl": v["base_perplexity"],
    }


@click.group("variant")
def variant_group() -> None:
    """Compressed variants of a base (quantization, pruning)."""


@variant_group.command("create")
@click.argument("base")
@click.option("--quant", type=click.Choice(api.QUANT_METHODS), default="none", show_default=True,
              help="bitsandbytes quantization of the decoder linears, applied at load.")
@click.option("--double-quant", is_flag=True, help="Quantize the 4-bit scales too (nf4/fp4).")
@click.option("--prune", type=click.Choice(api.PRUNE_METHODS), default="none", show_default=True,
              help="Pruning method (magnitude/wanda: unstructured; 2:4: semi-structured; ffn-channels: MLP channels).")
@click.option("--sparsity", type=float, default=None,
              help="Fraction of the pruned weights (or MLP channels) removed, in [0, 1); 2:4 is 0.5.")
@click.option("--granularity", type=click.Choice(api.GRANULARITIES), default=None,
              help="magnitude/wanda: rank weights per output row (default) or per whole layer.")
@click.option("--calib", default=None,
              help=f"Calibration data for wanda, 2:4 and ffn-channels (default {api.DEFAULT_CALIB}; 'none' for "
                   "magnitude-scored 2:4 / ffn-channels).")
@click.option("--calib-samples", type=int, default=DEFAULTS["calib_samples"], show_default=True,
              help="Calibration sequences.")
@click.option("--calib-seq-len", type=int, default=DEFAULTS["calib_seq_len"], show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--eval-tokens", type=int, default=DEFAULTS["eval_tokens"], show_default=True,
              help="Measure perplexity on this many builtin:pydoc test tokens (0 skips).")
@click.option("--name", default=None, help="Variant name (default <base>-<recipe>, e.g. smollm2-135m-nf4-wanda50).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def variant_create(obj, base, quant, double_quant, prune, sparsity, granularity, calib, calib_samples,
                   calib_seq_len, eval_tokens, name, device, as_json) -> None:
    """Create a compressed variant of BASE (the same recipe on the same base is the same variant)."""
    with progress_callback() as progress:
        row = api.create_variant(base, quant=quant, prune=prune, sparsity=sparsity,
                                 calib=api.DEFAULT_CALIB if calib is None else calib, registry=obj.registry,
                                 progress=progress, double_quant=double_quant, granularity=granularity,
                                 calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                                 name=name, eval_tokens=eval_tokens, device=device)
    if as_json:
        print_json(row.report)
        return
    click.echo(f"{'created' if row.created else 'already exists (same recipe)'}: {row.name} (id {row.id[:8]})")
    print_table([_table_row(row.report)], LS_COLUMNS)


@variant_group.command("ls")
@click.option("--base", default=None, help="Only the variants of this base.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def variant_ls(obj, base, as_json) -> None:
    """List variants: recipe, parameters kept, sparsity, bits per weight, sizes, perplexity."""
    rows = api.list_variants(base, registry=obj.registry)
    if as_json:
        print_json(rows)
        return
    print_table([_table_row(v) for v in rows], LS_COLUMNS, title="variants")


def register(cli) -> None:
    cli.add_command(variant_group)
