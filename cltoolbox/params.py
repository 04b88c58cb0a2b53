"""Typed keyword parameters read from a plugin's signature, and their validation.

A plugin (strategy, scenario generator, model, dataset) declares its hyperparameters once, as typed
keyword arguments with defaults. The config validator, ``cltoolbox list`` and the docs all read them
from there, so a new plugin needs no extra schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cltoolbox.errors import ConfigError, PluginError

REQUIRED = inspect.Parameter.empty
# PyYAML (YAML 1.1) reads `1e-3` and `5E-4` as strings (it wants a dot and a signed exponent); accept them.
_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        kind = type_name(self.annotation)
        return f"{self.name}: {kind}" + ("" if self.required else f" = {self.default!r}")


def signature_params(fn: Callable, skip: int = 0) -> dict[str, Param]:
    """Keyword parameters of ``fn`` (a function or class), skipping the first ``skip`` positional ones."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    hints = typing.get_type_hints(target)
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(fn):
        params = params[1:]  # self
    factories = {f.name: f.default_factory for f in dataclasses.fields(fn)
                 if f.default_factory is not dataclasses.MISSING} if dataclasses.is_dataclass(fn) else {}
    out = {}
    for p in params[skip:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = factories[p.name]() if p.name in factories else p.default
        if p.name not in hints:
            kind = "int" if default is REQUIRED else "str | None" if default is None else type(default).__name__
            example = f"{p.name}: {kind}" + ("" if default is REQUIRED else f" = {default!r}")
            raise PluginError(f"{getattr(fn, '__qualname__', fn)}: parameter '{p.name}' has no type annotation, so "
                              f"config values cannot be checked; write e.g. `{example}`")
        out[p.name] = Param(p.name, hints[p.name], default)
    return out


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"list[{type_name(args[0])}]" if args else "list"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def closest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest valid name, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Check ``value`` against ``annotation``; ints are accepted for floats. Raises ConfigError."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        if value in args:
            return value
        hint = closest(value, [a for a in args if isinstance(a, str)]) if isinstance(value, str) else ""
        raise ConfigError(f"{field}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for option in args:
            try:
                return coerce(value, option, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{field}: expected {type_name(annotation)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}: expected a list ({type_name(annotation)}), got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{field}[{i}]") for i, v in enumerate(value)]
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{field}: expected null, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{field}: expected {type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _example(p: Param) -> str:
    """The fix part of a type error: an example value, the default where there is one."""
    if p.required or p.default is None:
        return f"give a value of type {type_name(p.annotation)}"
    try:
        shown = json.dumps(p.default)  # JSON is valid YAML flow syntax
    except (TypeError, ValueError):
        shown = repr(p.default)
    return f"e.g. `{p.name}: {shown}` (the default)"


def resolve(params: dict[str, Param], given: dict[str, Any], section: str) -> dict[str, Any]:
    """Validate ``given`` against ``params`` and fill defaults. Unknown keys name the closest valid key."""
    for key in given:
        if key not in params:
            if not params:
                raise ConfigError(f"{section}.{key}: unknown key; this section takes no parameters, remove it")
            valid = ", ".join(sorted(params))
            raise ConfigError(
                f"{section}.{key}: unknown key{closest(str(key), params)}; valid keys here: {valid}"
            )
    out = {}
    for name, p in params.items():
        if name in given:
            try:
                out[name] = coerce(given[name], p.annotation, f"{section}.{name}")
            except ConfigError as e:
                raise ConfigError(f"{e}; {_example(p)}") from None
        elif p.required:
            raise ConfigError(f"{section}.{name}: missing required key ({p.describe()})")
        else:
            out[name] = p.default
    return out
