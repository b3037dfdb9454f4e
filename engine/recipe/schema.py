"""YAML recipe → frozen, validated Recipe (the types: shardmerge.engine.recipe.model).

Every configuration error is raised here, as ValueError quoting the recipe file and the YAML path
(e.g. `recipe.yaml: models[1].parameters.weight: expected a number, got 'heavy'`), before any tensor is read:
the recipe is validated against the model, its relative paths resolved, and the semantic checks of
shardmerge.engine.recipe.checks run (those of its form included).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shardmerge.engine.recipe.checks import check_recipe
from shardmerge.engine.recipe.model import CalibrationRecipe as CalibrationRecipe
from shardmerge.engine.recipe.model import Condition as Condition
from shardmerge.engine.recipe.model import ModelEntry as ModelEntry
from shardmerge.engine.recipe.model import ModuleRecipe as ModuleRecipe
from shardmerge.engine.recipe.model import OutputSlice as OutputSlice
from shardmerge.engine.recipe.model import PairWeights as PairWeights
from shardmerge.engine.recipe.model import Recipe as Recipe
from shardmerge.engine.recipe.model import Scalar as Scalar
from shardmerge.engine.recipe.model import SliceSource as SliceSource
from shardmerge.engine.recipe.model import TokenEmbedding as TokenEmbedding
from shardmerge.engine.recipe.model import TokenizerRecipe as TokenizerRecipe
from shardmerge.engine.recipe.model import TokenSource as TokenSource

_UNION_LABELS = {
    "bool",
    "int",
    "float",
    "str",
    "list[...]",
    "ModelEntry",
    "PairWeights",
    "CalibrationRecipe",
    "TokenSource",
    "OutputSlice",
    "SliceSource",
}


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_LABELS or "[" in str(part) or part.startswith(("list", "Condition")):
            continue  # pydantic's union-branch labels are noise for users
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def parse_recipe(data: Any, *, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative model paths resolve against the recipe's directory when they exist there."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        extra = "unknown key" if first["type"] == "extra_forbidden" else f"{msg}, got {got!r}"
        raise ValueError(f"{source}: {_yaml_path(first['loc'])}: {extra}") from None
    if base_dir is not None:
        recipe = _resolve_paths(recipe, base_dir)
    check_recipe(recipe, source)
    return recipe


def _resolve(ref: str | None, base_dir: Path) -> str | None:
    if ref is None or Path(ref).is_absolute():
        return ref
    cand = base_dir / ref
    return str(cand.resolve()) if os.path.exists(cand) else ref  # os.path: False for a name too long, no OSError


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    models = [m.model_copy(update={"model": _resolve(m.model, base_dir)}) for m in recipe.models]
    upd = {"models": models}
    if recipe.slices:
        upd["slices"] = [
            sl.model_copy(
                update={
                    "base_model": _resolve(sl.base_model, base_dir),
                    "sources": [src.model_copy(update={"model": _resolve(src.model, base_dir)}) for src in sl.sources],
                }
            )
            for sl in recipe.slices
        ]
    for key in ("base_model", "mllm", "base_llm", "init_model"):
        upd[key] = _resolve(getattr(recipe, key), base_dir)
    if recipe.calibration is not None:
        upd["calibration"] = recipe.calibration.model_copy(update={"path": _resolve(recipe.calibration.path, base_dir)})
    if recipe.tokenizer_source not in (None, "base", "union"):
        upd["tokenizer_source"] = _resolve(recipe.tokenizer_source, base_dir)
    if recipe.tokenizer is not None:
        upd["tokenizer"] = _resolve_tokenizer(recipe.tokenizer, base_dir)
    if recipe.chat_template and "\n" not in recipe.chat_template and "{" not in recipe.chat_template:
        upd["chat_template"] = _resolve(recipe.chat_template, base_dir)  # a template file next to the recipe
    if isinstance(recipe.parameters.get("plateau"), str):  # PlaM's probe.json, written next to the recipe
        upd["parameters"] = {**recipe.parameters, "plateau": _resolve(recipe.parameters["plateau"], base_dir)}
    if any(m.source for m in recipe.modules.values()):  # passthrough sources name models like `models:` does
        upd["modules"] = {
            k: m.model_copy(update={"source": _resolve(m.source, base_dir)}) for k, m in recipe.modules.items()
        }
    return recipe.model_copy(update=upd)


def _resolve_tokenizer(tok: TokenizerRecipe, base_dir: Path) -> TokenizerRecipe:
    """Model names in the `tokenizer:` section resolve like `models:` entries."""

    def src(s):
        if isinstance(s, str):
            return _resolve(s, base_dir)
        return s.model_copy(update={"model": _resolve(s.model, base_dir)}) if s is not None else None

    tokens = {t: e.model_copy(update={"source": src(e.source)}) for t, e in tok.tokens.items()}
    source = tok.source if tok.source in ("base", "union") else _resolve(tok.source, base_dir)
    return tok.model_copy(update={"tokens": tokens, "source": source})


def load_recipe(path: Path | str) -> Recipe:
    """Read a recipe file (bounded, strict YAML: shardmerge.engine.io.loaders) and validate it."""
    from shardmerge.engine.io.loaders import load_yaml_file

    path = Path(path)
    if not path.exists():
        raise ValueError(f"recipe {path} does not exist")
    data = load_yaml_file(path)
    return parse_recipe(data, source=str(path), base_dir=path.parent)


def with_random_seed(recipe: Recipe, seed: int | None, source: str = "<recipe>") -> Recipe:
    """The recipe with `--random-seed` applied: `random_seed` set for every method of the recipe that draws keyed
    randomness (those declaring a `random_seed` parameter: DARE, DELLA), at the top level or in the module that uses
    it, so the plan hash and the model card record it. A recipe that already sets a different `random_seed` there
    is an error (two seeds for one merge). Methods without randomness ignore it, as mergekit's deterministic
    methods ignore its --random-seed."""
    if seed is None:
        return recipe
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--random-seed must be an integer, got {seed!r}")
    from shardmerge.engine import methods

    def seeded(method: str, params: dict, where: str) -> dict | None:
        if method == "passthrough" or "random_seed" not in methods.get(method).global_params:
            return None
        given = params.get("random_seed")
        if given is not None and given != seed:
            raise ValueError(
                f"{source}: {where}.random_seed is {given!r} but --random-seed is {seed}; give the seed in one place"
            )
        return {**params, "random_seed": seed}

    upd: dict[str, Any] = {}
    top = seeded(recipe.merge_method, recipe.parameters, "parameters")
    if top is not None:
        upd["parameters"] = top
    modules = {}
    for name, mod in recipe.modules.items():
        own = seeded(mod.merge_method, mod.parameters, f"modules.{name}.parameters")
        modules[name] = mod if own is None else mod.model_copy(update={"parameters": own})
    if modules:
        upd["modules"] = modules
    return recipe.model_copy(update=upd) if upd else recipe
