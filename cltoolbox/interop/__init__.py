"""Bridges to other continual-learning libraries.

``cltoolbox.interop.avalanche``: ``from_avalanche(benchmark) -> Stream`` and ``to_avalanche(stream)`` for
Avalanche 0.6 (imported lazily, only when a bridge is used).
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_avalanche", "to_avalanche"]


def from_avalanche(benchmark: Any, name: str | None = None, use_metadata: bool = True) -> Any:
    """An Avalanche benchmark as a cltoolbox Stream; see :func:`cltoolbox.interop.avalanche.from_avalanche`."""
    from cltoolbox.interop.avalanche import from_avalanche as _from

    return _from(benchmark, name=name, use_metadata=use_metadata)


def to_avalanche(stream: Any) -> Any:
    """A cltoolbox Stream as an Avalanche benchmark; see :func:`cltoolbox.interop.avalanche.to_avalanche`."""
    from cltoolbox.interop.avalanche import to_avalanche as _to

    return _to(stream)
