"""Remedies, one module per family; each module registers its own in `REMEDIES`.

Every module of this package is imported here, so a new remedy is one new file: no
list to extend, no router or engine to edit. The contract is in `base`.
"""

import importlib
import pkgutil

from commands.remedies.base import REMEDIES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REMEDIES"]
