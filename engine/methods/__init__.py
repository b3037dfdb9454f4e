"""Registry of merge methods by name.

Each method lives in its own module under engine/methods/ and registers its MethodSpec(s) on import. The modules
are discovered (every module of this package is imported on first lookup), so adding a method is adding one file.
A module that fails to import is an error (never a method that silently vanishes), and so is a module outside
HELPER_MODULES that registers nothing. Aliases are declared once, on the spec (`MethodSpec.aliases`).
"""

from __future__ import annotations

import sys

from shardmerge.engine.methods.base import Chunk, ChunkReader, MethodSpec, Param, TensorInfo
from shardmerge.engine.registry import import_plugins, plugin_modules

_REGISTRY: dict[str, MethodSpec] = {}  # canonical name -> spec
_ALIASES: dict[str, str] = {}  # alias -> canonical name
_REGISTERED_BY: dict[str, set[str]] = {}  # module name -> the names it registered

# Modules of this package that hold shared code, not methods.
HELPER_MODULES = frozenset({"base", "common", "select", "rsvd", "catalog", "gram"})
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method and its aliases; a name taken twice is a programming error."""
    for name in (spec.name, *spec.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"merge method name {name!r} is already registered")
    _REGISTRY[spec.name] = spec
    _REGISTERED_BY.setdefault(sys._getframe(1).f_globals.get("__name__", ""), set()).add(spec.name)
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def method_modules() -> list[str]:
    """The method modules of this package (every module but the helpers), sorted."""
    return plugin_modules(__path__, HELPER_MODULES)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import_plugins(
        "shardmerge.engine.methods",
        method_modules(),
        _REGISTERED_BY,
        "engine/methods/{mod}.py registered no merge method; a method module calls "
        "shardmerge.engine.methods.register(MethodSpec(...)), shared code belongs in HELPER_MODULES",
    )


def canonical(name: str) -> str:
    """The canonical method name of a name or alias (unknown names are returned as given)."""
    _load_all()
    return _ALIASES.get(name, name)


def get(name: str) -> MethodSpec:
    _load_all()
    try:
        return _REGISTRY[_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown merge_method {name!r}; known methods: {', '.join(names(aliases=True))}") from None


def names(aliases: bool = False) -> list[str]:
    """Canonical method names, sorted (with their aliases too when `aliases`)."""
    _load_all()
    return sorted(list(_REGISTRY) + (list(_ALIASES) if aliases else []))


def specs() -> list[MethodSpec]:
    """Every registered spec, sorted by name."""
    return [_REGISTRY[n] for n in names()]


__all__ = [
    "Chunk",
    "ChunkReader",
    "MethodSpec",
    "Param",
    "TensorInfo",
    "canonical",
    "get",
    "names",
    "register",
    "specs",
]
