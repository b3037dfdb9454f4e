"""Semantic recipe checks and parameter resolution (filters and per-layer gradients, mergekit semantics).

`resolve_params` turns a recipe's settings into the scalars a method receives for one tensor:
per-model parameters as tuples aligned with the method's inputs, global parameters as scalars.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from engine import methods
from engine.methods.base import MethodSpec
from engine.recipe import Condition, Recipe

# Parameters that are fractions: 0 < value <= 1; interpolation factors: 0 <= value <= 1; gamma: 0 <= value < 1.
_FRACTIONS = {"density", "energy", "rank_fraction"}
_UNIT_INTERVAL = {"t", "alpha"}


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor: filters by substring, numeric lists interpolate over t = layer/(L-1)."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(c, Condition) for c in setting):
            for cond in setting:
                if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def _check_value(name: str, value: Any, default: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if name in _FRACTIONS and not 0 < value <= 1:
        raise ValueError(f"{where}: {name} must be in (0, 1], got {value!r}")
    if name in _UNIT_INTERVAL and not 0 <= value <= 1:
        raise ValueError(f"{where}: {name} must be in [0, 1], got {value!r}")
    if name == "gamma" and not 0 <= value < 1:
        raise ValueError(f"{where}: gamma must be in [0, 1), got {value!r}")


def _leaf_values(setting: Any) -> list[Any]:
    if isinstance(setting, Condition):
        return _leaf_values(setting.value)
    if isinstance(setting, list):
        return [v for s in setting for v in _leaf_values(s)]
    return [setting]


def _check_settings(spec: MethodSpec, settings: dict, where: str, per_model_only: bool) -> None:
    known = dict(spec.per_model_params) if per_model_only else {**spec.global_params, **spec.per_model_params}
    for key, setting in settings.items():
        if key not in known:
            raise ValueError(
                f"{where}.{key}: unknown parameter for merge_method {spec.name!r}; "
                f"known: {', '.join(sorted(known)) or '(none)'}"
            )
        for v in _leaf_values(setting):
            _check_value(key, v, known[key], f"{where}.{key}")


def check_recipe(recipe: Recipe, source: str) -> None:
    """Method exists, models are given in the form it needs, every parameter is known and well-typed."""
    try:
        spec = methods.get(recipe.merge_method)
    except ValueError as exc:
        raise ValueError(f"{source}: merge_method: {exc}") from None
    if recipe.merge_method == "plam":
        if not (recipe.mllm and recipe.base_llm):
            raise ValueError(f"{source}: merge_method plam needs both `mllm:` and `base_llm:`")
    elif not recipe.models:
        raise ValueError(f"{source}: models: at least one model is required")
    if spec.needs_base and not recipe.base_model and recipe.merge_method not in ("plam", "pivot"):
        raise ValueError(f"{source}: base_model: merge_method {spec.name!r} needs a base_model")
    n = len(input_models(recipe, spec))
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = f"{spec.min_models}" + (f"..{spec.max_models}" if spec.max_models != spec.min_models else "")
        raise ValueError(f"{source}: models: merge_method {spec.name!r} takes {want} input model(s), got {n}")
    _check_settings(spec, recipe.parameters, f"{source}: parameters", per_model_only=False)
    for i, m in enumerate(recipe.models):
        _check_settings(spec, m.parameters, f"{source}: models[{i}].parameters", per_model_only=True)
    for name, mod in recipe.modules.items():
        try:
            mspec = methods.get(mod.merge_method)
        except ValueError as exc:
            raise ValueError(f"{source}: modules.{name}.merge_method: {exc}") from None
        _check_settings(mspec, mod.parameters, f"{source}: modules.{name}.parameters", per_model_only=False)
    for key, default in {**spec.global_params}.items():
        if default is None and key not in recipe.parameters:
            raise ValueError(f"{source}: parameters.{key}: required by merge_method {spec.name!r}")


def input_models(recipe: Recipe, spec: MethodSpec) -> list[str]:
    """The non-base inputs a method receives as `tensors`, in recipe order."""
    refs = recipe.model_refs
    if recipe.merge_method == "plam":
        return refs
    if spec.base_is_input or not recipe.base_model:
        return refs
    return [r for r in refs if r != recipe.base_model]


def resolve_params(
    recipe: Recipe, spec: MethodSpec, tensor_name: str, t: float, settings: Optional[dict] = None
) -> dict[str, Any]:
    """Per-model params (tuples aligned with input_models) and global params (scalars) for one tensor."""
    settings = recipe.parameters if settings is None else settings
    per_model = {m.model: m.parameters for m in recipe.models}
    out: dict[str, Any] = {}
    for key, default in spec.global_params.items():
        val = evaluate_setting(settings[key], tensor_name, t) if key in settings else None
        out[key] = default if val is None else val
    for key, default in spec.per_model_params.items():
        vals = []
        for ref in input_models(recipe, spec):
            own = per_model.get(ref, {})
            val = evaluate_setting(own[key], tensor_name, t) if key in own else None
            if val is None and key in settings:
                val = evaluate_setting(settings[key], tensor_name, t)
            if val is None:
                val = default
            if val is None:
                raise ValueError(
                    f"parameter {key!r} for model {ref} is required by merge_method {spec.name!r} "
                    f"(tensor {tensor_name}); set it under models[].parameters or parameters"
                )
            vals.append(val)
        out[key] = tuple(vals)
    return out
