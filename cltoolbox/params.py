"""Typed keyword parameters read from a plugin's signature, and their validation.

A plugin (strategy, scenario generator, model, dataset) declares its hyperparameters once, as typed
keyword arguments with defaults. The config validator, ``cltoolbox list`` and the docs all read them
from there, so a new plugin needs no extra schema.

Numeric limits go in the annotation, ``Annotated[int, Min(1)]``, ``Annotated[float, Interval(0, 1)]``
(``strict=True`` / ``low_open``, ``high_open`` for open ends): they are enforced when parameters are resolved,
with a one-line error naming the field, the value and the limit, and ``cltoolbox list`` shows them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from cltoolbox.errors import ConfigError, PluginError

REQUIRED = inspect.Parameter.empty
# PyYAML (YAML 1.1) reads `1e-3` and `5E-4` as strings (it wants a dot and a signed exponent); accept them.
_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Limit:
    """A numeric range for a parameter, declared in its annotation (``Annotated[int, Min(1)]``); NaN is outside
    every range. ``why`` is appended to the error, e.g. "0 disables the penalty"."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def holds(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or bool(value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``<= 1`` or ``in (0, 1]``."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


def Min(low: float, strict: bool = False, why: str = "") -> Limit:  # noqa: N802 - reads as a type annotation
    """``value >= low`` (``> low`` if ``strict``)."""
    return Limit(low=low, low_open=strict, why=why)


def Max(high: float, strict: bool = False, why: str = "") -> Limit:  # noqa: N802
    """``value <= high`` (``< high`` if ``strict``)."""
    return Limit(high=high, high_open=strict, why=why)


def Interval(low: float, high: float, low_open: bool = False, high_open: bool = False,  # noqa: N802
             why: str = "") -> Limit:
    """``low <= value <= high``, either end open on request."""
    return Limit(low, high, low_open, high_open, why)


# the limits most parameters need, by name: sizes and counts, and weights of loss terms or penalties
PositiveInt = Annotated[int, Min(1)]
NonNegative = Annotated[float, Min(0)]
Positive = Annotated[float, Min(0, strict=True)]  # temperatures, learning rates, scales


class LimitError(ConfigError):
    """A value of the right type outside its declared limit."""


def split_limits(annotation: Any) -> tuple[Any, tuple[Limit, ...]]:
    """(the type, its limits) of ``Annotated[type, Limit, ...]``; other annotations have no limits."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, tuple(x for x in extras if isinstance(x, Limit))
    return annotation, ()


def check_limits(value: Any, limits: tuple[Limit, ...], field: str) -> Any:
    """``value`` if it is within every limit (None passes: it is a type question); else a LimitError."""
    for limit in limits:
        if value is not None and not limit.holds(value):
            why = f"; {limit.why}" if limit.why else ""
            raise LimitError(f"{field}: must be {limit.describe()}, got {value!r}{why}")
    return value


def _has_limits(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated and split_limits(annotation)[1]:
        return True
    return any(_has_limits(a) for a in typing.get_args(annotation))


def _is_choice(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Literal or any(_is_choice(a) for a in typing.get_args(annotation))


def with_limits(factory: Callable, params: dict[str, Param], section: str) -> Callable:
    """``factory`` checking its declared limits and choices (``Literal``) on every call, direct Python calls
    included (the config path checks them in :func:`resolve` first); ``factory`` itself when it declares none."""
    limited = {n: p for n, p in params.items() if p.limits or _has_limits(p.annotation) or _is_choice(p.annotation)}
    if not limited or inspect.isclass(factory):
        return factory
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def checked(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind_partial(*args, **kwargs).arguments
        for name in limited.keys() & given.keys():
            p, field = limited[name], f"{section}.{name}"
            try:
                check_limits(coerce(given[name], p.annotation, field), p.limits, field)
            except LimitError:
                raise
            except ConfigError:  # a type question is a Python caller's own business; a choice is not
                if _is_choice(p.annotation):
                    raise
        return factory(*args, **kwargs)

    return checked


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any  # the type, without its limits
    default: Any
    limits: tuple[Limit, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        kind = type_name(self.annotation) + "".join(f" {lim.describe()}" for lim in self.limits)
        return f"{self.name}: {kind}" + ("" if self.required else f" = {self.default!r}")


def signature_params(fn: Callable, skip: int = 0) -> dict[str, Param]:
    """Keyword parameters of ``fn`` (a function or class), skipping the first ``skip`` positional ones."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    hints = typing.get_type_hints(target, include_extras=True)
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
        kind, limits = split_limits(hints[p.name])
        out[p.name] = Param(p.name, kind, default, limits)
    return out


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, limits = split_limits(annotation)
        return type_name(base) + "".join(f" ({lim.describe()})" for lim in limits)
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
    if origin is typing.Annotated:
        base, limits = split_limits(annotation)
        return check_limits(coerce(value, base, field), limits, field)
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
            except LimitError:  # the right type, out of range: that is the message
                raise
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
                out[name] = check_limits(coerce(given[name], p.annotation, f"{section}.{name}"), p.limits,
                                         f"{section}.{name}")
            except ConfigError as e:
                raise ConfigError(f"{e}; {_example(p)}") from None
        elif p.required:
            raise ConfigError(f"{section}.{name}: missing required key ({p.describe()})")
        else:
            out[name] = p.default
    return out
