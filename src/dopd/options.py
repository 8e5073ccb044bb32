"""The option system of `dopd lab`, `dopd hints` and `dopd eval`: each command's flags are made from the fields of
its settings dataclass (name, type, default, and the help from the comment beside the field), so that a setting,
its default and its help are written once (`SettingsOptions`). `dopd train` lists its config's keys the same way
(`config.keys_help`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import textwrap
import types
import typing
from typing import Any

from .config import ConfigError


@dataclasses.dataclass(frozen=True)
class Option:
    path: str  # the field it sets, dotted into a nested dataclass (`data.path`)
    flag: str  # `--data`
    dest: str  # its name in argparse's namespace
    kind: type  # the field's type: int, float, str, bool, list or dict
    item: type | None  # a list's item type
    default: Any  # the field's default (None: none)
    help: str
    required: bool


class SettingsOptions:
    """The options of one command, made from the fields of its settings dataclass `cls`, so that each setting, its
    default and its help are written once, in the dataclass: the option `--name` for the field `name` (`--no-name`
    for a bool that is on by default), the value's type from the annotation, the help from the comment after the
    field (or the `#:` lines just above it) and the default shown in the help from the field's own.

    A field that is itself a dataclass gives the options `flags` names for its fields (dotted, `data.path`);
    `flags` also renames an option (`{"data.path": "--data"}`). A field is required when it has no default or its
    comment says "(required)". Lists are comma-separated, or given once per item (`repeat`); a dict is JSON;
    `parse` reads a field with a function of its own. `values` returns the settings given, each read as its
    field's type (a nested dataclass built on its default); the others keep the dataclass's defaults."""

    def __init__(self, cls: type, flags=None, parse=None, repeat=(), aliases=None, dest_prefix: str = ""):
        self.cls, self.hints = cls, typing.get_type_hints(cls)
        self.flags, self.parse, self.repeat, self.aliases = dict(flags or {}), dict(parse or {}), set(repeat), aliases
        self.dest_prefix = dest_prefix
        self.options = list(self._options())

    def _options(self):
        comments = _field_comments(self.cls)
        for item in dataclasses.fields(self.cls):
            if not dataclasses.is_dataclass(self.hints[item.name]):
                required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
                yield self._option(item.name, self.hints[item.name], _field_default(item), comments, required)
                continue
            nested = self._nested_default(item.name)
            nested_hints, nested_comments = typing.get_type_hints(type(nested)), _field_comments(type(nested))
            for path in self.flags:
                owner, _, name = path.partition(".")
                if owner == item.name:
                    yield self._option(path, nested_hints[name], getattr(nested, name), nested_comments, False)

    def _nested_default(self, name: str) -> Any:
        """The default of the dataclass field `name`: its own, or its type's defaults."""
        default = _field_default(next(item for item in dataclasses.fields(self.cls) if item.name == name))
        return default if default is not None else self.hints[name]()

    def _option(self, path: str, hint, default, comments: dict[str, str], required: bool) -> Option:
        kind, item = _value_type(hint)
        comment = comments.get(path.rpartition(".")[2], "")
        flag = self.flags.get(path, "--" + path.rpartition(".")[2].replace("_", "-"))
        if kind is bool and default:
            flag = "--no-" + flag.removeprefix("--")
        shown = _shown(default)
        text = comment + (f" (default {shown})" if shown is not None else "")
        dest = self.dest_prefix + flag.removeprefix("--").removeprefix("no-").replace("-", "_")
        return Option(path, flag, dest, kind, item, default, text, required or "(required)" in comment)

    def add_to(self, parser: argparse.ArgumentParser, groups: dict[str, list[str]] | None = None) -> None:
        """Every option on `parser`; those of `groups` ({title: fields}) under their titles, after the others."""
        grouped = {path: title for title, paths in (groups or {}).items() for path in paths}
        targets = {title: parser.add_argument_group(title) for title in (groups or {})}
        for option in sorted(self.options, key=lambda o: o.path in grouped):
            target = targets[grouped[option.path]] if option.path in grouped else parser
            names = [option.flag, *(self.aliases or {}).get(option.path, ())]
            common = {"dest": option.dest, "default": None, "help": option.help.replace("%", "%%")}
            metavar = option.dest.removeprefix(self.dest_prefix).upper()
            if option.kind is bool:
                target.add_argument(*names, action="store_false" if option.default else "store_true", **common)
            elif option.path in self.repeat:
                target.add_argument(*names, action="append", metavar=metavar, **common)
            else:  # numbers are read by argparse, the rest by `values`
                kind = option.kind if option.kind in (int, float) and option.path not in self.parse else str
                target.add_argument(*names, type=kind, metavar=metavar, required=option.required, **common)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """{field: value} of the settings given; a value that cannot be read stops with one line naming the
        option."""
        values: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for option in self.options:
            text = getattr(args, option.dest, None)
            if text is None:
                continue
            try:
                value = self._read(option, text)
            except ValueError as error:
                raise ConfigError(f"{option.flag} {text!r}: {error}") from None
            owner, _, name = option.path.partition(".")
            if name:
                nested.setdefault(owner, {})[name] = value
            else:
                values[owner] = value
        for owner, given in nested.items():
            values[owner] = dataclasses.replace(self._nested_default(owner), **given)
        return values

    def _read(self, option: Option, text: Any) -> Any:
        if option.path in self.parse:
            return self.parse[option.path](text)
        if option.kind is list and option.path not in self.repeat:
            try:
                return [option.item(part.strip()) for part in text.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"expected comma-separated {option.item.__name__} values") from None
        if option.kind is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"is not JSON ({error})") from None
            if not isinstance(value, dict):
                raise ValueError("is not a JSON object")
            return value
        return text


_FIELD = re.compile(r"^    (\w+)\s*:")
_COMMENT = re.compile(r"\s#\s*(.*)$")


def _field_comments(cls: type) -> dict[str, str]:
    """{field: help} of a dataclass and of the dataclasses it extends: the comment after each field, or the `#:`
    lines just above it when the help does not fit on the field's line."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        for line in textwrap.dedent(inspect.getsource(klass)).splitlines():
            if line.strip().startswith("#:"):
                above.append(line.strip()[2:].strip())
                continue
            match, after = _FIELD.match(line), _COMMENT.search(line)
            if match:
                found[match.group(1)] = after.group(1) if after else " ".join(above)
            above = []
    return found


def _field_default(item: dataclasses.Field) -> Any:
    """The field's default, None when it has none."""
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None if item.default is dataclasses.MISSING else item.default


def _value_type(hint) -> tuple[type, type | None]:
    """(int, None) for `int` or `int | None`; (list, int) for `list[int]`; (dict, None) for `dict`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is list:
        return list, typing.get_args(hint)[0]
    return origin, None


def _shown(value: Any) -> str | None:
    """A default as the help shows it; None for one the comment explains (None, empty, a bool)."""
    if value is None or isinstance(value, bool) or value in ("", [], {}):
        return None
    if isinstance(value, list):
        return ",".join(_shown(item) or repr(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and ("\n" in value or " " in value):
        return repr(value)
    return str(value)
