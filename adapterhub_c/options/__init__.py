"""Typed options of the command families: one frozen dataclass per family.

Each options class is the single statement of a command's knobs: its fields carry their
default, their help text and their command-line spelling (``option(...)``), the CLI builds
its click options from them (``adapterhub_c.cli.options``), the batch queue stores them,
a workflow records ``params()`` as the run's parameters and idempotency key, and the domain
function receives the object itself. Constructing one validates it (``UsageError`` naming
the flag), so a bad value is refused before anything is loaded.

This package imports nothing heavy (no torch, no transformers): the CLI reads it at start-up.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, field
from typing import Any, ClassVar, TypeVar

from adapterhub_c.errors import UsageError

T = TypeVar("T", bound="Options")


def option(default: Any = MISSING, *, help: str = "", flag: str | None = None, choices: tuple | None = None,  # noqa: PLR0913 - mirrors click's option keywords
           cli: bool = True, default_factory: Any = MISSING, show_default: bool = True,
           type: Any = None, aliases: dict[str, tuple[Any, str]] | None = None,  # noqa: A002
           short: str | None = None, key: bool = True) -> Any:
    """A dataclass field with what the command line needs to offer it.

    ``flag``: the spelling (default ``--field-name``; a boolean whose default is True is
    offered as ``--no-field-name``). ``choices``: the allowed values (checked on
    construction too). ``cli=False``: a library-only knob, not offered by the commands.
    ``type``: the click type when the annotation does not say it; ``"csv"`` is a
    comma-separated list read into a tuple. ``aliases``: extra flags that set the field to
    a fixed value, ``{"--no-recover": ("none", "help")}`` (given together with ``flag``
    they are refused). ``short``: a one-letter spelling too (``-k``). ``key=False``: the
    field only changes what is measured, not what is made: a rerun that differs from an
    earlier one only in such fields is the same run (``Options.unkeyed``). A field without a
    default is a required option.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli, "show_default": show_default,
            "type": type, "aliases": aliases or {}, "short": short, "key": key}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of field ``f``."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


class Options:
    """Base of the options dataclasses (subclasses are ``@dataclass(frozen=True)``)."""

    family: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.normalize()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UsageError(f"{flag_of(f)} must be one of {', '.join(map(str, choices))} (got {value!r})")
        self.validate()

    def normalize(self) -> None:
        """Bring values to their canonical form before validation (subclasses; use ``_set``)."""

    def validate(self) -> None:
        """Cross-field checks; raise ``UsageError`` naming the flag. Subclasses extend it."""

    def _require(self, ok: bool, name: str, rule: str) -> None:
        """``UsageError`` "<flag> must be <rule> (got <value>)" unless ``ok``."""
        if not ok:
            raise UsageError(f"{self.flag(name)} must be {rule} (got {getattr(self, name)!r})")

    def _set(self, name: str, value: Any) -> None:
        """Set a field of this frozen object (for ``normalize`` only)."""
        object.__setattr__(self, name, value)

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line spelling of field ``name``."""
        return flag_of(next(f for f in dataclasses.fields(cls) if f.name == name))

    def params(self) -> dict[str, Any]:
        """The options as plain JSON-able data (run parameters, batch queue rows)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_params(cls: type[T], params: dict[str, Any] | None = None, **overrides: Any) -> T:
        """Rebuild from ``params()`` output (unknown names are a ``UsageError``)."""
        values = {**(params or {}), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown {cls.family or cls.__name__} option(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in values and isinstance(values[f.name], list) and _is_tuple(hints.get(f.name)):
                values[f.name] = tuple(values[f.name])
        return cls(**values)

    @classmethod
    def of(cls: type[T], options: T | None = None, fields: dict[str, Any] | None = None) -> T:
        """``options`` (default: built from ``fields`` alone) with ``fields`` set: how a workflow reads its options."""
        if options is None:
            return cls.from_params(fields)
        if not isinstance(options, cls):
            raise UsageError(f"expected {cls.__name__}, got {type(options).__name__}")
        return options.replace(**fields) if fields else options

    @classmethod
    def unkeyed(cls) -> tuple[str, ...]:
        """The fields that only change what is measured (``option(..., key=False)``): a run's
        parameters record them, its idempotency key leaves them out."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("key", True))

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name → default (what ``--help`` shows)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = f.default_factory()
        return out


def _is_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    return any(typing.get_origin(a) is tuple or a is tuple for a in typing.get_args(hint))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def is_count(value: Any, minimum: int = 1) -> bool:
    """True for an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


__all__ = ["Options", "option", "flag_of", "is_count"]
