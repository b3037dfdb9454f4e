"""Registry of recipe forms: the shapes a recipe can take, each with its checks and its planner.

A form is one module of this package that registers a `Form` on import: `standard` (`models:`, optionally with
`modules:`), `slices` (mergekit's `slices:`), `plam` (`mllm:` + `base_llm:`) and `pivot` (PivotMerge's
projector merge). The modules are discovered like the merge methods (shardmerge.engine.methods): every module of
this package but HELPER_MODULES is imported on first lookup, and one that registers nothing is an error.

`form_of(recipe)` picks the form (forms are asked in `order`; the standard form takes what no other claims);
the recipe checks (shardmerge.engine.recipe.checks.check_recipe) run its `check`, the plan builder
(shardmerge.engine.plan.build.build_plan) its `items`, which returns the planner (the opened checkpoints, the
reference model, notes, artifacts, config updates), the typed plan items (shardmerge.engine.plan.model.PlanItem)
in output order, and the language-model layer count.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardmerge.engine import methods
from shardmerge.engine.plan.model import PlanItem
from shardmerge.engine.recipe.model import Recipe
from shardmerge.engine.registry import import_plugins, plugin_modules

# Modules of this package that hold shared code, not forms.
HELPER_MODULES = frozenset({"pivot_calibration"})


@dataclass(frozen=True)
class Form:
    """One recipe form.

    `check(recipe, source)` raises a ValueError naming the recipe and key for anything wrong with a recipe of this
    form. `items(recipe, source, state=..., address=...)` returns (planner, items, num_layers) from headers only
    (`state`: the state dir of an output being resumed; `address`: the Ray cluster of the merge). `methods`: merge
    methods that exist only as this form (they cannot be a module's or a slice's method); a recipe naming one
    has this form. `matches`: for a form not chosen by its method, whether a recipe has it. `vocabulary`: the
    form plans the output vocabulary (`tokenizer:` sections, `tokenizer_source: union`)."""

    name: str
    check: Callable[[Recipe, str], None]
    items: Callable[..., tuple[Any, list[PlanItem], int]]
    methods: tuple[str, ...] = ()
    matches: Callable[[Recipe], bool] | None = None
    vocabulary: bool = False
    order: int = 50  # forms are asked in this order; the standard form, which takes every recipe, last

    def claims(self, recipe: Recipe) -> bool:
        if self.matches is not None:
            return self.matches(recipe)
        return methods.canonical(recipe.merge_method) in self.methods


_FORMS: dict[str, Form] = {}
_REGISTERED_BY: dict[str, set[str]] = {}
_loaded = False


def register(form: Form) -> Form:
    """Add a form; a name (or an owned method) taken twice is a programming error."""
    owned = {m for f in _FORMS.values() for m in f.methods}
    if form.name in _FORMS or owned & set(form.methods):
        raise ValueError(f"recipe form {form.name!r} (methods {form.methods}) is already registered")
    _FORMS[form.name] = form
    _REGISTERED_BY.setdefault(sys._getframe(1).f_globals.get("__name__", ""), set()).add(form.name)
    return form


def form_modules() -> list[str]:
    """The form modules of this package (every module but the helpers), sorted."""
    return plugin_modules([str(Path(__file__).parent)], HELPER_MODULES)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import_plugins(
        __name__,
        form_modules(),
        _REGISTERED_BY,
        "engine/plan/forms/{mod}.py registered no recipe form; a form module calls "
        "shardmerge.engine.plan.forms.register(Form(...)), shared code belongs in HELPER_MODULES",
    )


def forms() -> list[Form]:
    """Every registered form, in the order they are asked."""
    _load_all()
    return sorted(_FORMS.values(), key=lambda f: (f.order, f.name))


def form_of(recipe: Recipe) -> Form:
    """The form of a recipe: the first form (in `order`) that claims it."""
    for form in forms():
        if form.claims(recipe):
            return form
    raise ValueError(f"no recipe form takes merge_method {recipe.merge_method!r}")  # the standard form takes all


def form_for_method(method: str) -> Form | None:
    """The form a merge method exists as (PlaM, PivotMerge); None for a method every form can use."""
    name = methods.canonical(method)
    return next((f for f in forms() if name in f.methods), None)
