"""Public names that load on first use (PEP 562), so that importing a package costs nothing until a name is used."""

from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, table: dict[str, str]):
    """(`__getattr__`, `__dir__`) for `package`'s namespace: `table` maps a public name to the module defining it.

    A loaded name is stored in the package's namespace, so later lookups skip `__getattr__`.
    """

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
