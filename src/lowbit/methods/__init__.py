"""Training methods: weight parametrizations, extra loss terms and schedule callbacks.

Every module in this package is imported here, so a method registers itself (``@register_method``)
just by living in ``lowbit/methods/``.
"""

import importlib
import pkgutil

from .base import STE, Method, QuantizedWeight, build_from_spec, build_method, list_methods, register_method

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "STE", "QuantizedWeight", "build_from_spec", "build_method", "list_methods", "register_method"]
