"""adapt variant create / add / ls / show."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.options import collect, options_from
from adapterhub_c.cli.render import (
    echo_warnings,
    human_bytes,
    print_json,
    print_table,
    progress_callback,
    token_options,
)
from adapterhub_c.options.variant import VariantAddOptions, VariantOptions

# sizes: bytes and their share of the base at 16 bits; the base column only when several bases are listed
LS_COLUMNS = ["name", "recipe", "params kept", "sparsity", "bits", "stored", "loaded", "export", "perplexity",
              "base ppl"]
SIZES_NOTE = ("sizes (% of the fp16 base): stored = what the variant adds to the store, loaded = in memory, "
              "export = hf folder (~ estimated until exported)")


def _size(v: dict, key: str) -> str:
    """'12.9 MB (5%)': bytes and their share of the fp16 base."""
    n, ratio = v.get(f"{key}_bytes"), v.get(f"{key}_ratio")
    if n is None:
        return "-"
    share = "" if ratio is None else " (<1%)" if ratio < 0.005 else f" ({ratio:.0%})"
    return human_bytes(n) + share


def _table_row(v: dict) -> dict:
    kept = v["params_kept"]
    frac = v["params_kept_frac"]
    return {
        "name": v["name"],
        "base": v["base"],
        "recipe": v["recipe"],
        "params kept": "-" if kept is None else f"{kept / 1e6:.2f}M ({frac:.0%})" if frac is not None else f"{kept:,}",
        "sparsity": v["sparsity"],
        "bits": v["bits_per_weight"],
        "stored": _size(v, "stored"),  # what the variant adds to the store (the base's blobs are shared)
        "loaded": _size(v, "loaded"),
        "export": ("" if v.get("export_measured") or v.get("export_bytes") is None else "~") + _size(v, "export"),
        "perplexity": v["perplexity"],
        "base ppl": v["base_perplexity"],
    }


@click.group("variant")
def variant_group() -> None:
    """Compressed variants of a base (quantization, pruning)."""


@variant_group.command("create")
@click.argument("base")
@options_from(VariantOptions)
@click.option("--name", default=None, help="Variant name (default <base>-<recipe>, e.g. smollm2-135m-nf4-wanda50).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def variant_create(obj, base, name, as_json, **fields) -> None:
    """Create a compressed variant of BASE (the same recipe on the same base is the same variant)."""
    options = collect(VariantOptions, fields)
    with progress_callback() as progress:
        row = api.create_variant(base, options, name=name, registry=obj.registry, progress=progress)
    echo_warnings(row)
    if as_json:
        print_json(row.report)
        return
    click.echo(f"{'created' if row.created else 'already exists (same recipe)'}: {row.name} (id {row.id[:8]})")
    print_table([_table_row(row.report)], LS_COLUMNS)


@variant_group.command("add")
@click.argument("repo")
@click.option("--base", required=True, help="The registered base the checkpoint is a quantized copy of.")
@options_from(VariantAddOptions)
@click.option("--name", default=None, help="Variant name (default: <base>-<repo name>).")
@token_options("Hub token (default: HF_TOKEN or the stored login); never stored or printed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def variant_add(obj, repo, base, name, token, as_json, **fields) -> None:
    """Register REPO (a pre-quantized Hub checkpoint of BASE: compressed-tensors, GPTQ, bitsandbytes; or a
    local folder) as a variant, its files stored as they are."""
    options = collect(VariantAddOptions, fields)
    with progress_callback() as progress:
        row = api.add_variant(repo, base, options, name=name, token=token, registry=obj.registry, progress=progress)
    echo_warnings(row)
    if as_json:
        print_json(row.report)
        return
    click.echo(f"{'added' if row.created else 'already registered (same checkpoint)'}: {row.name} (id {row.id[:8]})")
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
    bases = sorted({v["base"] for v in rows})
    columns = LS_COLUMNS if len(bases) <= 1 else LS_COLUMNS[:1] + ["base"] + LS_COLUMNS[1:]
    title = f"variants of {bases[0]}" if len(bases) == 1 else "variants"
    print_table([_table_row(v) for v in rows], columns, title=title)
    if rows:
        click.echo(SIZES_NOTE)


@variant_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def variant_show(obj, name, as_json) -> None:
    """One variant: recipe, storage, sizes next to the fp16 base, perplexity."""
    v = api.show_variant(name, registry=obj.registry)
    if as_json:
        print_json(v)
        return
    rows = [{"field": k, "value": val} for k, val in _table_row(v).items()]
    rows += [{"field": "ideal", "value": _size(v, "ideal")}, {"field": "fp16 base", "value": human_bytes(
        v["base_fp16_bytes"])}, {"field": "storage", "value": v["storage"]}, {"field": "id", "value": v["id"]}]
    print_table(rows, ["field", "value"], title=v["name"])
    click.echo(SIZES_NOTE)


def register(cli) -> None:
    cli.add_command(variant_group)
