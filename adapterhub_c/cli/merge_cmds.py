"""adapt merge / compose."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.render import echo_already_done, print_json, print_table, progress_callback

COMPOSE = api.COMPOSE_DEFAULTS


@click.command("merge")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--method", required=True, type=click.Choice(["task-arithmetic", "ties", "dare-linear", "dare-ties"]),
              help="Merge rule.")
@click.option("--weights", default=None, help="One weight per adapter, comma-separated (default 1 each).")
@click.option("--density", type=float, default=None, help="Fraction kept by ties/dare, in (0, 1].")
@click.option("--majority", default="total", show_default=True, type=click.Choice(["total", "frequency"]),
              help="TIES sign election: sign of the sum, or of the count.")
@click.option("--convention", default="peft", show_default=True, type=click.Choice(["peft", "mergekit"]),
              help="TIES: elect on unweighted vectors and divide by the count (peft), or on weighted ones "
                   "and divide by the sum of weights (mergekit).")
@click.option("--rescale", default=None, type=click.Choice(api.RESCALES),
              help="DARE: keep each input's L1 norm (l1, mergekit's rule; default with --convention mergekit) "
                   "or multiply kept entries by 1/density (inverse-p, the DARE paper and PEFT; default with peft).")
@click.option("--space", default="delta", show_default=True, type=click.Choice(["delta", "factors"]),
              help="Merge the true ΔW = s·B·A (delta), or A and B separately (factors; equal ranks).")
@click.option("--rank", type=int, default=None, help="Output rank (delta space; default exact for task "
                                                      "arithmetic, else the largest input rank).")
@click.option("--seed", type=int, default=0, show_default=True, help="DARE drop seed.")
@click.option("--svd", default="randomized", show_default=True, type=click.Choice(["randomized", "exact"]),
              help="Delta space, rank below the merge's: seeded randomized subspace iteration (within "
                   "~1e-5 of optimal) or a full decomposition (exact, slower).")
@click.option("--name", default=None, help="Name of the merged artefact.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--election", default="auto", show_default=True, type=click.Choice(["auto", "popcount", "dense"]),
              help="TIES over packs: popcount sign election where exact (auto), insist on it, or never.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def merge_cmd(obj, adapters, method, weights, density, majority, convention, rescale, space, rank, seed, svd, name,
              device, election, as_json):
    """Merge ADAPTERS (LoRAs, converted LoRAs, packs) into one LoRA artefact."""
    with progress_callback() as progress:
        report = api.merge(adapters, method, registry=obj.registry, progress=progress, weights=weights,
                           density=density, majority=majority, convention=convention, space=space, rank=rank,
                           seed=seed, svd=svd, name=name, device=device, election=election, rescale=rescale).report
    if as_json:
        print_json(report)
        return
    if echo_already_done(report):
        return
    print_table(report["inputs"], ["name", "kind", "weight"], title=f"merged {report['artifact']}")
    keys = ["method", "space", "svd", "density", "majority", "convention", "rescale", "election", "ranks", "parameters",
            "read_seconds", "merge_seconds", "device"]
    print_table([report], [k for k in keys if report.get(k) is not None])
    if report.get("election_reason"):
        click.echo(f"sign election: {report['election']} ({report['election_reason']})")


@click.command("compose")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--examples", required=True, help="A .jsonl file of prompt/completion lines, or builtin:task/<name>.")
@click.option("--shots", type=int, default=None, help="Use the first N examples (default: all of a file, "
                                                      "5 of a built-in task).")
@click.option("--budget", type=int, default=COMPOSE["budget"], show_default=True, help="Loss evaluations of the search.")
@click.option("--bounds", default="-1.5,1.5", show_default=True, help="Weight bounds 'lower,upper'.")
@click.option("--l1", type=float, default=COMPOSE["l1"], show_default=True, help="Penalty on mean |w|.")
@click.option("--optimizer", default=COMPOSE["optimizer"], show_default=True, help="A nevergrad optimizer name.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default=None, help="Name of the composed artefact.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def compose_cmd(obj, adapters, examples, shots, budget, bounds, l1, optimizer, seed, name, device, as_json):
    """LoraHub-style composition of ADAPTERS, weights searched on a few examples."""
    with progress_callback() as progress:
        report = api.compose(adapters, examples, registry=obj.registry, progress=progress, shots=shots,
                             budget=budget, bounds=bounds, l1=l1, optimizer=optimizer, seed=seed, name=name,
                             device=device).report
    if as_json:
        print_json(report)
        return
    if echo_already_done(report):
        return
    print_table(report["inputs"], ["name", "kind", "weight"], title=f"composed {report['artifact']}")
    print_table(report["curve_summary"], ["step", "loss", "objective", "best"], title="loss curve")
    click.echo(f"optimizer: {' -> '.join(report['optimizer_used'])}; loss {report['loss']:.4f} on "
               f"{report['n_examples']} examples; {report['seconds_per_step']:.3f} s per step")


def register(cli) -> None:
    cli.add_command(merge_cmd)
    cli.add_command(compose_cmd)
