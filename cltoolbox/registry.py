"""Name -> plugin registries for strategies, scenarios, datasets and models.

Built-ins register themselves with the decorators below when their package is imported; third-party
packages register through the entry-point groups ``cltoolbox.strategies``, ``cltoolbox.scenarios``,
``cltoolbox.datasets`` and ``cltoolbox.models`` (each entry point names the callable). Both are loaded
on first lookup, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from cltoolbox.errors import ConfigError
from cltoolbox.params import Param, closest, signature_params


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    params: dict[str, Param]

    @property
    def description(self) -> str:
        doc = (self.factory.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry:
    """A named collection of factories; ``skip`` leading positional arguments are supplied by the system."""

    def __init__(self, kind: str, builtin_module: str, skip: int) -> None:
        self.kind = kind
        self._builtin_module = builtin_module
        self._skip = skip
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    @property
    def singular(self) -> str:
        return {"strategies": "strategy"}.get(self.kind, self.kind[:-1])

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: ``@STRATEGIES.register("my_method")``."""

        def deco(factory: Callable) -> Callable:
            key = name or factory.__name__.lower()
            self._entries[key] = Entry(key, factory, signature_params(factory, self._skip))
            return factory

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin_module)
        for ep in metadata.entry_points(group=f"cltoolbox.{self.kind}"):
            if ep.name not in self._entries:
                self.register(ep.name)(ep.load())

    def get(self, name: str, field: str | None = None) -> Entry:
        self._load()
        if name not in self._entries:
            where = field or self.kind
            raise ConfigError(
                f"{where}: unknown {self.singular} '{name}'{closest(name, self._entries)}; "
                f"run `cltoolbox list {self.kind}` to see the {len(self._entries)} available"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


STRATEGIES = Registry("strategies", "cltoolbox.strategies", skip=0)
SCENARIOS = Registry("scenarios", "cltoolbox.scenarios", skip=2)  # (data, seed, **params)
DATASETS = Registry("datasets", "cltoolbox.data.sources", skip=0)  # (root, download)
MODELS = Registry("models", "cltoolbox.models", skip=2)  # (input_shape, n_classes, **params)

register_strategy = STRATEGIES.register
register_scenario = SCENARIOS.register
register_dataset = DATASETS.register
register_model = MODELS.register

REGISTRIES: dict[str, Registry] = {r.kind: r for r in (STRATEGIES, SCENARIOS, DATASETS, MODELS)}


def build(registry: Registry, name: str, *args: Any, **params: Any) -> Any:
    return registry.get(name).factory(*args, **params)


def import_plugins(specs: list[str], base_dir: str | None = None) -> None:
    """Import user plugin files or modules (the config's ``imports:``), so their decorators register.

    A spec ending in ``.py`` is a file path (relative to ``base_dir``, the config's folder, else the
    current directory); anything else is a module name importable from ``sys.path``.
    """
    import importlib.util
    import sys

    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f"imports: expected a list of .py paths or module names, got {specs!r}")
    for spec in specs:
        if not spec.endswith(".py"):
            try:
                importlib.import_module(spec)
            except ImportError as e:
                raise ConfigError(f"imports: cannot import module '{spec}' ({e}); check the name or use a .py path") \
                    from None
            except Exception as e:  # noqa: BLE001 - the user's module raised while it was imported
                raise ConfigError(f"imports: module '{spec}' raised {_one_line(e)} on import; fix it") from e
            continue
        path = resolve_import_path(spec, base_dir)
        if not path.is_file():
            raise ConfigError(f"imports: file '{spec}' not found; give a path relative to the config or the cwd")
        name = f"cltoolbox_user_{path.resolve().stem}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            continue
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a syntax error or an exception in the user's file
            del sys.modules[name]
            raise ConfigError(f"imports: '{path}' failed on import ({_one_line(e)}); fix the file") from e


def _one_line(e: BaseException) -> str:
    """``SyntaxError: invalid syntax (line 2)`` or ``ValueError: boom``: the exception on one line."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def resolve_import_path(spec: str, base_dir: str | None) -> Path:
    """A ``.py`` spec of ``imports:`` as an absolute path: relative to the cwd if it exists there, else to
    the config's folder. Runs record absolute paths, so a run's config.yaml runs again from anywhere."""
    path = Path(spec)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = Path(base_dir) / path
    return path.resolve()
