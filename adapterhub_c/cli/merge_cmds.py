"""adapt merge / merge replay / compose."""
from __future__ import annotations

import click

from adapterhub_c import api
from adapterhub_c.cli.options import collect, options_from
from adapterhub_c.cli.render import echo_already_done, print_json, print_table, progress_callback
from adapterhub_c.options.merge import ComposeOptions, MergeOptions

_MERGE = "merge-adapters"  # the unnamed default command of `adapt merge`


class _Unnamed(click.Context):
    """The context of a group's default command: it is spelled as the group (``adapt merge …``)."""

    @property
    def command_path(self) -> str:
        """The group's path, without the default command's (empty) name."""
        return super().command_path.rstrip()


class _UnnamedCommand(click.Command):
    context_class = _Unnamed


class _MergeGroup(click.Group):
    """``adapt merge ADAPTERS… --method M`` merges; ``adapt merge replay CONFIG`` replays a written merge.

    Anything but a subcommand's name first (adapters, options, ``--help``) goes to the merge
    itself, so every earlier spelling of ``adapt merge`` keeps working.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Send arguments that name no subcommand to the merge."""
        if not args or args[0] not in self.commands:
            args = [_MERGE, *args]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """The subcommand; the merge under the group's own name."""
        name, command, rest = super().resolve_command(ctx, args)
        return ("" if name == _MERGE else name), command, rest


@click.group("merge", cls=_MergeGroup)
def merge_group() -> None:
    """Merge adapters (`adapt merge ADAPTERS... --method M`), or replay a merge (`adapt merge replay CONFIG`)."""


def _echo_merge(report: dict, as_json: bool) -> None:
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


@merge_group.command(_MERGE, cls=_UnnamedCommand, hidden=True)
@click.argument("adapters", nargs=-1, required=True)
@options_from(MergeOptions)
@click.option("--name", default=None, help="Name of the merged artefact.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def merge_cmd(obj, adapters, name, as_json, **fields):
    """Merge ADAPTERS (LoRAs, converted LoRAs, packs) into one LoRA artefact.

    `adapt merge replay CONFIG` re-runs the merge a written merge_config.yaml records.
    """
    options = collect(MergeOptions, fields)
    with progress_callback() as progress:
        report = api.merge(adapters, options=options, registry=obj.registry, name=name, progress=progress).report
    _echo_merge(report, as_json)


@merge_group.command("replay")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default=None, help="Name of the merged artefact.")
@click.option("--device", default=None, help="cpu, cuda or auto [default: auto].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def merge_replay(obj, config, name, device, as_json):
    """Re-run the merge CONFIG (a merge_config.yaml) records on the same inputs and register it.

    The inputs are found by their recorded id, else by name; an input whose weights changed
    since the merge is refused.
    """
    with progress_callback() as progress:
        report = api.replay_merge(config, name=name, device=device, registry=obj.registry, progress=progress).report
    _echo_merge(report, as_json)


@click.command("compose")
@click.argument("adapters", nargs=-1, required=True)
@options_from(ComposeOptions)
@click.option("--name", default=None, help="Name of the composed artefact.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def compose_cmd(obj, adapters, name, as_json, **fields):
    """LoraHub-style composition of ADAPTERS, weights searched on a few examples."""
    options = collect(ComposeOptions, fields)
    with progress_callback() as progress:
        report = api.compose(adapters, options=options, registry=obj.registry, name=name, progress=progress).report
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
    cli.add_command(merge_group)
    cli.add_command(compose_cmd)
