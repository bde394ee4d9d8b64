"""Configs are nested dataclasses; this module turns files and ``--set`` overrides into them.

One path for every command: start from a dataclass's defaults (or a preset) as a plain dict, merge a config file
(YAML, TOML or JSON), apply ``--set a.b=value`` overrides, then :func:`build` the dataclasses once. Building
coerces every value by its field's type annotation (so ``--set ppo.kl_coef=0.1`` becomes a float and
``--set data.prefix_words=2-8`` a tuple) and runs each dataclass's ``__post_init__`` validation. Every error is a
:class:`~prefopt.errors.ConfigError` whose one line names where the value came from and the field path.

Nothing here knows about prefopt's own configs: the field types and their ``help`` metadata drive everything,
so a new field is reachable from files, ``--set`` and ``prefopt config`` without another line of code.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Union

from prefopt.errors import ConfigError

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
_NONE_WORDS = {"none", "null", "~"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------------------------------- files
def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML / TOML / JSON config file into a dict; errors name the file (and line where known)."""
    p = Path(path)
    label = os.fspath(path)
    if p.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"{label}: unsupported config file type '{p.suffix}': use .yaml, .yml, .toml or .json")
    if not p.is_file():
        raise ConfigError(f"{label}: config file not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{label}: cannot read ({' '.join(str(e).split())}): save it as UTF-8 text") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError: one line with the line number
        mark = getattr(e, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid {suffix.lstrip('.').upper()} ({' '.join(str(problem).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of field names to values, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------- dicts
def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), the shape files and ``config.json`` hold."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_assignment(text: str) -> tuple[list[str], str]:
    """``'a.b.c=value'`` -> (['a', 'b', 'c'], 'value'); the value stays text until :func:`coerce` types it."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected FIELD=VALUE with a dotted field path, e.g. --set ppo.kl_coef=0.1")
    return key.split("."), value.strip()


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating intermediate mappings."""
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


# --------------------------------------------------------------------------------------------------- types
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def describe(tp: Any) -> str:
    """A short human name of a type annotation, for messages and ``prefopt config``."""
    args = _union_args(tp)
    if args is not None:
        names = [describe(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | None" if type(None) in args else "")
    origin = typing.get_origin(tp)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else describe(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, path: str, tp: Any, value: Any, why: str = "") -> ConfigError:
    shown = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigError(f"{where}: field '{path}' expects {describe(tp)}, got {shown!r}{(': ' + why) if why else ''}")


def coerce(value: Any, tp: Any, *, where: str, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; text (from ``--set``) is parsed into that type."""
    if tp is Any:
        return value
    args = _union_args(tp)
    if args is not None:
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):  # JSON text: containers first
            options.sort(key=lambda a: a is str)
        for arg in options:
            try:
                return coerce(value, arg, where=where, path=path)
            except ConfigError:
                continue
        raise _fail(where, path, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # already built (a checked --set value merged back into the config dict)
            return value
        if isinstance(value, str):
            value = _json(value, where, path, tp)
        if not isinstance(value, dict):
            raise _fail(where, path, tp, value, "give a mapping of its fields")
        return build(tp, value, where=where, prefix=path + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _fail(where, path, tp, value, "use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
        raise _fail(where, path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _fail(where, path, tp, value) from None
        else:
            raise _fail(where, path, tp, value)
        if not math.isfinite(out):
            raise _fail(where, path, tp, value, "must be finite")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, path, tp, value, "quote it as text")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        items = _sequence(value, tp, where, path)
        inner = typing.get_args(tp)
        if origin is tuple and inner and inner[-1] is not Ellipsis:
            if len(items) != len(inner):
                raise _fail(where, path, tp, value, f"needs exactly {len(inner)} items")
            return tuple(coerce(v, t, where=where, path=f"{path}[{i}]") for i, (v, t) in enumerate(zip(items, inner)))
        item_tp = inner[0] if inner else Any
        out = [coerce(v, item_tp, where=where, path=f"{path}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if isinstance(value, str):
            value = _json(value, where, path, tp)
        if not isinstance(value, dict):
            raise _fail(where, path, tp, value, "give a mapping")
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        return {coerce(k, key_tp, where=where, path=path): coerce(v, val_tp, where=where, path=f"{path}.{k}")
                for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(where, path, tp, value)


def _json(text: str, where: str, path: str, tp: Any) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _fail(where, path, tp, text, "give it as JSON") from None


def _sequence(value: Any, tp: Any, where: str, path: str) -> list[Any]:
    """A list from a list/tuple, a JSON list, 'LO-HI' (two non-negative ints) or comma-separated text."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            out = _json(text, where, path, tp)
            if isinstance(out, list):
                return out
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if m:
            return [m.group(1), m.group(2)]
        return [part.strip() for part in text.split(",") if part.strip()]
    raise _fail(where, path, tp, value)


# --------------------------------------------------------------------------------------------------- building
def build(cls: type, data: dict[str, Any], *, where: str = "config", prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a dict: unknown keys and wrong types are errors naming the field path;
    missing keys take the field defaults; ``__post_init__`` validation runs and its message is kept."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{prefix.rstrip('.') or cls.__name__}' must be a mapping, got {type(data).__name__}")
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_field(where, prefix, key, list(fields))
        kwargs[key] = coerce(value, hints[key], where=where, path=prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def unknown_field(where: str, prefix: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    section = f" in section '{prefix.rstrip('.')}'" if prefix else ""
    return ConfigError(f"{where}: unknown field '{prefix}{key}'{section}{hint}")


def field_type(cls: type, path: list[str], *, where: str) -> Any:
    """The annotation at a dotted path inside dataclass ``cls`` (for checking a ``--set`` before merging)."""
    tp: Any = cls
    for i, part in enumerate(path):
        target = _dataclass_of(tp)
        if target is None:
            raise ConfigError(f"{where}: '{'.'.join(path[:i])}' is a single value, not a section with '{part}'")
        fields = _fields(target)
        if part not in fields:
            raise unknown_field(where, "".join(p + "." for p in path[:i]), part, list(fields))
        tp = _hints(target)[part]
    return tp


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    args = _union_args(tp)
    if args:
        for a in args:
            if dataclasses.is_dataclass(a):
                return a
    return None


# --------------------------------------------------------------------------------------------------- help
@dataclasses.dataclass(frozen=True)
class FieldDoc:
    path: str
    type: str
    value: Any
    help: str


def walk(obj: Any, prefix: str = "") -> Iterator[FieldDoc]:
    """Every leaf field of a dataclass tree with its dotted path, type, current value and help text."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from walk(value, path + ".")
        else:
            yield FieldDoc(path, describe(hints[f.name]), to_dict(value), f.metadata.get("help", ""))
