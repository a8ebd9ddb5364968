"""Configuration helpers shared by the CLI commands and recipe files: one dataclass is the single source of truth.

A command's settings are a dataclass (``TrainConfig`` for ``sftdata train``). This module turns such a dataclass into

* **click options** (:func:`click_options`): one option per field, so every field is reachable from the command
  line. A field's ``metadata`` says how: ``help``, ``flags`` (the option names, default ``--field-name``),
  ``choices``, ``metavar``. Booleans become ``--x/--no-x`` switches. Every option defaults to "not given", so
  the values a user typed can be told apart from the defaults (:func:`given_options`) and laid over a file.
* **a validated instance from a mapping** (:func:`dataclass_from_dict`): unknown keys are an error that names the
  key and lists the valid ones; values are checked (and losslessly coerced) against the field types.
* **a mapping from a YAML or JSON file** (:func:`read_config_file`, :func:`config_section`): one recipe file can
  hold a section per command (``train:``, ``build:``, ...); a command reads its own section, or the whole file
  when the file has no section of that name.

The precedence a command applies is: dataclass defaults < file values < command-line flags::

    values = config_section(read_config_file(path), "train") if path else {}
    values.update(given_options(TrainConfig, cli_kwargs))
    config = dataclass_from_dict(TrainConfig, values, source=path or "command line")

Only the standard library, click and PyYAML are used (no torch): the core install can read recipes.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used, with a message naming the file and key."""


# ------------------------------------------------------------------------------------------------ files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding a mapping; a one-line :class:`ConfigError` otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def config_section(data: Mapping[str, Any], section: str, *, source: str = "config") -> dict[str, Any]:
    """The ``section`` of a recipe (``data[section]``) when the file has one, else the whole mapping.

    With a section, the other top-level keys belong to other commands and are ignored here.
    """
    if section in data:
        value = data[section]
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, not a {type(value).__name__}")
        return dict(value)
    return dict(data)


# ------------------------------------------------------------------------------------------------ dataclass


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (works with ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (a plain type, ``X | None``, ``list[str] | str``); raise TypeError if it is not one."""
    options = _union_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise TypeError("null is not allowed")
    errors = []
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option)
        if origin is dict or option is dict:
            if isinstance(value, str):
                value = parse_mapping(value)
            if isinstance(value, Mapping):
                return dict(value)
            errors.append("a mapping")
            continue
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return dataclass_from_dict(option, value)
        if origin in (list, tuple):
            if isinstance(value, (list, tuple)):
                (item,) = typing.get_args(option)[:1] or (Any,)
                return [_coerce(v, item) for v in value]
            errors.append("a list")
            continue
        if option is Any:
            return value
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            errors.append("true/false")
            continue
        if option is int:
            if isinstance(value, bool):
                errors.append("an integer")
                continue
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            errors.append("an integer")
            continue
        if option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads 2e-4 as a string
                except ValueError:
                    pass
            errors.append("a number")
            continue
        if option is str:
            if isinstance(value, str):
                return value
            errors.append("a string")
            continue
        if isinstance(option, type) and isinstance(value, option):
            return value
        errors.append(getattr(option, "__name__", str(option)))
    raise TypeError(f"expected {' or '.join(dict.fromkeys(errors))}" + (" or null" if type(None) in options else ""))


def parse_mapping(text: str) -> dict[str, Any]:
    """A mapping written on the command line: JSON (``'{"a": 1}'``) or ``key=value,key=value`` (values read as YAML
    scalars: numbers, true/false, strings)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise TypeError(f"not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise TypeError("a JSON object")
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise TypeError(f"KEY=VALUE pairs (got {part!r})")
        key, raw = (x.strip() for x in part.split("=", 1))
        import yaml

        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except Exception:
            out[key] = raw
        if not isinstance(out[key], (str, int, float, bool)) or out[key] is None:
            out[key] = raw
    return out


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config",
                        base: T | None = None) -> T:
    """An instance of dataclass ``cls`` from ``data`` (missing keys keep ``base``'s values, or the defaults).

    Unknown keys raise :class:`ConfigError` naming the key(s) and the valid ones; a value of the wrong type raises
    one naming the key, the value and the expected type (numbers written as strings, such as YAML's ``2e-4``, are
    converted). A field's ``metadata["choices"]`` is enforced too.
    """
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(types_)}"
        )
    values = dataclasses.asdict(base) if base is not None else {}
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cls)}
    for key, value in data.items():
        try:
            values[key] = _coerce(value, types_[key])
        except TypeError as e:
            raise ConfigError(f"{source}: {key}: {value!r} is not valid ({e})") from None
        allowed = choices.get(key)
        if allowed and values[key] is not None and values[key] not in allowed:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    return cls(**values)


# ------------------------------------------------------------------------------------------------ click


class _ExplicitNone:
    """What an option of an optional field returns for ``none``: the user asked for None (not "not given")."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _param_type(tp: Any, field: dataclasses.Field):
    import click

    options = [o for o in _union_args(tp) if o is not type(None)]
    optional = len(options) < len(_union_args(tp))
    choices = field.metadata.get("choices")
    if choices:
        base: Any = click.Choice([str(c) for c in choices])
    elif options and options[0] is int and len(options) == 1:
        base = click.INT
    elif options and options[0] is float and len(options) == 1:
        base = click.FLOAT
    else:
        base = click.STRING  # str, and list[str] | str (comma-separated; the consumer splits it)
    if not optional:
        return base

    class OptionalType(click.ParamType):
        name = f"{base.name}|none"

        def convert(self, value, param, ctx):
            if value is EXPLICIT_NONE or (isinstance(value, str) and value.lower() in ("none", "null")):
                return EXPLICIT_NONE
            return base.convert(value, param, ctx)

    return OptionalType()


def click_options(cls: type, *, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of dataclass ``cls`` (except ``exclude``).

    Each option's default is ``None`` ("not given"); the help text shows the dataclass default. Options of an
    optional field (``int | None``) also accept ``none``. Read the values back with :func:`given_options`.
    """
    import click

    types_ = field_types(cls)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls)}
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        for f in reversed(fields):
            tp = types_[f.name]
            flags = list(f.metadata.get("flags") or [f"--{f.name.replace('_', '-')}"])
            default = defaults[f.name]
            help_text = f.metadata.get("help", "")
            shown = f.metadata.get("default_help")
            if shown is None:
                shown = ("none" if default is None else
                         ",".join(default) if isinstance(default, (list, tuple)) else str(default).lower()
                         if isinstance(default, bool) else str(default))
            help_text = f"{help_text} [default: {shown}]".strip()
            if bool in _union_args(tp) and not f.metadata.get("choices"):
                long = flags[0].removeprefix("--")
                switch = f"--{long}/--no-{long}"
                command = click.option(switch, f.name, default=None, help=help_text)(command)
            else:
                command = click.option(*flags, f.name, type=_param_type(tp, f), default=None,
                                       metavar=f.metadata.get("metavar"), help=help_text)(command)
        return command

    return decorate


def given_options(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line (options left at "not given" are dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in kwargs.items():
        if key not in names or value is None:
            continue
        out[key] = None if value is EXPLICIT_NONE else value
    return out
