"""Dataclass configs from YAML files and command lines, through draccus, with errors that name the key.

    @dataclass
    class Settings:
        episodes: int = option("Episodes per dataset.", 600)

    settings = parse(Settings, ["--config_path", "settings.yaml", "--episodes", "100"])

draccus reads the file (``--config_path``) and the ``--section.key value`` overrides (values read as YAML) into
nested dataclasses, types included. A config checks itself in ``__post_init__``; what a user sees when
something is wrong is one ``ValueError`` / ``TypeError``: the config's own message as it is, an unknown key
with the keys its section has, or a value of the wrong type with its dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import draccus
from draccus.parsers import decoding as _draccus_decoding
from draccus.utils import DecodingError, DraccusException

__all__ = ["option", "parse", "decode", "print_help", "help_text"]

T = TypeVar("T")


def _no_bool(raw_value: Any, path, kind: str) -> None:
    if isinstance(raw_value, bool):  # YAML true / false: draccus would read them as 1 / 0
        raise DecodingError(path, f"Couldn't parse {str(raw_value).lower()} into {kind}: give a number")


@draccus.decode.register(int)
def _decode_int(raw_value: Any, path) -> int:
    _no_bool(raw_value, path, "an int")
    return _draccus_decoding.decode_int(raw_value, path)


@draccus.decode.register(str)
def _decode_str(raw_value: Any, path) -> str:
    if isinstance(raw_value, bool):
        raise DecodingError(path, f"Couldn't parse {str(raw_value).lower()} into a string: quote it if it is one")
    return str(raw_value)


@draccus.decode.register(float)
def _decode_float(raw_value: Any, path) -> float:
    _no_bool(raw_value, path, "a float")
    try:
        return float(raw_value)
    except (TypeError, ValueError):
        raise DecodingError(path, f"Couldn't parse '{raw_value}' into a float") from None


def option(help: str, default: Any = None) -> Any:
    """A dataclass field with ``help`` metadata; a ``default`` that is a class or ``list`` / ``dict`` (anything
    callable) is a default factory."""
    if callable(default):
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse(config_class: type[T], args: Sequence[str], prog: str | None = None) -> T:
    """``config_class`` from command-line tokens (``--config_path FILE`` reads a YAML file first); ``--help``
    prints every option (under ``prog``) and exits with status 0.

    Raises:
        ValueError / TypeError: an unknown key, a value of the wrong type, or the config's own check.
    """
    if "--help" in args or "-h" in args:
        print_help(config_class, prog or "")
    try:
        return draccus.parse(config_class, args=list(args), prog=prog, exit_on_error=False)
    except (DraccusException, argparse.ArgumentError) as error:
        raise _user_error(error, config_class) from None


def print_help(config_class: type, prog: str, usage: str | None = None, description: str | None = None,
               config_flag: tuple[str, str] = ("--config_path", "a YAML file of these options (the ones given "
                                                                 "override it)")) -> None:
    """Print ``prog --help``: every key of ``config_class`` (dotted for sections) with its type, help and default,
    then exit with status 0. ``config_flag``: the flag that reads a YAML file, and its help."""
    print(help_text(config_class, prog, usage, description, config_flag))
    raise SystemExit(0)


def help_text(config_class: type, prog: str, usage: str | None = None, description: str | None = None,
              config_flag: tuple[str, str] = ("--config_path", "a YAML file of these options (the ones given "
                                                               "override it)")) -> str:
    """The text of :func:`print_help` (the fields' ``help`` metadata, which draccus's own help does not show)."""
    lines = [f"usage: {usage or prog + ' [--config_path FILE] [--key VALUE ...]'}", ""]
    if description or config_class.__doc__:
        lines += [" ".join((description or config_class.__doc__).split()), ""]
    lines += ["Values are read as YAML: --key '[a, b]', --key '{a: 1}', --key true, --key null.", "",
              "options:", _help_row("-h, --help", "show this help and exit")]
    lines.append(_help_row(f"{config_flag[0]} FILE", config_flag[1]))
    _field_rows(config_class, "", lines)
    return "\n".join(lines)


def _help_row(flag: str, text: str) -> str:
    """``  --flag TYPE   text`` with the text wrapped in a column (below the flag when the flag is long)."""
    column = " " * 37
    body = textwrap.fill(text, width=110, initial_indent=column, subsequent_indent=column) if text else ""
    if len(flag) <= 34:
        return f"  {flag:<34} {body[37:]}".rstrip()
    return f"  {flag}\n{body}".rstrip()


def _field_rows(section: type, prefix: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(section)
    nested = []
    for field in dataclasses.fields(section):
        kind = _without_none(hints[field.name])
        element = typing.get_args(kind)[0] if typing.get_origin(kind) is list and typing.get_args(kind) else None
        if dataclasses.is_dataclass(kind) or dataclasses.is_dataclass(element):
            nested.append((field.name, kind if dataclasses.is_dataclass(kind) else element,
                           element is not None))
            continue
        text = " ".join(str(field.metadata.get("help", "")).split())
        default = _default(field)
        if default is not dataclasses.MISSING:
            text += f" (default: {default!r})"
        lines.append(_help_row(f"--{prefix}{field.name} {_type_name(hints[field.name])}", text.strip()))
    for name, kind, is_list in nested:
        doc = " ".join((kind.__doc__ or "").split())
        lines += ["", f"{prefix}{name}" + (" (a list, given whole: --" + prefix + name + " '[{...}, ...]'; each item "
                                              "has these keys)" if is_list else "") + (f": {doc}" if doc else "")]
        _field_rows(kind, f"{prefix}{name}{'[].' if is_list else '.'}", lines)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__.upper()
    return str(tp).replace("typing.", "").replace("NoneType", "None").upper()


def decode(config_class: type[T], data: dict) -> T:
    """``config_class`` from plain data in the YAML layout (errors as :func:`parse`)."""
    try:
        return draccus.decode(config_class, data)
    except DraccusException as error:
        raise _user_error(error, config_class) from None


def _user_error(error: BaseException, config_class: type) -> Exception:
    if isinstance(error, DecodingError):
        unknown = re.search(r"The fields `([^`]+)`.* not valid", error.message)  # also inside an optional section
        if unknown:
            return ValueError(_unknown_key(config_class, [*error.key_path, unknown.group(1)], indexed=True))
        return ValueError(f"{_dotted(error.key_path)}: {error.message}")
    cause = error.__cause__
    if isinstance(cause, (ValueError, TypeError)) and not isinstance(cause, DraccusException):
        return cause  # a config's own check (in __post_init__), already naming the key
    flags = re.findall(r"--([\w.\-]+)", str(error))
    if str(error).startswith("unrecognized arguments") and flags:
        return ValueError(_unknown_key(config_class, flags[0].split("."), indexed=False))
    return ValueError(str(error))


def _dotted(parts: Sequence[str]) -> str:
    """``datasets[1].episodes.ways`` from a key path ``("datasets", "1", "episodes", "ways")``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _unknown_key(config_class: type, parts: Sequence[str], *, indexed: bool) -> str:
    """The message for an unknown key: which key, and the keys of the section it is not in. ``indexed``: the
    path holds list indices (a file); on the command line a list is overridden whole."""
    section, i = config_class, 0
    while i < len(parts):
        known = [f.name for f in dataclasses.fields(section)]
        if parts[i] not in known:
            return f"Unknown key '{_dotted(parts)}'; the keys of {_dotted(parts[:i]) or 'the top level'} are {known}."
        kind = _without_none(typing.get_type_hints(section)[parts[i]])
        if typing.get_origin(kind) is list:
            if not indexed:
                key = ".".join(parts[: i + 1])
                return f"'{'.'.join(parts)}': {key} is a list, overridden whole on the command line: --{key} '[...]'."
            kind, i = typing.get_args(kind)[0], i + 1
        if not dataclasses.is_dataclass(kind):
            return f"Unknown key '{_dotted(parts)}': {_dotted(parts[:i + 1])} is a value, not a section."
        section, i = kind, i + 1
    return f"Unknown key '{_dotted(parts)}'."


def _without_none(tp: Any) -> Any:
    """``X`` from ``X | None``; any other type as it is."""
    args = typing.get_args(tp)
    rest = [a for a in args if a is not type(None)]
    return rest[0] if type(None) in args and len(rest) == 1 else tp
