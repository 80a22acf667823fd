"""click options generated from an options dataclass, so a flag cannot drift from its field."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

import click

from adapterhub_c.options import flag_of

_SCALARS = {int: int, float: float, str: str, bool: bool}
_ALIAS = "__alias_"  # parameter name of an alias flag: <prefix><field>__alias_<n>


class CommaList(click.ParamType):
    """``a,b , c`` → ("a", "b", "c"); empty → None."""

    name = "list"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...] | None:
        """Split on commas, dropping blanks."""
        if value is None or isinstance(value, tuple):
            return value
        items = tuple(t.strip() for t in str(value).split(",") if t.strip())
        return items or None


def _click_type(hint: Any, meta: dict) -> Any:
    if meta.get("type") == "csv":
        return CommaList()
    if meta.get("type") is not None:
        return meta["type"]
    if meta.get("choices"):
        return click.Choice([str(c) for c in meta["choices"]])
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    for a in args:
        if a in _SCALARS:
            return _SCALARS[a]
    return str


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))


def cli_fields(cls: type, *, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` the command line offers (minus ``exclude``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude]


def flags_of(cls: type, *, exclude: tuple[str, ...] = ()) -> set[str]:
    """Every command-line spelling the fields of ``cls`` are offered under (aliases included)."""
    out = set()
    for f in cli_fields(cls, exclude=exclude):
        out.add(flag_of(f))
        if f.metadata.get("short"):
            out.add(f.metadata["short"])
        out.update(f.metadata.get("aliases") or {})
    return out


def _bool_option(f: dataclasses.Field, name: str, default: Any) -> Callable:
    help_text = f.metadata.get("help") or None
    if default is True:
        return click.option(flag_of(f), name, is_flag=True, flag_value=False, default=True, help=help_text)
    return click.option(flag_of(f), name, is_flag=True, default=False, help=help_text)


def _value_option(f: dataclasses.Field, name: str, hint: Any, default: Any) -> Callable:
    meta = f.metadata
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    aliased = bool(meta.get("aliases"))
    show = meta.get("show_default", True) and default is not None and not required
    help_text = meta.get("help") or None
    if aliased:  # the option's own default is None (so an alias can tell it was not given)
        help_text = f"{help_text or ''}  [default: {default}]" if show else help_text
        show = False
    spellings = [flag_of(f)] + ([meta["short"]] if meta.get("short") else [])
    return click.option(*spellings, name, type=_click_type(hint, meta), required=required,
                        default=None if aliased or required else default, show_default=show,
                        multiple=_is_tuple(hint) and meta.get("type") is None, help=help_text)


def options_from(cls: type, *, exclude: tuple[str, ...] = (), prefix: str = "") -> Callable:
    """A decorator adding one click option per command-line field of ``cls``.

    The parameter name is the field name (with ``prefix``); a boolean whose default is
    True becomes a ``--no-…`` flag that stores False; each alias of a field is one more flag.
    """
    hints = typing.get_type_hints(cls)
    defaults = cls.defaults()

    def decorate(fn: Callable) -> Callable:
        for f in reversed(cli_fields(cls, exclude=exclude)):
            name, hint = prefix + f.name, hints[f.name]
            for i, (alias, (_value, help_text)) in reversed(list(enumerate((f.metadata.get("aliases") or {}).items()))):
                fn = click.option(alias, f"{name}{_ALIAS}{i}", is_flag=True, help=help_text or None)(fn)
            if hint is bool or hint == "bool":
                fn = _bool_option(f, name, defaults.get(f.name))(fn)
            else:
                fn = _value_option(f, name, hint, defaults.get(f.name))(fn)
        return fn

    return decorate


def _take_aliases(f: dataclasses.Field, name: str, kwargs: dict[str, Any], values: dict[str, Any]) -> None:
    """Apply the alias flags of field ``f`` given on the command line (refused next to the flag itself)."""
    for i, (alias, (value, _help)) in enumerate((f.metadata.get("aliases") or {}).items()):
        if not kwargs.pop(f"{name}{_ALIAS}{i}", False):
            continue
        if values.get(f.name) is not None:
            raise click.UsageError(f"{alias} and {flag_of(f)} exclude each other")
        values[f.name] = value


def collect(cls: type, kwargs: dict[str, Any], *, prefix: str = "", **fixed: Any) -> Any:
    """Build ``cls`` from the click parameters in ``kwargs`` (removing them) plus ``fixed``.

    An aliased option left unset (None) takes the field's default.
    """
    values: dict[str, Any] = {}
    for f in cli_fields(cls):
        name = prefix + f.name
        if name in kwargs:
            value = kwargs.pop(name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        _take_aliases(f, name, kwargs, values)
        if f.metadata.get("aliases") and values.get(f.name) is None:
            values.pop(f.name, None)
    return cls.from_params(values, **fixed)
