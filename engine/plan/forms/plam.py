"""PlaM planning: which tensors of an MLLM are mixed with its base LLM, with which coefficients, from headers only.

A PlaM recipe (`merge_method: plam`, `mllm:`, `base_llm:`) targets some sub-modules (`targets`) of a range of the
MLLM's language-model decoder layers (`layers: [first, last]`, or `plateau: probe.json` = the probe's plateau start
c* .. the last layer). Each targeted tensor becomes W = (1 - alpha) W_mllm + alpha W_base (or a W_mllm + b W_base
with `weights: {mllm: a, base: b}`), every other tensor is copied verbatim from the MLLM, and the MLLM's config,
tokenizer, processor and chat template are the output's. The MLLM <-> base pairing (different on-disk names,
legacy or current) and its checks (missing or shape-mismatched targets, another family, layers out of range) are
shardmerge.engine.layout.roles's; this module turns them into plan items before any tensor data is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import FLOAT_CODES, Checkpoint, open_checkpoint
from shardmerge.engine.layout.roles import Layout, LmPairing, TargetSet, check_lm_pairs, targets_for
from shardmerge.engine.methods.plam import AUTO
from shardmerge.engine.plan.forms import Form, register
from shardmerge.engine.plan.grouping import group_key
from shardmerge.engine.plan.model import COPY, PlanItem
from shardmerge.engine.recipe.checks import check_method, evaluate_setting, leaf_values
from shardmerge.engine.recipe.model import PairWeights, Recipe

log = logging.getLogger("shardmerge.plam")

DEFAULT_TARGETS = "qkvo"
PLATEAU_KEY = (
    "plateau_start"  # probe.json (shardmerge.engine.probe.runner): c*, the first cut of the late-modal plateau
)
PROBE_LAYERS_KEY = "num_layers"


@dataclass(frozen=True)
class PlamSelection:
    """What a PlaM recipe touches: decoder layers first..last (inclusive) and the targeted sub-modules."""

    first: int
    last: int
    targets: TargetSet
    layers_from: str  # "layers" or the probe.json path, for messages and the model card

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


@dataclass
class PlamPlanner:
    """What the plan builder (shardmerge.engine.plan.build) needs from a planner: the opened checkpoints, the reference (the MLLM, whose
    config and tokenizer/processor files the output gets) and notes that are not errors."""

    ckpts: dict[str, Checkpoint]
    reference: str
    selection: PlamSelection
    pairing: LmPairing
    notes: tuple[str, ...] = ()


PLAM_PARAMS = ("layers", "plateau", "alpha", "weights", "weights_mllm", "weights_base", "targets")


def check_plam_recipe(recipe: Recipe, source: str) -> None:
    """The PlaM form: `mllm` + `base_llm` (no models/base_model/modules), a layer range given once (`layers:
    [first, last]` or `plateau: probe.json`), one coefficient form (alpha, or weights {mllm, base}) and targets."""
    if not (recipe.mllm and recipe.base_llm):
        raise ValueError(f"{source}: merge_method plam needs both `mllm:` and `base_llm:`")
    for key in ("models", "base_model", "modules"):
        if getattr(recipe, key):
            raise ValueError(
                f"{source}: {key}: not used by merge_method plam (it mixes `mllm:` with `base_llm:` "
                "and copies everything it does not target from the MLLM); remove it"
            )
    params = recipe.parameters
    where = f"{source}: parameters"
    unknown = sorted(set(params) - set(PLAM_PARAMS))
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: unknown parameter for merge_method 'plam'; known: {', '.join(PLAM_PARAMS)}"
        )
    if ("layers" in params) == ("plateau" in params):
        raise ValueError(
            f"{where}: plam needs exactly one of `layers: [first, last]` and `plateau: probe.json` "
            f"(got {'both' if 'layers' in params else 'neither'})"
        )
    if "layers" in params:
        plam_layer_bounds(params["layers"], f"{where}.layers")
    elif not isinstance(params["plateau"], str):
        raise ValueError(f"{where}.plateau: expected the path of a probe.json, got {params['plateau']!r}")
    _check_plam_coefficients(params, where)
    if "targets" in params:
        plam_targets(params["targets"], f"{where}.targets")


def plam_layer_bounds(setting: Any, where: str) -> tuple[int, int]:
    """`layers: [first, last]`, an inclusive range of decoder layers (upper bound checked against the model)."""
    ok = (
        isinstance(setting, list)
        and len(setting) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in setting)
    )
    if not ok:
        raise ValueError(f"{where}: expected [first, last] (two layer indices, inclusive), got {setting!r}")
    first, last = setting
    if not 0 <= first <= last:
        raise ValueError(f"{where}: expected 0 <= first <= last, got {setting!r}")
    return first, last


def plam_targets(setting: Any, where: str):
    """The TargetSet of a `targets:` setting (qkvo | attn | mlp | norms | all, or a list of those / sub names)."""
    if isinstance(setting, list) and not all(isinstance(v, str) for v in setting):
        raise ValueError(f"{where}: expected target names, got {setting!r}")
    if not isinstance(setting, (str, list)):
        raise ValueError(f"{where}: expected a target name or a list of them, got {setting!r}")
    try:
        return targets_for(setting)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_plam_coefficients(params: dict, where: str) -> None:
    pair = "weights" in params or "weights_mllm" in params or "weights_base" in params
    if pair and "alpha" in params:
        raise ValueError(
            f"{where}: give alpha (W = (1-alpha) W_mllm + alpha W_base) or weights {{mllm, base}}, not both"
        )
    if "weights" in params and ("weights_mllm" in params or "weights_base" in params):
        raise ValueError(f"{where}.weights: give weights {{mllm, base}} or weights_mllm/weights_base, not both")
    if "weights" in params and not isinstance(params["weights"], PairWeights):
        raise ValueError(f"{where}.weights: expected {{mllm: <number>, base: <number>}}, got {params['weights']!r}")
    if ("weights_mllm" in params) != ("weights_base" in params):
        raise ValueError(f"{where}: weights_mllm and weights_base go together")
    spec = methods.get("plam")
    for key in ("alpha", "weights_mllm", "weights_base"):
        if key in params:
            for v in leaf_values(params[key]):
                spec.param(key).check(v, f"{where}.{key}")
    if "weights" in params:
        for side in ("mllm", "base"):
            for v in leaf_values(getattr(params["weights"], side)):
                spec.param(f"weights_{side}").check(v, f"{where}.weights.{side}")


def plateau_start(path: str, num_layers: int, where: str) -> int:
    """c* from a probe.json written by the probe job; it must be a probe of a model with `num_layers` layers and
    leave at least one decoder layer in the plateau (c* <= L - 1)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"{where}: probe file {path} does not exist; run `shardmerge probe` first or give `layers: [first, last]`"
        )
    try:
        probe = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: {path} is not valid JSON ({exc})") from None
    if not isinstance(probe, dict) or PLATEAU_KEY not in probe:
        raise ValueError(f"{where}: {path} has no {PLATEAU_KEY!r}; expected the probe.json of `shardmerge probe`")
    probe_layers = probe.get(PROBE_LAYERS_KEY)
    if probe_layers is not None and probe_layers != num_layers:
        raise ValueError(
            f"{where}: {path} probed a model with {probe_layers} layers, but the MLLM has {num_layers}; probe this MLLM"
        )
    start = probe[PLATEAU_KEY]
    if start is None:
        warn = "; ".join(probe.get("warnings") or []) or "the curve is flat"
        raise ValueError(
            f"{where}: {path} found no plateau ({PLATEAU_KEY} is null: {warn}); give `layers: [first, last]` instead"
        )
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < num_layers:
        raise ValueError(
            f"{where}: {path}: {PLATEAU_KEY} = {start!r}, expected a layer in 0..{num_layers - 1} "
            "(c* = L leaves no decoder layer to merge)"
        )
    return start


def selection(recipe: Recipe, num_layers: int, source: str) -> PlamSelection:
    """Layers and targets of a PlaM recipe (check_plam_recipe has already validated the forms)."""
    params = recipe.parameters
    where = f"{source}: parameters"
    targets = plam_targets(params.get("targets", DEFAULT_TARGETS), f"{where}.targets")
    if "layers" in params:
        first, last = plam_layer_bounds(params["layers"], f"{where}.layers")
        if last >= num_layers:
            raise ValueError(
                f"{where}.layers: [{first}, {last}] is outside the MLLM {recipe.mllm}, whose language "
                f"model has layers 0..{num_layers - 1}"
            )
        return PlamSelection(first, last, targets, "layers")
    path = params["plateau"]
    return PlamSelection(plateau_start(path, num_layers, f"{where}.plateau"), num_layers - 1, targets, path)


def coefficient_params(params: dict, name: str, t: float) -> dict[str, Any]:
    """The plam method's parameters (alpha, weights_mllm, weights_base) for one tensor at gradient position t."""
    out = {"alpha": AUTO, "weights_mllm": AUTO, "weights_base": AUTO}
    weights = params.get("weights")
    if isinstance(weights, PairWeights):
        out["weights_mllm"] = evaluate_setting(weights.mllm, name, t)
        out["weights_base"] = evaluate_setting(weights.base, name, t)
    for key in out:
        if key in params:
            value = evaluate_setting(params[key], name, t)
            out[key] = AUTO if value is None else value
    return out


def _layouts(mllm: Checkpoint, base: Checkpoint) -> tuple[Layout, Layout]:
    # unknown names are copied from the MLLM (module "other") or unused (base): neither is an error here
    return (
        Layout.from_config(mllm.config, mllm.tensors, source=mllm.ref, unknown="other"),
        Layout.from_config(base.config, base.tensors, source=base.ref, unknown="other"),
    )


def _shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {n: m.shape for n, m in ckpt.tensors.items()}


def _check_float(pairing: LmPairing, mllm: Checkpoint, base: Checkpoint, source: str) -> list[str]:
    """Targeted tensors must be floating point; a base stored in another float dtype is mixed in float32 (note)."""
    notes = []
    for m_name, b_name in pairing.pairs:
        md, bd = mllm.tensors[m_name].dtype, base.tensors[b_name].dtype
        if md not in FLOAT_CODES or bd not in FLOAT_CODES:
            raise ValueError(
                f"{source}: PlaM target {m_name!r} is {md} in {mllm.ref} and {b_name!r} is {bd} in "
                f"{base.ref}; only floating-point tensors can be mixed"
            )
        if md != bd and not notes:
            notes.append(
                f"dtype: base {base.ref} stores {b_name} as {bd}, the MLLM as {md}; mixed in float32 and "
                f"written as the output dtype"
            )
    return notes


def _item(
    recipe: Recipe,
    name: str,
    mllm: Checkpoint,
    base: Checkpoint,
    base_name: str | None,
    layer: int | None,
    num_layers: int,
) -> PlanItem:
    """One plan item: the plam op for a targeted tensor, a verbatim copy from the MLLM for the rest."""
    meta = mllm.tensors[name]
    floating = meta.dtype in FLOAT_CODES
    dtype = (recipe.output_dtype_code or meta.dtype) if floating else meta.dtype
    common = dict(name=name, shape=meta.shape, dtype=dtype, base=None, layer=layer, num_layers=num_layers)
    if base_name is None:
        return PlanItem(**common, op=COPY, inputs=(meta,), params=())
    t = layer / (num_layers - 1) if layer is not None and num_layers > 1 else 0.0
    params = coefficient_params(recipe.parameters, name, t)
    return PlanItem(**common, op="plam", inputs=(meta, base.tensors[base_name]), params=tuple(sorted(params.items())))


def plam_items(recipe: Recipe, source: str, **_) -> tuple[PlamPlanner, list[PlanItem], int]:
    """(planner, plan items in output order, language-model layer count) for a PlaM recipe, from headers only.
    Every pairing problem is a ValueError naming both models before any tensor data is read."""
    mllm, base = open_checkpoint(recipe.mllm), open_checkpoint(recipe.base_llm)
    m_lay, b_lay = _layouts(mllm, base)
    sel = selection(recipe, m_lay.num_layers, source)
    try:
        pairing = check_lm_pairs(m_lay, b_lay, _shapes(mllm), _shapes(base), targets=sel.targets, layers=sel.layers)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    notes = list(pairing.notes) + _check_float(pairing, mllm, base, source)
    for note in notes:
        log.warning("plam: %s", note)
    paired = pairing.as_dict()
    L = m_lay.num_layers
    names = sorted(mllm.tensors, key=lambda n: (group_key(n), n))
    items = []
    for n in names:
        role = m_lay.role(n)
        layer = role.layer if role.kind == "layer" else None
        items.append(_item(recipe, n, mllm, base, paired.get(n), layer, L))
    planner = PlamPlanner({recipe.mllm: mllm, recipe.base_llm: base}, recipe.mllm, sel, pairing, tuple(notes))
    return planner, items, L


def check_plam(recipe: Recipe, source: str) -> None:
    check_method(recipe, source)
    check_plam_recipe(recipe, source)


register(Form("plam", check=check_plam, items=plam_items, methods=("plam",)))
