"""Built-in scenario generators: ``(data: TensorData, seed: int, **params) -> Stream``.

Importing this package registers them (see ``cltoolbox list scenarios``).
"""

from cltoolbox.scenarios import domain, incremental  # noqa: F401
