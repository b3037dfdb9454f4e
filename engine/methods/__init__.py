"""Registry of merge methods by name. Each method lives in its own module and registers itself on import."""

from __future__ import annotations

import importlib

from engine.methods.base import Chunk, ChunkReader, MethodSpec, TensorInfo

_REGISTRY: dict[str, MethodSpec] = {}

# Modules imported on first lookup; each calls register() at import time.
_MODULES = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "slerp",
    "breadcrumbs",
    "della",
    "sce",
    "ram",
    "svd",
    "pivot",
    "plam",
)
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; a second method under the same name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODULES:
        try:
            importlib.import_module(f"engine.methods.{mod}")
        except ModuleNotFoundError as exc:  # a method module not written yet
            if exc.name != f"engine.methods.{mod}":
                raise


def get(name: str) -> MethodSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown merge_method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


__all__ = ["Chunk", "ChunkReader", "MethodSpec", "TensorInfo", "get", "names", "register"]
