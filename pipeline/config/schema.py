"""Strict conversion of plain dicts (from YAML) into frozen dataclasses.

Unknown keys are rejected with the closest valid name, types are checked
(no silent str -> int), and numeric ranges declared in field metadata are
enforced. Lists (`tuple[X, ...]`) and mappings (`dict[str, X]`) of any supported type, dataclass sections included, are checked
item by item with the item's path in the message (`distill.students[1].arch`). This is the only place that knows how config text becomes objects
(`load_yaml`: YAML text, a key given twice in one mapping refused).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key path."""


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last).

    Keys brought in by a merge (`<<: *anchor`) may still be overridden: only keys written in the mapping count.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.2's core schema for plain scalars, not PyYAML's 1.1: `off`/`on`/`no` stay words (channels_last: off,
# mixed_precision: no), 1e-3 is a number, 010 is ten (not octal 8) and 1:30 is text (not base-60 90).
# A bool field still takes on/off/yes/no (`_convert`), so `self_training: [off, on]` reads as before.
_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                       r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


class ConfigDumper(yaml.SafeDumper):
    """Writes a config that reads back the same: a string that a plain scalar would turn into a number or a
    bool under these rules (`'1e5'`, a path) or under PyYAML's 1.1 (`'off'`, for other readers) is quoted."""


ConfigDumper.yaml_implicit_resolvers = {
    first: list(dict.fromkeys(yaml.SafeDumper.yaml_implicit_resolvers.get(first, [])
                              + _UniqueKeyLoader.yaml_implicit_resolvers.get(first, [])))
    for first in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(_UniqueKeyLoader.yaml_implicit_resolvers)}


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 16 if text.startswith("0x") else 10)


_UniqueKeyLoader.add_constructor(_INT, _construct_int)
YAML_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def read_config_text(path: Path, what: str) -> str:
    """The text of a config file (`what`: "config file", "compare config"), or ConfigError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          f"save the {what} as UTF-8") from None


def load_yaml(text: str, source: str) -> Any:
    """Config YAML (a file's text, or a `--set` value) as plain data, a key given twice refused.

    A repeated key raises ConfigError naming `source`, the key and both lines; malformed YAML raises
    yaml.YAMLError for the caller to name.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ConfigError(f"{source}: line {dup.line}: key {dup.key!r} is given twice in one mapping (first at "
                          f"line {dup.first_line}); give each key once") from None


def bounds(*, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> dict[str, float]:
    """Field metadata declaring an allowed numeric range."""
    return {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}


def from_dict(cls: type[T], data: Any, path: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad values.

    Keys absent from `data` take their values from `base` when given (a section's own
    defaults, e.g. the student's dropout), else from the dataclass defaults.
    """
    where = path or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), path, list(fields)))
    values = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        default = _section_default(fields[name], base)
        value = _convert(hints[name], value, key_path, default)
        _check_bounds(fields[name].metadata, value, key_path)
        values[name] = value
    try:
        if base is not None:
            return dataclasses.replace(base, **values)
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a missing field, or a __post_init__ check
        missing = [f.name for f in fields.values() if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and base is None]
        if isinstance(exc, TypeError) and missing:  # not "SourceConfig.__init__() missing 1 required positional..."
            raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}") from None
        name, _, rest = str(exc).partition(": ")
        if name in fields and rest:  # "policy: ..." from a section's own check: name the full key path
            raise ConfigError(f"{path + '.' if path else ''}{name}: {rest}") from None
        raise ConfigError(f"{where}: {exc}") from None


def _unknown_key_message(key: str, path: str, valid: list[str]) -> str:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    return f"unknown config key '{full}'.{hint} Valid keys here: {', '.join(sorted(valid))}."


def _section_default(field: dataclasses.Field, base: Any) -> Any:
    """The default instance of a nested section, so partial YAML keeps the section's own defaults."""
    if base is not None:
        return getattr(base, field.name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _convert(hint: Any, value: Any, path: str, default: Any = None) -> Any:
    if hint is Any:  # checked later by its own schema (e.g. a compare config's `base` pipeline config)
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple and typing.get_args(hint)[-1:] == (Ellipsis,) or origin is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or origin is typing.Mapping or origin is collections.abc.Mapping:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {_convert(key_type, k, f"{path} key {k!r}"): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path, default if dataclasses.is_dataclass(default) else None)
    if hint is bool:
        if isinstance(value, str) and value.lower() in YAML_BOOL_WORDS:
            return YAML_BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            quoted = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ConfigError(f"{path}: expected a string, got {value!r}{quoted}")
        return value
    raise ConfigError(f"{path}: unsupported config type {hint}")  # a bug in the schema, not in the YAML


def _check_bounds(meta: Any, value: Any, path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for key, (ok, sign) in checks.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{path}: {value!r} is out of range; it must be {sign} {meta[key]}")


def set_by_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `--set a.b=value` override to a nested dict (keys checked later)."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        # a copy: a YAML anchor (&train ... *train, or a << merge) gives every alias one shared mapping, and
        # setting student.train.epochs changed the teacher's too
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists, mappings dicts) suitable for YAML/JSON."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(dataclasses.asdict(obj))
