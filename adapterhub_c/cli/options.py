"""click options generated from an options dataclass, so a flag cannot drift from its field."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

import click

from adapterhub_c.options import flag_of

_SCALARS = {int: int, float: float, str: str, bool: bool}


def _click_type(hint: Any, meta: dict) -> Any:
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


def cli_fields(cls: type, *, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` the command line offers (minus ``exclude``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude]


def options_from(cls: type, *, exclude: tuple[str, ...] = (), prefix: str = "") -> Callable:
    """A decorator adding one click option per command-line field of ``cls``.

    The parameter name is the field name (with ``prefix``); a boolean whose default is
    True becomes a ``--no-…`` flag that stores False.
    """
    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(cli_fields(cls, exclude=exclude)):
            meta, hint = f.metadata, hints[f.name]
            default = cls.defaults().get(f.name)
            name = prefix + f.name
            flag = flag_of(f)
            if hint is bool or hint == "bool":
                if default is True:
                    fn = click.option(flag, name, is_flag=True, flag_value=False, default=True,
                                      help=meta.get("help") or None)(fn)
                else:
                    fn = click.option(flag, name, is_flag=True, default=False, help=meta.get("help") or None)(fn)
                continue
            is_tuple = typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple
                                                                for a in typing.get_args(hint))
            fn = click.option(flag, name, type=_click_type(hint, meta), default=default,
                              show_default=meta.get("show_default", True) and default is not None,
                              multiple=is_tuple and meta.get("type") is None,
                              help=meta.get("help") or None)(fn)
        return fn

    return decorate


def collect(cls: type, kwargs: dict[str, Any], *, prefix: str = "", **fixed: Any) -> Any:
    """Build ``cls`` from the click parameters in ``kwargs`` (removing them) plus ``fixed``."""
    values = {}
    for f in cli_fields(cls):
        if prefix + f.name in kwargs:
            value = kwargs.pop(prefix + f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls.from_params(values, **fixed)
