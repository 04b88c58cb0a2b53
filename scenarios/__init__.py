"""Built-in scenarios. A scenario is a registered factory whose typed keyword arguments are its
parameters and which returns a Stream (see ``cltoolbox list scenarios``).

Every module of this package is imported here, so a new file that uses ``@register_scenario`` is
picked up without further wiring.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
