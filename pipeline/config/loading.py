"""A YAML file plus `--set a.b=value` overrides becomes a validated `Config`; a `Config` becomes YAML
and a short hash again.

An error names the key path and where the value came from: the file, or the `--set` that brought it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.schema import (ConfigDumper, ConfigError, from_dict, load_yaml, read_config_text, set_by_path,
                                    to_dict)
from pipeline.config.sections import Config


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with the value parsed as YAML (so 0.1, true, null work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set teacher.train.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key is empty")
    if re.search(r"\[|\.\d+(\.|$)", key):  # distill.students[0].arch, distill.students.0.arch
        raise ConfigError(f"--set {text}: --set names a key, not a list item; give the list whole, e.g. "
                          "--set 'distill.students=[{arch: mobilenetv3_small_100, input_size: 64}]'")
    if not raw.strip():
        return key, ""
    try:
        value = load_yaml(raw, f"--set {text}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: not valid YAML ({_yaml_problem(exc)})") from None
    if raw.count("#") > _hashes_in(value):  # YAML read an unquoted ' #...' as a comment and dropped it
        quoted = f"--set '{key}=\"{raw.strip()}\"'" if isinstance(value, str) else "quote the strings that hold it"
        raise ConfigError(f"--set {text}: ' #' starts a YAML comment, so the value ended before it; {quoted}")
    return key, value


def _hashes_in(value: Any) -> int:
    """How many '#' the parsed value's strings (and keys) hold."""
    if isinstance(value, str):
        return value.count("#")
    if isinstance(value, dict):
        return sum(_hashes_in(k) + _hashes_in(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_hashes_in(v) for v in value)
    return 0


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The short reason of a YAML error (its first line when it has no `problem`)."""
    problem = getattr(exc, "problem", None)
    return problem if isinstance(problem, str) and problem else str(exc).splitlines()[0]


def _read_config_file(path: Path) -> dict[str, Any]:
    text = read_config_text(path, "config file")
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:  # the built-in defaults differ from any shipped recipe: never run them by accident
        raise ConfigError(f"{path}: the config file is empty; start from configs/fashion_mnist.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _error_key(message: str) -> str:
    """The key path a ConfigError message is about: `a.b[1].c: ...`, or the quoted key of `unknown config key`."""
    if message.startswith("unknown config key '"):
        return message.split("'")[1]
    return message.split(":", 1)[0].strip()


def _blame(path: Path | None, items: list[str], overrides: list[tuple[str, Any]], message: str) -> str:
    """Name where the value behind `message` came from: the last `--set` of that key, of a section holding it
    or of a key inside the section the message is about that the message names (a section's check between
    its keys: `--set distill.alpha` is not why `distill: mixup 0.2 needs mode: online`); else the file."""
    failing = _error_key(message)
    unknown = message.startswith("unknown config key")
    for item, (key, _) in reversed(list(zip(items, overrides))):
        # a section misspelt on the --set's path (`--set distill.mutal.weight=1`) is that --set's
        named_inside = key.startswith(failing + ".") and (unknown or re.search(
            rf"\b{re.escape(key.rsplit('.', 1)[-1])}\b", message))
        if key == failing or failing.startswith((key + ".", key + "[")) or named_inside:
            return f"--set {item}: {message}"
    return f"{path}: {message}" if path is not None else message


def _unwrap_optional(hint: typing.Any) -> tuple[typing.Any, bool]:
    """(X, True) for `X | None`, (hint, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1 and len(options) < len(typing.get_args(hint)):
            return options[0], True
    return hint, False


def section_at(dotted: str) -> tuple[type | None, bool]:
    """(the section's dataclass, whether it is optional) when the key path names a section (`teacher.train`, or
    one null turns off, like `data.webdataset`); (None, False) for a value or an unknown path."""
    node: typing.Any = Config
    optional = False
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return None, False
        node, optional = _unwrap_optional(typing.get_type_hints(node).get(part))
    return (node, optional) if dataclasses.is_dataclass(node) else (None, False)


def _get_path(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def apply_override(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    """One `--set` on the file's nested dict. A mapping given to a section sets the keys it names and keeps the
    file's others (replacing the section dropped them silently; `{}` leaves a section there as it is); null
    for a section every config has is refused (it took the built-in defaults of every key in it, whatever the
    file said), while null turns an optional one (`data.webdataset`, `distill.mutual.peer`) off."""
    section, optional = section_at(key)
    if section is not None and value is None and not optional:
        example = key
        while section_at(example)[0] is not None:  # down to a key that holds a value: teacher -> teacher.model.arch
            example += "." + dataclasses.fields(section_at(example)[0])[0].name
        raise ConfigError(f"--set {item}: '{key}' is a section, not a value; set its keys (e.g. --set "
                          f"{example}=...), or leave it out of the config file for its built-in defaults")
    if section is not None and isinstance(value, dict):
        if not value and not isinstance(_get_path(data, key), dict):
            set_by_path(data, key, {})  # an optional section absent from the file: on, with its defaults
        for name, inner in value.items():
            apply_override(data, f"{key}.{name}", inner, item)
        return
    set_by_path(data, key, value)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML `path` (or defaults when None), apply overrides, validate.

    An error is attributed to the file or to the `--set` it comes from.
    """
    path = Path(path) if path is not None else None
    data = _read_config_file(path) if path is not None else {}
    items = list(overrides)
    parsed = [parse_override(item) for item in items]
    for item, (key, value) in zip(items, parsed):
        apply_override(data, key, value, item)
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(_blame(path, items, parsed, str(exc))) from None


def config_to_yaml(config: Config) -> str:
    return yaml.dump(to_dict(config), Dumper=ConfigDumper, sort_keys=False)


def fingerprint(obj: Any) -> str:
    """Short stable hash of a config section (or any JSON-able value)."""
    plain = to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
