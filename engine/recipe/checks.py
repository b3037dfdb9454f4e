"""Semantic recipe checks and parameter resolution (filters and per-layer gradients, mergekit semantics).

`resolve_params` turns a recipe's settings into the scalars a method receives for one tensor:
per-model parameters as tuples aligned with the method's inputs, global parameters as scalars.
"""

from __future__ import annotations

from typing import Any

from shardmerge.engine import methods
from shardmerge.engine.methods.base import MethodSpec
from shardmerge.engine.plan.forms import form_for_method, form_of
from shardmerge.engine.recipe.model import Condition, ModuleRecipe, Recipe


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


def leaf_values(setting: Any) -> list[Any]:
    if isinstance(setting, Condition):
        return leaf_values(setting.value)
    if isinstance(setting, list):
        return [v for s in setting for v in leaf_values(s)]
    return [setting]


def check_settings(
    spec: MethodSpec, settings: dict, where: str, per_model_only: bool, n_models: int | None = None
) -> None:
    """Every key is a parameter the spec declares (per-model ones only, under models[].parameters) and every
    value a filter or gradient can produce is valid for its declaration (Param.check)."""
    known = {p.name: p for p in spec.params if p.per_model or not per_model_only}
    for key, setting in settings.items():
        if key not in known:
            raise ValueError(
                f"{where}.{key}: unknown parameter for merge_method {spec.name!r}; "
                f"known: {', '.join(sorted(known)) or '(none)'}"
            )
        for v in leaf_values(setting):
            known[key].check(v, f"{where}.{key}", n_models)


def check_recipe(recipe: Recipe, source: str) -> None:
    """The checks of the recipe's form (shardmerge.engine.plan.forms: standard, slices, PlaM, PivotMerge), which
    build on the ones below: method exists, models are given in the form it needs, every parameter is known and
    well-typed."""
    form_of(recipe).check(recipe, source)


def check_method(recipe: Recipe, source: str, *, calibration: bool = False) -> MethodSpec:
    """What every `merge_method:` form checks first: the method exists, the chat template and tokenizer settings
    are well-formed, and `calibration:` is given only to a form that reads it. Returns the method's spec."""
    try:
        spec = methods.get(recipe.merge_method)
    except ValueError as exc:
        raise ValueError(f"{source}: merge_method: {exc}") from None
    if recipe.chat_template:
        from shardmerge.engine.io.chat_templates import check_chat_template

        check_chat_template(recipe.chat_template, source)
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise ValueError(
            f"{source}: tokenizer_source: give either tokenizer_source or a tokenizer: section "
            "(its `source:` key), not both"
        )
    if recipe.calibration is not None and not calibration:
        raise ValueError(f"{source}: calibration: only used by merge_method pivot (contribution: data); remove it")
    return spec


def check_models_recipe(recipe: Recipe, source: str, spec: MethodSpec) -> None:
    """The `models:` form (with `modules:`): models given, a base where the method needs one, the model count,
    every top-level, per-model and module parameter known and well-typed, required parameters present."""
    if not recipe.models:
        raise ValueError(f"{source}: models: at least one model is required")
    if spec.needs_base and not recipe.base_model:
        raise ValueError(f"{source}: base_model: merge_method {spec.name!r} needs a base_model")
    _check_model_count(recipe, spec, f"{source}: models")
    n = len(input_models(recipe, spec))
    check_settings(spec, recipe.parameters, f"{source}: parameters", per_model_only=False, n_models=n)
    module_specs = check_modules(recipe, source)
    for i, m in enumerate(recipe.models):
        for key, setting in m.parameters.items():  # a per-model key may serve a module's method only
            owner = next((s for s in [spec, *module_specs] if key in s.per_model_params), spec)
            check_settings(
                owner,
                {key: setting},
                f"{source}: models[{i}].parameters",
                per_model_only=True,
                n_models=len(input_models(recipe, owner)),
            )
    for key, default in {**spec.global_params}.items():
        if default is None and key not in recipe.parameters:
            raise ValueError(f"{source}: parameters.{key}: required by merge_method {spec.name!r}")


def _check_model_count(recipe: Recipe, spec: MethodSpec, where: str) -> None:
    n = len(input_models(recipe, spec))
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (
            f"at least {spec.min_models}"
            if spec.max_models is None
            else f"{spec.min_models}" + (f"..{spec.max_models}" if spec.max_models != spec.min_models else "")
        )
        besides = " (not counting the base model)" if recipe.base_model and not spec.base_is_input else ""
        raise ValueError(f"{where}: merge_method {spec.name!r} takes {want} input model(s), got {n}{besides}")


# --------------------------------------------------------------------------------------------- modules:
PASSTHROUGH = "passthrough"  # a module copied verbatim from one model (op COPY in the planner, bit-exact)
MODULE_ALIASES = {"text_decoder": "language_model", "multi_modal_projector": "projector"}  # mergekit's names


def module_key(name: str) -> str:
    """Canonical module name (shardmerge.engine.layout.roles.MODULES) of a `modules:` key; mergekit's names are accepted."""
    return MODULE_ALIASES.get(name, name)


def passthrough_source(recipe: Recipe, module: ModuleRecipe) -> str:
    """The model a passthrough module copies from: its `source`, else base_model, else the first model."""
    return module.source or recipe.base_model or recipe.model_refs[0]


def check_modules(recipe: Recipe, source: str) -> list[MethodSpec]:
    """Every `modules:` entry names a known module once, a known method with parameters it accepts and models
    it can take; passthrough takes no parameters and copies from a model of the recipe. Returns the specs used."""
    from shardmerge.engine.layout.roles import MODULES

    seen: dict[str, str] = {}
    specs = []
    refs = set(recipe.model_refs) | ({recipe.base_model} if recipe.base_model else set())
    for name, mod in recipe.modules.items():
        where = f"{source}: modules.{name}"
        key = module_key(name)
        if key not in MODULES:
            raise ValueError(
                f"{where}: unknown module; expected one of {', '.join(MODULES)} "
                f"(or mergekit's {', '.join(MODULE_ALIASES)})"
            )
        if key in seen:
            raise ValueError(f"{where}: module {key!r} is already configured as modules.{seen[key]}")
        seen[key] = name
        if mod.merge_method == PASSTHROUGH:
            if mod.parameters:
                raise ValueError(
                    f"{where}.parameters: passthrough copies tensors verbatim and takes no parameters, "
                    f"got {sorted(mod.parameters)}"
                )
            if mod.source is not None and mod.source not in refs:
                raise ValueError(
                    f"{where}.source: {mod.source!r} is not a model of this recipe; expected one of "
                    f"{', '.join(sorted(refs))}"
                )
            continue
        if mod.source is not None:
            raise ValueError(f"{where}.source: only merge_method passthrough copies from a source model")
        try:
            mspec = methods.get(mod.merge_method)
        except ValueError as exc:
            raise ValueError(f"{where}.merge_method: {exc}") from None
        if own_form(mspec.name) is not None:
            raise ValueError(
                f"{where}.merge_method: {mspec.name!r} has its own recipe form and cannot be a module's method"
            )
        if mspec.needs_base and not recipe.base_model:
            raise ValueError(f"{where}.merge_method: {mspec.name!r} needs a base_model")
        _check_model_count(recipe, mspec, f"{where}.merge_method")
        check_settings(
            mspec,
            mod.parameters,
            f"{where}.parameters",
            per_model_only=False,
            n_models=len(input_models(recipe, mspec)),
        )
        for key, default in mspec.global_params.items():
            if default is None and key not in mod.parameters and key not in recipe.parameters:
                raise ValueError(f"{where}.parameters.{key}: required by merge_method {mspec.name!r}")
        specs.append(mspec)
    return specs


def own_form(method: str) -> str | None:
    """The recipe form a merge method exists as (PlaM, PivotMerge), None for a method any form can use."""
    form = form_for_method(method)
    return form.name if form is not None else None


def module_settings(recipe: Recipe, module: ModuleRecipe) -> dict:
    """A module's parameter settings: its own, falling back to the top-level `parameters` key by key."""
    return {**recipe.parameters, **module.parameters}


def input_models(recipe: Recipe, spec: MethodSpec) -> list[str]:
    """The non-base inputs a method receives as `tensors`, in recipe order."""
    refs = recipe.model_refs
    if spec.base_is_input or not recipe.base_model:
        return refs
    return [r for r in refs if r != recipe.base_model]


def resolve_params(
    recipe: Recipe, spec: MethodSpec, tensor_name: str, t: float, settings: dict | None = None
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
