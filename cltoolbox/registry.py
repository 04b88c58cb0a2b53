"""Name -> plugin registries for strategies, scenarios, datasets and models.

Built-ins register themselves with the decorators below when their package is imported; third-party
packages register through the entry-point groups ``cltoolbox.strategies``, ``cltoolbox.scenarios``,
``cltoolbox.datasets`` and ``cltoolbox.models`` (each entry point names the callable). Both are loaded
on first lookup, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cltoolbox.errors import CLToolboxError, ConfigError, PluginError, one_line
from cltoolbox.params import Param, closest, signature_params, with_limits

# what plugins a process loaded from outside cltoolbox, for env.json: imported file -> sha256, package -> version
_IMPORTED_FILES: dict[str, str] = {}
_ENTRY_POINT_PACKAGES: dict[str, str] = {}


def _origin(factory: Callable) -> str:
    """``module.qualname`` of a factory: the same for the same definition imported again."""
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def plugin_sources() -> dict[str, dict[str, str]]:
    """The sha256 of every ``imports:`` file and the version of every entry-point package loaded so far."""
    return {"imports": dict(_IMPORTED_FILES), "entry_points": dict(_ENTRY_POINT_PACKAGES)}


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    params: dict[str, Param]
    # the small settings `cltoolbox.testing` checks the plugin with (declared at registration)
    test_params: dict[str, Any] = field(default_factory=dict)
    test_model: dict[str, Any] | None = None  # strategies: another backbone than the kit's small MLP
    test_dataset: str | None = "digits"  # scenarios: the dataset to check on; None: not checkable on a toy set

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

    def register(self, name: str | None = None, *, override: bool = False,
                 test_params: dict[str, Any] | None = None, test_model: dict[str, Any] | None = None,
                 test_dataset: str | None = "digits") -> Callable[[Callable], Callable]:
        """Decorator: ``@STRATEGIES.register("my_method")``. A name that is taken (a built-in's, an entry
        point's or another file's) is an error unless ``override=True``; the same definition registering again
        (its module imported twice) is not.

        ``test_params`` (and for strategies ``test_model``, for scenarios ``test_dataset``) are the small
        settings that ``cltoolbox.testing`` and ``cltoolbox check`` run the plugin with."""

        def deco(factory: Callable) -> Callable:
            key = name or factory.__name__.lower()
            params = signature_params(factory, self._skip)
            unknown = sorted(set(test_params or {}) - set(params))
            if unknown:
                raise PluginError(f"{self.singular} '{key}': test_params {', '.join(unknown)} "
                                  f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} "
                                  f"of {getattr(factory, '__qualname__', key)}; valid: {', '.join(params) or 'none'}")
            factory = with_limits(factory, params, self.singular)
            entry = Entry(key, factory, params, dict(test_params or {}), test_model, test_dataset)
            self._load()  # the built-ins first, so that none of them silently replaces this plugin later
            old = self._entries.get(key)
            if old is not None and not override and _origin(old.factory) != _origin(factory):
                mine = getattr(factory, "__qualname__", key)
                raise PluginError(f"{self.singular} '{key}' is already registered by {_origin(old.factory)}; "
                                  f"choose another name for {mine}, or pass override=True to replace it")
            self._entries[key] = entry
            return factory

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin_module)
        for ep in metadata.entry_points(group=f"cltoolbox.{self.kind}"):
            self.register(ep.name)(ep.load())
            if ep.dist is not None:
                _ENTRY_POINT_PACKAGES[ep.dist.name] = ep.dist.version

    def get(self, name: str, field: str | None = None) -> Entry:
        self._load()
        if name not in self._entries:
            where = field or self.kind
            raise ConfigError(
                f"{where}: unknown {self.singular} '{name}'{closest(name, self._entries)}; "
                f"run `cltoolbox list {self.kind} --imports <config>` to see the {len(self._entries)} available"
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
            except CLToolboxError as e:  # a plugin mistake found at registration: keep its one line
                raise type(e)(f"imports: module '{spec}': {e}") from e
            except Exception as e:  # noqa: BLE001 - the user's module raised while it was imported
                raise ConfigError(f"imports: module '{spec}' raised {one_line(e)} on import; fix it") from e
            continue
        path = resolve_import_path(spec, base_dir)
        if not path.is_file():
            raise ConfigError(f"imports: file '{spec}' not found; give a path relative to the config or the cwd")
        name = file_module_name(path)
        if name in sys.modules:
            continue
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except CLToolboxError as e:  # a plugin mistake found at registration: keep its one line
            del sys.modules[name]
            raise type(e)(f"imports: '{path}': {e}") from e
        except Exception as e:  # noqa: BLE001 - a syntax error or an exception in the user's file
            del sys.modules[name]
            raise ConfigError(f"imports: '{path}' failed on import ({one_line(e)}); fix the file") from e
        _IMPORTED_FILES[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()


def file_module_name(path: Path) -> str:
    """The module name an ``imports:`` file is loaded under (one per file, within a process)."""
    path = path.resolve()
    return f"cltoolbox_user_{path.stem}_{abs(hash(str(path)))}"


def registered_by(spec: str, base_dir: str | None = None) -> dict[str, list[str]]:
    """Import one ``imports:`` spec (a ``.py`` file or a module) and return, per registry kind, the names of
    the plugins whose factories it (or, for a package, one of its modules) defines."""
    import_plugins([spec], base_dir)
    if spec.endswith(".py"):
        module = file_module_name(resolve_import_path(spec, base_dir))
        mine = lambda m: m == module  # noqa: E731
    else:
        mine = lambda m: m == spec or m.startswith(spec + ".")  # noqa: E731
    return {kind: [e.name for e in reg.entries() if mine(getattr(e.factory, "__module__", ""))]
            for kind, reg in REGISTRIES.items()}


def resolve_import_path(spec: str, base_dir: str | None) -> Path:
    """A ``.py`` spec of ``imports:`` as an absolute path: relative to the cwd if it exists there, else to
    the config's folder. Runs record absolute paths, so a run's config.yaml runs again from anywhere."""
    path = Path(spec)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = Path(base_dir) / path
    return path.resolve()
