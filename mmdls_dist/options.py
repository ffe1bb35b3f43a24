"""Typed options: frozen dataclasses <-> plain dicts with type checks, dotted overrides whose
values are YAML, each field's doc comment, and command-line flags generated from fields.

The config blocks (config.py) and the sweep file (train/tune.py) are dataclasses of this
kind. A field's documentation is the comment after it (continued on comment-only lines
below it), read from the source, so the code, `--help` and the docs cannot drift apart.

Written here, not taken from a library: tyro and simple-parsing generate one flag per field
of the whole tree (`--model.embed-dim`), which does not fit the `--config PRESET --set
a.b=v` convention, where most fields are set in YAML presets and a command exposes only
its own block as flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import re
import tokenize
import types
import typing
from collections.abc import Callable
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's scalars where YAML 1.1 surprises: 3e-4 is a float (1.1
    insists on 3.0e-4), and only true / false are booleans (1.1 also reads yes, no, on and
    off as booleans, so `--set run.compile=off` or a clinical code `no` became False)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {  # a copy: SafeLoader's own lists stay as they are
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{path} must be one of {allowed}, got {value!r}")


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Coerce int->float where a float is wanted; otherwise the type must match exactly."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{path}: expected {hint}, got {type(value).__name__}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{path}: expected a mapping, got {type(value).__name__}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise TypeError(f"{path}: expected int, got bool")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build an options dataclass from a plain dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise TypeError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{path}." if path else ""
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        field_path = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, field_path)
        else:
            kwargs[name] = _check_type(field_path, value, hint)
    return cls(**kwargs)


def to_dict(options: Any) -> dict:
    """Plain, JSON/YAML-safe dict (tuples become lists); from_dict(type(c), to_dict(c)) == c."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(options))


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "section.key=value" -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ValueError(f"override {text!r}: the key must be section.key (e.g. optim.lr)")
    return keys, yaml_value(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply overrides to a nested dict copy; unknown sections/keys are caught by from_dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return out


_FIELD = re.compile(r"^    (\w+)\s*:")  # a field line of a dataclass body


def _comment(line: str) -> str | None:
    """The `# ...` comment of one source line (not a '#' inside a string), stripped."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), None)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its doc comment: the `# ...` on the field's line, continued by the
    comment-only lines right below it."""
    docs: dict[str, str] = {}
    current = None
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD.match(line)
        if match:
            current = match.group(1)
            if (text := _comment(line)) is not None:
                docs[current] = text
        elif current in docs and line.startswith("    # "):
            docs[current] += " " + line.strip().lstrip("#").strip()
        elif line.strip():
            current = None
    return docs


def fields_doc(cls: type, section: str, exclude: tuple[str, ...] = ()) -> str:
    """`section.field: doc (default value)`, one line per field: the help of a block."""
    defaults = cls()
    lines = []
    for f in dataclasses.fields(cls):
        if f.name not in exclude:
            doc = field_docs(cls).get(f.name, "")
            lines.append(f"{section}.{f.name}: {doc} (default {getattr(defaults, f.name)!r})")
    return "\n".join(lines)


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    section: str,
    only: tuple[str, ...] | None = None,
) -> None:
    """One `--field-name` flag per field of `cls` (or of `only`), for the `section` block.

    A flag is `--set section.field=VALUE` spelt shorter: it has no default of its own (the
    value comes from the preset unless the flag is given), its help is the field's doc
    comment, and its value is YAML like --set's. Booleans get --flag / --no-flag; a tuple
    field also takes comma-separated items."""
    group = parser.add_argument_group(f"{section} options (config block '{section}')")
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = field_docs(cls).get(f.name, "").replace("%", "%%")
        text = f"{doc} [{section}.{f.name}; dataclass default {getattr(defaults, f.name)!r}]"
        kwargs: dict[str, Any] = {"dest": f"set:{section}.{f.name}", "default": None}
        hint = hints[f.name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            kwargs["type"] = _as_yaml(hint)
        group.add_argument(flag, help=text, **kwargs)


def _as_yaml(hint: Any) -> Callable[[str], str]:
    """The flag's text -> the YAML that --set would take: a str field's text quoted (so
    `--name 007` stays a string), a tuple field's `A,B` as the list `[A,B]`."""
    if hint is str:
        return json.dumps
    if typing.get_origin(hint) is tuple:
        return lambda text: text if text.strip().startswith("[") else f"[{text}]"
    return str


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The generated flags that were given, as `section.field=value` overrides."""
    out = []
    for dest, value in vars(args).items():
        if dest.startswith("set:") and value is not None:
            text = str(value).lower() if isinstance(value, bool) else value
            out.append(f"{dest.removeprefix('set:')}={text}")
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"section.key": value}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out
