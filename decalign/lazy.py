"""Packages whose public names load their modules when first used (PEP 562), so that importing
the package, or a light module of it, does not import torch."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def lazy_names(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A package's module `__getattr__` for `homes` (public name -> the module, relative to the
    package, that defines it): the first use of a name imports its module and keeps the name."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(homes[name], package), name)
        setattr(sys.modules[package], name, value)  # once: later lookups do not come here
        return value

    return __getattr__
