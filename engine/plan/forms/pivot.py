"""PivotMerge planning: the `pivot` recipe form, from headers (plus one streamed identity check of the backbones).

A PivotMerge recipe merges the cross-modal projectors of K expert MLLMs that share the vision encoder and the
language model (docs/pivotmerge.md, docs/pivot_recipe.md):

    merge_method: pivot
    models: [expert_a, expert_b, expert_c]
    parameters: {pivot: mean, energy: 0.9, density: 0.2, temperature: 1.0, scale: 1.0, contribution: data_free}

Every floating-point tensor of layout module "projector" becomes one `pivot` op over the K experts (whole tensor,
shardmerge.engine.methods.pivot), with the pivot model's tensor as `base` for `pivot: init` (+ `init_model:`) and
`pivot: model:<name>`. Every other tensor is copied verbatim from the *backbone source*: the pivot model (the
init model, or the named expert) or, with `pivot: mean`, the first expert. Those tensors must be bit-identical
across the experts (and the init model): `check_identical_backbones` compares them chunk by chunk before anything
is written, never holding more than one chunk per model; `allow_different_backbones: true` skips the check and
takes them from the backbone source (a plan note says so).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import FLOAT_CODES, Checkpoint, TensorMeta, open_checkpoint, read_rows
from shardmerge.engine.layout.roles import Layout
from shardmerge.engine.methods.pivot import PivotParams
from shardmerge.engine.plan.forms import Form, register
from shardmerge.engine.plan.forms.pivot_calibration import ARTIFACT, Calibration, fingerprint, run_calibration
from shardmerge.engine.plan.grouping import group_key, layout_of
from shardmerge.engine.plan.model import COPY, PlanItem
from shardmerge.engine.recipe.checks import check_method, check_models_recipe, resolve_params
from shardmerge.engine.recipe.model import Recipe

log = logging.getLogger("shardmerge.pivot")

COMPARE_BYTES = 16 << 20  # rows compared per read in the backbone check (per model)
MIN_INIT_COSINE = 0.2  # experts' projector weights less similar than this (cosine) do not share an initialisation


@dataclass
class PivotPlanner:
    """What the plan builder (shardmerge.engine.plan.build) needs: the opened checkpoints, the reference (the backbone source, whose config
    and tokenizer/processor files the output gets) and notes that are not errors."""

    ckpts: dict[str, Checkpoint]
    reference: str
    experts: tuple[str, ...]
    pivot_ref: str | None  # the pivot model (init_model or the named expert); None for pivot: mean
    notes: tuple[str, ...] = ()
    artifacts: tuple[tuple[str, str], ...] = ()  # (pivot_calibration.json, its text) with a calibration set


def _match_model(name: str, refs: list[str], where: str) -> str:
    """The model a `pivot: model:<name>` names: its ref as written, its resolved path, or its directory name."""
    exact = [r for r in refs if r == name or (Path(name).exists() and Path(r).resolve() == Path(name).resolve())]
    by_dir = [r for r in refs if Path(r).name == name]
    found = exact or by_dir
    if len(set(found)) != 1:
        what = "matches several models" if found else "is not one of the models"
        raise ValueError(
            f"{where}: pivot 'model:{name}' {what}; expected one of {', '.join(refs)} (or its directory name)"
        )
    return found[0]


def pivot_source(recipe: Recipe, source: str) -> tuple[str, str | None]:
    """(pivot mode, pivot model ref or None) of a pivot recipe; the recipe-form errors before anything is opened."""
    where = f"{source}: parameters.pivot"
    mode = recipe.parameters.get("pivot", "mean")
    if not isinstance(mode, str):
        raise ValueError(
            f"{where}: expected 'mean', 'init' or 'model:<name>' (one value for every tensor), got {mode!r}"
        )
    for key in ("base_model", "modules", "mllm", "base_llm"):
        if getattr(recipe, key):
            raise ValueError(
                f"{source}: {key}: not used by merge_method pivot (it merges the experts' projectors "
                "around `parameters.pivot` and copies the shared backbone); remove it"
            )
    if len(recipe.models) < 2:
        raise ValueError(f"{source}: models: merge_method pivot needs at least 2 experts, got {len(recipe.models)}")
    refs = recipe.model_refs
    if len(set(refs)) != len(refs):
        twice = next(r for r in refs if refs.count(r) > 1)
        raise ValueError(f"{source}: models: {twice} is listed more than once; each expert once")
    if mode == "init":
        if not recipe.init_model:
            raise ValueError(f"{where}: 'init' needs `init_model:` (the experts' shared initialisation)")
        return mode, recipe.init_model
    if recipe.init_model:
        raise ValueError(
            f"{source}: init_model: only used with `pivot: init`, but pivot is {mode!r}; remove it or set pivot: init"
        )
    if mode.startswith("model:") and len(mode) > 6:
        return mode, _match_model(mode[6:], recipe.model_refs, where)
    if mode != "mean":
        raise ValueError(f"{where}: expected 'mean', 'init' or 'model:<name>', got {mode!r}")
    return mode, None


def _check_same_tensors(ckpts: dict[str, Checkpoint], reference: str, source: str) -> None:
    """Same architecture, tensor names, shapes and dtypes in every model (headers only)."""
    ref = ckpts[reference]
    for r, c in ckpts.items():
        arch, ref_arch = c.config.get("architectures"), ref.config.get("architectures")
        if arch and ref_arch and arch != ref_arch:
            raise ValueError(
                f"{source}: model {r} has architectures {arch}, but {reference} has {ref_arch}; "
                "PivotMerge experts share one architecture"
            )
        missing = sorted(set(ref.tensors) - set(c.tensors))
        extra = sorted(set(c.tensors) - set(ref.tensors))
        if missing or extra:
            raise ValueError(
                f"{source}: model {r} lacks tensor(s) {missing[:5]} / has extra tensor(s) {extra[:5]} "
                f"compared with {reference}; PivotMerge experts share one architecture"
            )
        for name, m in c.tensors.items():
            want = ref.tensors[name]
            if (m.shape, m.dtype) != (want.shape, want.dtype):
                raise ValueError(
                    f"{source}: tensor {name!r}: {m.dtype} {list(m.shape)} in model {r} but "
                    f"{want.dtype} {list(want.shape)} in {reference}"
                )


def _first_difference(a: TensorMeta, b: TensorMeta) -> int | None:
    """Flat index of the first element whose bytes differ between two same-shape tensors, None when identical;
    read in row chunks of about COMPARE_BYTES so no whole tensor is held."""
    step = max(1, COMPARE_BYTES // max(1, a.row_numel * a.itemsize))
    for start in range(0, a.rows, step):
        stop = min(a.rows, start + step)
        x = read_rows(a, start, stop).reshape(-1).view(torch.uint8)
        y = read_rows(b, start, stop).reshape(-1).view(torch.uint8)
        if not torch.equal(x, y):
            byte = int((x != y).nonzero()[0])
            return start * a.row_numel + byte // a.itemsize
    return None


def check_identical_backbones(ckpts: dict[str, Checkpoint], refs: list[str], names: list[str], source: str) -> None:
    """Every tensor in `names` bit-identical in every model of `refs` (compared with refs[0], chunk by chunk);
    ValueError naming the tensor, both models, the first differing element and both values otherwise."""
    first = ckpts[refs[0]]
    for name in names:
        a = first.tensors[name]
        for r in refs[1:]:
            b = ckpts[r].tensors[name]
            if (Path(a.file).resolve(), a.begin) == (Path(b.file).resolve(), b.begin):
                continue  # the same bytes on disk
            at = _first_difference(a, b)
            if at is not None:
                row = at // a.row_numel if a.shape else 0
                va = read_rows(a, row, row + 1).reshape(-1)[at - row * a.row_numel].item()
                vb = read_rows(b, row, row + 1).reshape(-1)[at - row * a.row_numel].item()
                raise ValueError(
                    f"{source}: tensor {name!r} differs between model {refs[0]} ({a.file}) and model {r} "
                    f"({b.file}): first at element {at}, {va!r} vs {vb!r}; PivotMerge merges only the projector "
                    "and expects the vision encoder and language model identical across experts. Set "
                    "`allow_different_backbones: true` to take them from the pivot model instead"
                )


def projector_cosines(ckpts: dict[str, Checkpoint], refs: list[str], name: str) -> torch.Tensor:
    """(K, K) cosine similarities of the experts' flattened tensor `name`, accumulated in float64 over row chunks
    of about COMPARE_BYTES per model (never a whole tensor per model)."""
    metas = [ckpts[r].tensors[name] for r in refs]
    step = max(1, COMPARE_BYTES // max(1, metas[0].row_numel * metas[0].itemsize))
    gram = torch.zeros(len(refs), len(refs), dtype=torch.float64)
    for start in range(0, metas[0].rows, step):
        stop = min(metas[0].rows, start + step)
        rows = torch.stack([read_rows(m, start, stop).reshape(-1).double() for m in metas])
        gram += rows @ rows.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    return gram / norms[:, None] / norms[None, :]


def check_shared_init(ckpts: dict[str, Checkpoint], experts: list[str], names: list[str], source: str) -> None:
    """Weight-space merging of projectors needs a shared initialisation (independently initialised MLPs are
    permuted versions of each other and averaging them is meaningless without re-basin alignment). Without an
    `init_model` the evidence is the experts' own weights: fine-tuned from one init, their 2-D projector weights
    stay close (cosine near 1); independently initialised they are near-orthogonal (cosine ~ 1/sqrt(numel)).
    ValueError with the lowest cosine, the tensor and the two experts when it is below MIN_INIT_COSINE."""
    for name in names:
        cos = projector_cosines(ckpts, experts, name)
        low = int(cos.argmin())
        i, j = divmod(low, len(experts))
        if float(cos[i, j]) < MIN_INIT_COSINE:
            raise ValueError(
                f"{source}: projector tensor {name!r}: experts {experts[i]} and {experts[j]} have weight cosine "
                f"{float(cos[i, j]):.3f} (< {MIN_INIT_COSINE}); their projectors do not look trained from one "
                "initialisation, or moved so far from it that their weights no longer align. Merging such "
                "projectors in weight space keeps little of either (independently initialised ones are meaningless "
                "to average without re-basin alignment). Fix: `pivot: init` with `init_model:` the shared initialisation, or "
                "set `allow_unaligned: true` to merge anyway"
            )


def _bias_inputs(ckpts, experts: list[str], pivot_ref: str | None, name: str, projector: set) -> tuple:
    """A projector bias follows its layer weight's lambda: the weight's K expert inputs (+ its pivot for `init` /
    `model:<name>`) trail the K bias inputs (shardmerge.engine.methods.pivot.split_layer_weight); () for any other tensor."""
    ref = ckpts[experts[0]].tensors
    weight = name[: -len("bias")] + "weight" if name.endswith(".bias") else None
    if weight not in projector or len(ref[weight].shape) != 2 or tuple(ref[name].shape) != (ref[weight].shape[0],):
        return ()
    return tuple(ckpts[r].tensors[weight] for r in experts) + ((ckpts[pivot_ref].tensors[weight],) if pivot_ref else ())


def _params(recipe: Recipe, spec, name: str, t: float, source: str, calibration: Calibration | None = None) -> dict:
    """The pivot op's parameters for one projector tensor, validated now (before any tensor data is read); with a
    calibration, its alignment gains for the tensor's projector layer become the per-model `gain`."""
    params = resolve_params(recipe, spec, name, t)
    gains = params.get("gain", ())
    if calibration is not None:
        if any(not math.isnan(float(g)) for g in gains):
            raise ValueError(
                f"{source}: tensor {name!r}: per-model gain given and a calibration set; the gains come "
                "from one or the other, remove one"
            )
        if params.get("contribution") != "data":
            raise ValueError(
                f"{source}: calibration: given, but contribution is {params.get('contribution')!r} for "
                f"tensor {name!r}; set contribution: data to use the calibration gains, or remove "
                "calibration"
            )
        try:
            gains = params["gain"] = tuple(calibration.gains_for(name))
        except KeyError:
            raise ValueError(
                f"{source}: calibration has no gains for projector tensor {name!r} (it covers "
                f"{sorted(calibration.layers)}); was it computed for these experts?"
            ) from None
    p = PivotParams(**{k: v for k, v in params.items() if k not in ("gain", "weight_inputs")})
    try:
        p.validate(f"tensor {name!r}")
    except ValueError as exc:
        raise ValueError(f"{source}: parameters: {exc}") from None
    given = [not math.isnan(float(g)) for g in gains]
    if p.contribution == "data" and not all(given):
        raise ValueError(
            f"{source}: contribution: data needs `calibration:` (a Parquet file of image-caption pairs) "
            f"or a per-model `gain` (precomputed alignment gain) for every expert; tensor {name!r} has "
            f"{list(gains)} (NaN = not given)"
        )
    if p.contribution != "data" and any(given):
        raise ValueError(
            f"{source}: per-model gain given but contribution is {p.contribution!r}; set "
            "contribution: data to use the gains"
        )
    return params


def _projector_counts(layout: Layout) -> int:
    layers = {layout.role(n).layer for n in layout.names if layout.role(n).kind == "projector_layer"}
    layers.discard(None)
    return max(layers) + 1 if layers else 0


def pivot_items(
    recipe: Recipe, source: str, *, state: Path | None = None, address: str | None = None
) -> tuple[PivotPlanner, list[PlanItem], int]:
    """(planner, plan items in output order, language-model layer count) for a PivotMerge recipe; `state`: the
    state dir of an output being resumed (a calibration saved there is reused when it matches); `address`: the Ray
    cluster the merge runs on (a calibration may run there, shardmerge.engine.plan.forms.pivot_calibration.run_calibration)."""
    mode, pivot_ref = pivot_source(recipe, source)
    experts = list(dict.fromkeys(recipe.model_refs))
    refs = experts + ([pivot_ref] if pivot_ref and pivot_ref not in experts else [])
    ckpts = {r: open_checkpoint(r) for r in refs}
    reference = pivot_ref or experts[0]
    _check_same_tensors(ckpts, reference, source)
    layout = layout_of(ckpts[reference])
    names = sorted(ckpts[reference].tensors, key=lambda n: (group_key(n), n))
    projector = [
        n for n in names if layout.role(n).module == "projector" and ckpts[reference].tensors[n].dtype in FLOAT_CODES
    ]
    if not projector:
        raise ValueError(
            f"{source}: model {reference} ({layout.family}) has no floating-point projector tensors; "
            "PivotMerge merges the cross-modal projectors of MLLMs"
        )
    shared = [n for n in names if n not in set(projector)]
    notes = []
    if recipe.allow_different_backbones:
        notes.append(
            f"allow_different_backbones: the {len(shared)} non-projector tensors were not compared across "
            f"the experts; they are copied from {reference}"
        )
    else:
        check_identical_backbones(ckpts, [reference] + [r for r in refs if r != reference], shared, source)
    two_d = [n for n in projector if len(ckpts[reference].tensors[n].shape) == 2]
    if mode != "init" and recipe.allow_unaligned:
        notes.append("allow_unaligned: the experts' projectors were not checked for a shared initialisation")
    elif mode != "init":
        check_shared_init(ckpts, experts, two_d, source)
    if mode == "mean" and len(experts) == 2:
        notes.append(
            "2 experts with pivot: mean: Delta_2 = -Delta_1, every shared coordinate ties and the residuals "
            "cancel, so the merge is the plain mean of the two; use pivot: init (init_model:) or "
            "model:<name> for a different result"
        )
    calib = _calibration(recipe, ckpts, experts, (mode, pivot_ref), projector, reference, source, state, address)
    if calib is not None:
        notes.extend(calib.notes)
    spec = methods.get("pivot")
    n_proj, L = _projector_counts(layout), layout.num_layers
    items, proj = [], set(projector)
    for n in names:
        meta = ckpts[reference].tensors[n]
        dtype = (recipe.output_dtype_code or meta.dtype) if meta.dtype in FLOAT_CODES else meta.dtype
        common = dict(name=n, shape=meta.shape, dtype=dtype, layer=None, num_layers=L)
        if n not in proj:
            items.append(PlanItem(**common, op=COPY, inputs=(meta,), base=None, params=()))
            continue
        role = layout.role(n)
        t = role.layer / (n_proj - 1) if role.layer is not None and n_proj > 1 else 0.0
        params = _params(recipe, spec, n, t, source, calib)
        trailing = _bias_inputs(ckpts, experts, pivot_ref, n, proj)
        if trailing:
            params["weight_inputs"] = len(trailing)
        items.append(
            PlanItem(
                **common,
                op=spec.name,
                inputs=tuple(ckpts[r].tensors[n] for r in experts) + trailing,
                base=ckpts[pivot_ref].tensors[n] if pivot_ref else None,
                params=tuple(sorted(params.items())),
            )
        )
    for note in notes:
        log.warning("pivot: %s", note)
    artifacts = ((ARTIFACT, calib.to_json()),) if calib is not None else ()
    return PivotPlanner(ckpts, reference, tuple(experts), pivot_ref, tuple(notes), artifacts), items, L


def _calibration(
    recipe: Recipe,
    ckpts: dict[str, Checkpoint],
    experts: list[str],
    pivot: tuple,
    projector: list[str],
    reference: str,
    source: str,
    state: Path | None,
    address: str | None = None,
) -> Calibration | None:
    """The alignment gains of `calibration:`: read from a pivot_calibration.json, reused from the resumed output's
    state dir when its fingerprint matches (a re-run could differ in the last bits and change the plan), or computed
    (shardmerge.engine.plan.forms.pivot_calibration.calibrate)."""
    cal = recipe.calibration
    if cal is None:
        return None
    mode, pivot_ref = pivot
    if not Path(cal.path).is_file():
        raise ValueError(
            f"{source}: calibration: {cal.path} is not a file (expected a Parquet file of image-caption "
            "pairs or a pivot_calibration.json)"
        )
    if cal.path.endswith(".json"):
        found = Calibration.from_json(Path(cal.path).read_text(), cal.path)
        names = [Path(e).name for e in experts]
        if [Path(e).name for e in found.experts] != names:
            raise ValueError(
                f"{source}: calibration: {cal.path} was computed for experts "
                f"{[Path(e).name for e in found.experts]}, this recipe merges {names}"
            )
        return found
    fp = fingerprint(cal, experts, mode, ckpts)
    cached = Path(state) / ARTIFACT if state is not None else None
    if cached is not None and cached.is_file():
        found = Calibration.from_json(cached.read_text(), str(cached))
        if found.fingerprint == fp:
            log.info("pivot: calibration reused from the interrupted run (%d pairs)", found.pairs)
            return found
    log.info("pivot: calibrating on %s (up to %d pairs)", cal.path, cal.max_pairs)
    return run_calibration(cal, str(ckpts[reference].root), ckpts, experts, pivot_ref, projector, fp, address=address)


def check_pivot(recipe: Recipe, source: str) -> None:
    """The `models:` form's checks; `calibration:` (contribution: data) is read by this form only."""
    check_models_recipe(recipe, source, check_method(recipe, source, calibration=True))


register(Form("pivot", check=check_pivot, items=pivot_items, methods=("pivot",)))
