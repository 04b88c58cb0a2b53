"""Built-in strategies. A strategy is a registered factory whose typed keyword arguments are its
hyperparameters and which returns the plugins that implement it (see ``cltoolbox list strategies``).

Every module of this package is imported here, so a new file that uses ``@register_strategy`` is
picked up without further wiring.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
