"""cltoolbox: continual-learning experiments with exact metrics.

Python API: ``cltoolbox.run(config)`` runs an experiment (a YAML path or a dict) and
``cltoolbox.load_results(paths)`` loads run folders as pandas DataFrames. Submodules are imported on
first use so that ``import cltoolbox`` (and ``cltoolbox --help``) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["run", "load_results", "__version__"]


def run(config: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Run an experiment; see :func:`cltoolbox.runner.run`."""
    from cltoolbox.runner import run as _run

    return _run(config, **kwargs)


def load_results(paths: Any) -> dict[str, Any]:
    """Load run folders as DataFrames; see :func:`cltoolbox.results.load`."""
    from cltoolbox.results import load

    return load(paths)
