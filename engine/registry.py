"""Discovery shared by the registries (merge methods, recipe forms): every module of a package but its helpers is
imported once, on first lookup, and each must have registered something."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping


def plugin_modules(path: Iterable[str], helpers: Iterable[str]) -> list[str]:
    """The modules of the package at `path` that are not helpers, sorted."""
    skip = set(helpers)
    return sorted(m.name for m in pkgutil.iter_modules(list(path)) if m.name not in skip)


def import_plugins(package: str, modules: list[str], registered_by: Mapping[str, object], missing: str) -> None:
    """Import `package.<m>` for every module, then refuse one that registered nothing: ImportError with
    `missing.format(mod=m)`."""
    for mod in modules:
        importlib.import_module(f"{package}.{mod}")
    for mod in modules:
        if not registered_by.get(f"{package}.{mod}"):
            raise ImportError(missing.format(mod=mod))
