"""The method catalogue rendered from the specs: the table in docs/methods.md and the method section of the
model card. Generated text only; tests/unit/test_method_contract.py regenerates docs/methods.md and compares.

    python -m shardmerge.engine.methods.catalog > docs/methods.md
"""

from __future__ import annotations

from shardmerge.engine import methods
from shardmerge.engine.methods.base import MethodSpec, Param

HEADER = """# Merge methods

Generated from the method specs (`python -m shardmerge.engine.methods.catalog > docs/methods.md`); a test fails when this
file and the specs disagree. Each method is one module under `engine/methods/`.

- **streams**: chunkwise methods read each tensor in row chunks (`--chunk-mb`); the *whole-tensor statistics*
  they need are computed exactly over all chunks first (a `prepare` pass), so the result does not depend on the
  chunking. **whole matrix**: the method holds every input of a tensor at once; the memory check
  (`--max-memory-per-worker`) budgets it with the method's estimate.
- **base**: required (task vectors are taken against it), optional (used when given), input (one more weighted
  input) or unused (accepted and ignored).
- **models**: how many inputs besides the base model.
- parameters: `name` [default] range; *per model* ones may be set under `models[].parameters` or globally;
  "required" ones have no default; *internal* ones are set by the planner from the plan's structure and refused
  in recipes.
"""


def _param_text(p: Param) -> str:
    if p.required:
        default = "required"
    elif p.kind != "str" and (isinstance(p.default, str) or p.default != p.default):  # "auto" / NaN sentinels
        default = "not set"
    else:
        default = {True: "true", False: "false"}.get(p.default, p.default) if p.kind == "bool" else str(p.default)
    extra = p.range_text() or (" / ".join(p.choices) if p.choices else "")
    scope = ", per model" if p.per_model else ", internal: set by the planner" if p.internal else ""
    return f"`{p.name}` [{default}{scope}]" + (f" {extra}" if extra else "")


def _models_text(spec: MethodSpec) -> str:
    if spec.max_models == spec.min_models:
        return str(spec.min_models)
    return f"{spec.min_models}+" if spec.max_models is None else f"{spec.min_models}-{spec.max_models}"


def table() -> str:
    """One row per method: parameters with defaults and ranges, input contract, streaming, mergekit name."""
    rows = ["| method | parameters | models | base | streams | mergekit |", "|---|---|---|---|---|---|"]
    for spec in methods.specs():
        params = "<br>".join(_param_text(p) for p in spec.params) or "(none)"
        streams = "chunkwise" if spec.chunkwise else "whole matrix"
        name = f"`{spec.name}`" + "".join(f"<br>alias `{a}`" for a in spec.aliases)
        mk = f"`{spec.mergekit_name}`" if spec.mergekit_name else "-"
        rows.append(f"| {name} | {params} | {_models_text(spec)} | {spec.base} | {streams} | {mk} |")
    return "\n".join(rows) + "\n"


def details() -> str:
    """Per method: what it computes, which statistics are whole-tensor, and its reference."""
    out = []
    for spec in methods.specs():
        if spec.chunkwise:
            stats = spec.whole_tensor_stats or "none (elementwise on each chunk)"
        else:
            stats = spec.whole_tensor_stats or "whole matrix"
        out.append(
            f"### `{spec.name}`\n\n{spec.doc}\n\n- whole-tensor statistics: {stats}\n- reference: {spec.reference}\n"
        )
    return "\n".join(out)


def document() -> str:
    return f"{HEADER}\n{table()}\n## Methods\n\n{details()}"


def card_section(name: str) -> str:
    """The model card's method section: the method, its reference and its mergekit name."""
    spec = methods.get(name)
    mk = f"; mergekit `{spec.mergekit_name}`" if spec.mergekit_name else ""
    return f"## Method\n\n`{spec.name}`: {spec.doc}\n\nReference: {spec.reference}{mk}\n"


if __name__ == "__main__":
    print(document(), end="")
