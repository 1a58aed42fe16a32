"""Training methods: weight parametrizations, extra loss terms and schedule callbacks."""

from .base import STE, Method, QuantizedWeight, build_from_spec, build_method, list_methods, register_method

__all__ = ["Method", "STE", "QuantizedWeight", "build_from_spec", "build_method", "list_methods", "register_method"]
