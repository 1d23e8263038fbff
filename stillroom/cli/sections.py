"""Command-line flags made from a typed config section, and the parsed flags made back into it.

A command that takes no recipe (``spec-eval``, ``serve-teacher``, ``merge`` ...) is a function of one
section of :mod:`stillroom.config.commands`. Its flags come from the section's fields, so the defaults
and their documentation live only in the schema:

* a field named in ``positional`` is a positional argument; every other field is ``--field-name``;
* ``int`` / ``float`` / ``str`` fields take one value of that type, ``X | None`` fields a value of ``X``;
  ``Literal[...]`` fields list their choices; ``list[...]`` fields take one or more values
  (``--gamma 3 5``); ``bool`` fields are switches with their negation (``--overwrite`` /
  ``--no-overwrite``);
* the help text is the field's description plus ``(default: ...)`` from the schema (``on``/``off`` for
  switches, ``unset`` for None), or ``(required)``;
* argparse's own default is always "not given" (:data:`argparse.SUPPRESS`): only the flags given on the
  command line reach the section, so the schema's defaults apply to the rest;
* a value the section refuses (a pydantic error) becomes a :class:`~stillroom.config.load.ConfigError`
  naming the flag, which ``stillroom`` reports as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from stillroom.config.load import ConfigError

_RESERVED = ("func", "command", "overrides")  # namespace attributes the stillroom parser uses itself


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, without breaking lines at hyphens (``--no-x``, ``runs/spec-eval`` stay whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def flag_of(field: str, positional: Sequence[str] = ()) -> str:
    """How the command line names ``field``: ``--field-name``, or ``FIELD`` for a positional argument."""
    return field.upper() if field in positional else "--" + field.replace("_", "-")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(annotation without Annotated[...] and | None, whether None was allowed)``."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, optional  # a real union: no single command-line type
            optional = True
            annotation = args[0]
        else:
            return annotation, optional


def _scalar(annotation: Any, where: str) -> dict[str, Any]:
    """argparse ``type`` / ``choices`` for one value of ``annotation``."""
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= {str, int, float}:
            raise TypeError(f"{where}: Literal{list(choices)} has no command-line form (mixed or odd types)")
        return {"type": kinds.pop(), "choices": choices}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"{where}: {annotation!r} has no command-line form (int, float, str, Literal, list or bool)")


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "(required)"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return f"(default: {'on' if value else 'off'})"
    if value is None:
        return "(default: unset)"
    if isinstance(value, (list, tuple)):
        return f"(default: {' '.join(str(v) for v in value)})"
    return f"(default: {value})"


def _help(info: FieldInfo, positional: bool = False) -> str:
    text = (info.description or "").strip()
    suffix = "" if positional and info.is_required() else _default_text(info)  # a positional is plainly required
    return f"{text} {suffix}".strip().replace("%", "%%")


def add_section_arguments(
    parser: argparse.ArgumentParser, section: type[BaseModel], positional: Sequence[str] = ()
) -> None:
    """Add one argument per field of ``section`` to ``parser`` (see the module docstring)."""
    fields = section.model_fields
    unknown = [p for p in positional if p not in fields]
    if unknown:
        raise TypeError(f"{section.__name__}: positional {unknown} are not fields (fields: {list(fields)})")
    order = [*positional, *(f for f in fields if f not in positional)]
    for name in order:
        info = fields[name]
        where = f"{section.__name__}.{name}"
        if name in _RESERVED:
            raise TypeError(f"{where}: the field name {name!r} is used by the stillroom parser itself")
        annotation, _ = _unwrap(info.annotation)
        kw: dict[str, Any] = {"help": _help(info, name in positional), "default": argparse.SUPPRESS}
        if annotation is bool:
            if name in positional:
                raise TypeError(f"{where}: a bool field cannot be positional")
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            (inner,) = typing.get_args(annotation) or (str,)
            kw.update(_scalar(inner, where), nargs="*" if name in positional and not info.is_required() else "+")
        else:
            kw.update(_scalar(annotation, where))
        if name in positional:
            if not info.is_required() and "nargs" not in kw:
                kw["nargs"] = "?"
            kw["metavar"] = flag_of(name, positional)
            parser.add_argument(name, **kw)
        else:
            if "choices" not in kw and "action" not in kw:
                kw["metavar"] = name.upper()
            parser.add_argument(flag_of(name), dest=name, required=info.is_required(), **kw)


def section_from_args(
    section: type[BaseModel], args: argparse.Namespace, positional: Sequence[str] = (), *, command: str = ""
) -> BaseModel:
    """The validated ``section`` from the arguments given in ``args``; ConfigError naming the flag if refused."""
    given = {name: getattr(args, name) for name in section.model_fields if hasattr(args, name)}
    try:
        return section.model_validate(given)
    except ValidationError as err:
        lines = [f"{command or section.__name__}: invalid arguments"]
        for e in err.errors():
            loc = tuple(e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if loc and isinstance(loc[0], str) and loc[0] in section.model_fields:
                got = e.get("input")
                lines.append(f"  {flag_of(loc[0], positional)}: {msg} (got {got!r})")
            else:
                lines.append(f"  {msg}")
        raise ConfigError("\n".join(lines)) from None


def section_command(
    subparsers: Any,
    name: str,
    section: type[BaseModel],
    run: Callable[[Any], Any],
    *,
    positional: Sequence[str] = (),
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Register ``stillroom NAME``: flags from ``section``; runs ``run(section instance)`` (returns 0 unless it
    returns an int)."""
    p = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    add_section_arguments(p, section, positional)

    def handle(args: argparse.Namespace) -> int:
        result = run(section_from_args(section, args, positional, command=f"stillroom {name}"))
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    p.set_defaults(func=handle)
    return p
