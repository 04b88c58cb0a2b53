"""Avalanche benchmarks as a scenario: ``scenario: {name: avalanche, benchmark: "module:function"}``.

The user's function builds any Avalanche benchmark (``nc_benchmark``, ``ni_benchmark``, ``SplitMNIST`` on a
local root, ``benchmark_from_datasets`` ...); :func:`cltoolbox.interop.avalanche.from_avalanche` turns it into
a cltoolbox stream, on which any cltoolbox strategy trains. The scenario has no ``dataset:``: the benchmark
brings its own data.

``benchmark`` is ``package.module:function`` (importable from ``sys.path``) or ``path/to/file.py:function``
(relative to the current directory). The function is called with ``seed=<the run's seed>`` when it has a
``seed`` parameter (so each seed can draw its own class order), and with the keyword arguments of ``args``.
It returns the benchmark (an object with ``train_stream`` and ``test_stream``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cltoolbox.errors import ConfigError
from cltoolbox.registry import register_scenario
from cltoolbox.stream import Stream


def load_function(spec: str, field: str = "scenario.benchmark") -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``file.py:function``; ConfigError (one line) otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{field}: expected 'module:function' or 'path/file.py:function', got {spec!r}")
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise ConfigError(f"{field}: file '{where}' not found (paths are relative to the current directory)")
        mod_name = f"cltoolbox_benchmark_{path.stem}_{abs(hash(str(path))) % 10**8}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec_ = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec_)
            try:
                spec_.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's file raised on import
                raise ConfigError(f"{field}: '{where}' raised {type(e).__name__}: {e} on import; fix it") from e
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"{field}: cannot import module '{where}' ({e}); check the name or give a .py path") \
                from None
        except Exception as e:  # noqa: BLE001 - the user's module raised on import
            raise ConfigError(f"{field}: module '{where}' raised {type(e).__name__}: {' '.join(str(e).split())} on "
                              "import; fix it") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{field}: '{where}' has no function '{name}'")
    return fn


def _needs_no_dataset(fn: Callable) -> Callable:
    fn.needs_dataset = False  # read by cltoolbox.config.validate: no `dataset:` for this scenario
    return fn


@register_scenario("avalanche", test_dataset=None)  # needs a benchmark function: tests/test_avalanche_scenario.py
@_needs_no_dataset
def avalanche(data: Any, seed: int, benchmark: str, args: dict | None = None) -> Stream:
    """An Avalanche benchmark built by the user's function ('module:function' or 'file.py:function')."""
    from cltoolbox.interop.avalanche import from_avalanche

    fn = load_function(benchmark)
    kwargs = dict(args or {})
    try:
        takes_seed = "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_seed = False
    if takes_seed:
        kwargs.setdefault("seed", seed)
    try:
        bm = fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f"scenario.args: {benchmark} cannot be called with {sorted(kwargs)} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's function failed (missing data, a bug ...)
        raise ConfigError(f"scenario.benchmark: {benchmark} raised {type(e).__name__}: {' '.join(str(e).split())}; "
                          "fix the function or its args") from e
    if not hasattr(bm, "train_stream") or not hasattr(bm, "test_stream"):
        raise ConfigError(f"scenario.benchmark: {benchmark} returned a {type(bm).__name__}, not an Avalanche "
                          "benchmark (an object with train_stream and test_stream)")
    try:
        return from_avalanche(bm, name=f"avalanche-{benchmark.split(':')[1]}")
    except ValueError as e:
        raise ConfigError(f"scenario.benchmark: {benchmark}: {e}") from None
