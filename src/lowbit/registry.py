"""Name -> class or builder, for quantizers, methods and models: one lookup, one option check.

Every registry gives the same one-line errors: ``unknown quantizer 'x'; available: ...`` and
``method 'dqa' has no option foo; its options: ...``. Options are the keyword parameters of the
registered class's ``__init__`` (or the builder function), less the ``fixed`` ones every entry
takes (e.g. a quantizer's ``bits`` and ``role``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

from .errors import ConfigError


def is_number_annotation(annotation: Any) -> bool:
    """An int or float annotation (also ``int | None``, a list of them) that is not a bool: true/false given for it
    is refused (pydantic and float() read true as 1)."""
    s = str(annotation)
    return "bool" not in s and ("int" in s or "float" in s)


class Registry:
    def __init__(self, kind: str, fixed: Iterable[str] = (), sort_key: Callable[[str], Any] | None = None):
        self.kind = kind
        self.fixed = tuple(fixed)
        self._sort_key = sort_key
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: register ``obj`` under ``name``. Another object under a taken name is an error; the same
        definition again (a notebook cell run twice: same module and qualified name) replaces it."""

        def deco(obj):
            old = self._entries.get(name)
            if old is not None and not _same_definition(old, obj):
                raise ConfigError(f"{self.kind} '{name}' is already registered"
                                  + (f" (by {_where(old)})" if _where(old) else ""))
            self._entries[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries, key=self._sort_key)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def options(self, name: str) -> list[str]:
        obj = self.get(name)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        return [p for p in inspect.signature(fn).parameters if p != "self" and p not in self.fixed]

    def check_options(self, name: str, given: Iterable[str]) -> None:
        allowed = self.options(name)
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{self.kind} '{name}' has no option {', '.join(unknown)}; its options: {', '.join(allowed) or '(none)'}"
            )
        if isinstance(given, dict):  # a yes/no option must be true or false: bool('false') is True
            obj = self.get(name)
            params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
            for k, v in given.items():
                ann = str(params[k].annotation)
                if ann in ("bool", "bool | None", "<class 'bool'>") and not isinstance(v, bool) \
                        and not (v is None and "None" in ann):
                    raise ConfigError(f"{self.kind} '{name}' option {k} must be true or false, got {v!r}")
                if isinstance(v, bool) and is_number_annotation(ann):  # float(True) is 1
                    raise ConfigError(f"{self.kind} '{name}' option {k} must be a number, got {str(v).lower()}")


def _where(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}".strip(".")


def _same_definition(old, new) -> bool:
    """Whether ``new`` is ``old`` defined again (its module and qualified name), not another object: a built-in keeps
    its name (its module is lowbit's, a user's is not)."""
    return old is new or (_where(old) == _where(new) != "" and not _where(old).startswith("lowbit."))

