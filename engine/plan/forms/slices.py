"""mergekit's `slices:` recipe form: output decoder layers assembled from layer ranges of the inputs.

Each output slice lists sources (`model` + `layer_range: [first, stop)`, stop exclusive) of equal length; output
layer j of a slice merges layer `first + j` of every source with the recipe's method (a one-source `passthrough`
slice is a verbatim copy). Consecutive slices stack, so a frankenmerge may have more or fewer layers than any
input; layers are renumbered from 0 and the output config's layer count (and per-layer `layer_types`) follow.

As mergekit 0.1.5 does it:
- embeddings (and other tensors before the decoder layers) merge across the first slice's sources with that
  slice's base model and parameters; the final norm, the LM head and other tensors after the layers across the
  last slice's sources;
- a gradient runs over each slice on its own: t = j / (n - 1) for the slice's j-th of n layers (t = 1 for a
  one-layer slice); tensors outside the layers use t = 0;
- parameters resolve source > slice > recipe: a source's `parameters` (every source of the slice naming that
  model), then the slice's, then the top-level ones; per-model filters match the input tensor's name, global
  ones the output tensor's;
- a slice's `base_model` replaces the recipe's for that slice; a base that is not one of the slice's sources is
  an error here (mergekit only fails when it runs).
On a multimodal model the slices address the language model's layers; the vision tower and projector are copied
from the base model (or the first slice's first source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import FLOAT_CODES, Checkpoint, TensorMeta, open_checkpoint
from shardmerge.engine.layout.roles import LAYER_COUNT_KEYS, Layout
from shardmerge.engine.methods.base import same_value
from shardmerge.engine.plan.forms import Form, form_for_method, register
from shardmerge.engine.plan.grouping import NUMBERED_BLOCK, block_root, group_key, layout_of
from shardmerge.engine.plan.model import COPY, FLOAT8_CODES, PlanItem
from shardmerge.engine.recipe.checks import check_settings, evaluate_setting
from shardmerge.engine.recipe.model import OutputSlice, Recipe

PASSTHROUGH = "passthrough"


def _spec(recipe: Recipe):
    """The recipe's method spec; None for `passthrough` when no such method is registered (slices copy)."""
    try:
        return methods.get(recipe.merge_method)
    except ValueError:
        if recipe.merge_method == PASSTHROUGH:
            return None
        raise


def _is_passthrough(recipe: Recipe, spec) -> bool:
    return spec is None or spec.name == PASSTHROUGH


def slice_base(recipe: Recipe, sl: OutputSlice) -> str | None:
    return sl.base_model or recipe.base_model


def _slice_inputs(recipe: Recipe, spec, sl: OutputSlice) -> tuple[list[int], int | None]:
    """Indices of the sources a method gets as `tensors`, and of the source that is its base (None: no base)."""
    base = slice_base(recipe, sl)
    idx = list(range(len(sl.sources)))
    if base is None or spec is None or spec.base_is_input:
        return idx, None
    at = next((i for i, s in enumerate(sl.sources) if s.model == base), None)
    if at is None:
        return idx, None
    return [i for i in idx if i != at], at


def check_slices_recipe(recipe: Recipe, source: str) -> None:
    """A `slices:` recipe: no `models:`/`modules:`, non-empty slices of sources with valid, equal-length layer
    ranges, a base inside each slice where the method needs one, the method's model count and parameters."""
    try:
        spec = _spec(recipe)
    except ValueError as exc:
        raise ValueError(f"{source}: merge_method: {exc}") from None
    for key in ("models", "modules", "mllm", "base_llm", "init_model", "calibration"):
        if getattr(recipe, key):
            raise ValueError(
                f"{source}: {key}: a recipe gives either `slices:` or `{key}:`, not both "
                "(mergekit: exactly one of models, slices or modules)"
            )
    if spec is not None and form_for_method(spec.name) is not None:
        raise ValueError(f"{source}: slices: merge_method {spec.name!r} has its own recipe form; use `models:`")
    if spec is None and recipe.parameters:
        raise ValueError(
            f"{source}: parameters: passthrough slices copy layers verbatim and take no parameters, "
            f"got {sorted(recipe.parameters)}"
        )
    for i, sl in enumerate(recipe.slices):
        _check_slice(recipe, spec, sl, f"{source}: slices[{i}]")


def _check_slice(recipe: Recipe, spec, sl: OutputSlice, where: str) -> None:
    if not sl.sources:
        raise ValueError(f"{where}.sources: at least one source is required")
    lengths = []
    for j, src in enumerate(sl.sources):
        first, stop = src.layer_range
        if not 0 <= first < stop:
            raise ValueError(
                f"{where}.sources[{j}].layer_range: expected [first, stop) with 0 <= first < stop "
                f"(stop exclusive), got {list(src.layer_range)}"
            )
        lengths.append(stop - first)
    if len(set(lengths)) > 1:
        raise ValueError(
            f"{where}.sources: every source of a slice must span the same number of layers, got "
            f"{lengths} (layer_range {[list(s.layer_range) for s in sl.sources]})"
        )
    if _is_passthrough(recipe, spec):
        if len(sl.sources) != 1:
            raise ValueError(
                f"{where}.sources: merge_method passthrough takes exactly one source per slice, got "
                f"{len(sl.sources)}; use a merging method to combine several"
            )
        if spec is None and (sl.parameters or sl.sources[0].parameters):
            raise ValueError(f"{where}: passthrough slices copy layers verbatim and take no parameters")
        if spec is None:
            return
    inputs, base_at = _slice_inputs(recipe, spec, sl)
    base = slice_base(recipe, sl)
    if spec.needs_base and (base is None or base_at is None):
        raise ValueError(
            f"{where}.base_model: merge_method {spec.name!r} needs a base model among the slice's "
            f"sources; got base {base!r} and sources {[s.model for s in sl.sources]} (add the base "
            "as a source with the same layer_range, or set the slice's base_model to one of them)"
        )
    n = len(inputs)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = f"{spec.min_models}" + (f"..{spec.max_models}" if spec.max_models != spec.min_models else "")
        raise ValueError(f"{where}.sources: merge_method {spec.name!r} takes {want} input model(s), got {n}")
    check_settings(spec, recipe.parameters, f"{where[: where.index(':')]}: parameters", False, n)
    check_settings(spec, sl.parameters, f"{where}.parameters", False, n)
    for j, src in enumerate(sl.sources):
        check_settings(spec, src.parameters, f"{where}.sources[{j}].parameters", False, n)
    for p in spec.params:
        if p.required and not p.per_model and p.name not in sl.parameters and p.name not in recipe.parameters:
            raise ValueError(f"{where}.parameters.{p.name}: required by merge_method {spec.name!r}")


def _first(scopes, key: str, name: str, t: float) -> Any:
    for scope in scopes:
        if key in scope:
            val = evaluate_setting(scope[key], name, t)
            if val is not None:
                return val
    return None


def resolve_slice_params(
    recipe: Recipe, spec, sl: OutputSlice, out_name: str, in_names: list[str], inputs: list[int], t: float
) -> dict[str, Any]:
    """mergekit's precedence for one tensor: source > slice > top-level; per-model values aligned with
    `inputs` (source indices), filtered on each input's tensor name; global values on the output name."""
    out: dict[str, Any] = {}
    shared = (sl.parameters, recipe.parameters)
    for p in spec.params:
        if p.per_model:
            vals = []
            for i in inputs:
                own = [s.parameters for s in sl.sources if s.model == sl.sources[i].model]
                val = _first((*own, *shared), p.name, in_names[i], t)
                val = p.default if val is None else val
                if val is None:
                    raise ValueError(
                        f"parameter {p.name!r} for model {sl.sources[i].model} is required by "
                        f"merge_method {spec.name!r} (tensor {in_names[i]}); set it under the "
                        "slice's sources[].parameters, the slice's parameters or parameters"
                    )
                vals.append(val)
            out[p.name] = tuple(vals)
        else:
            val = _first(shared, p.name, out_name, t)
            out[p.name] = p.default if val is None else val
    return out


@dataclass
class SlicePlanner:
    """What the plan builder (shardmerge.engine.plan.build) reads from a planner, plus the output config's changes."""

    ckpts: dict[str, Checkpoint]
    reference: str
    config_updates: tuple = ()
    notes: tuple = ()
    artifacts: tuple = ()
    layouts: dict[str, Layout] = field(default_factory=dict)


def _layer_parts(layout: Layout, name: str) -> tuple[str, int, str] | None:
    """(block root, layer, sub) of a language-model decoder-layer tensor, None for every other tensor."""
    role = layout.role(name)
    if role.kind == "layer":
        return block_root(name, role), role.layer, role.sub
    if role.module == "other":
        m = NUMBERED_BLOCK.match(name)
        if m and m.group(2) == "layers" and "visual" not in m.group(1):
            return f"{m.group(1)}.layers", int(m.group(3)), name[m.end() :]
    return None


def _layers_of(layout: Layout) -> tuple[dict[int, dict[str, str]], str | None]:
    """layer -> {sub: tensor name} of a model's decoder layers, and their block root."""
    out: dict[int, dict[str, str]] = {}
    root = None
    for n in layout.names:
        parts = _layer_parts(layout, n)
        if parts is not None:
            root = root or parts[0]
            out.setdefault(parts[1], {})[parts[2]] = n
    return out, root


def _layer_count_key(config: dict) -> tuple[str, ...]:
    """Where a config states the language model's layer count: text_config's for an MLLM, else the top level
    (`num_hidden_layers`, GPT-2's `n_layer`)."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get("text_config"), dict) and key in config["text_config"]:
            return ("text_config", key)
        if key in config:
            return (key,)
    raise ValueError("config.json states no layer count (num_hidden_layers / n_layer); a slices merge must set it")


class _SliceBuilder:
    def __init__(self, recipe: Recipe, source: str):
        self.recipe, self.source, self.spec = recipe, source, _spec(recipe)
        refs = list(dict.fromkeys(recipe.model_refs + ([recipe.base_model] if recipe.base_model else [])))
        self.ckpts = {r: open_checkpoint(r) for r in refs}
        self.reference = recipe.base_model or recipe.slices[0].sources[0].model
        self.layouts = {r: layout_of(c) for r, c in self.ckpts.items()}
        self.layers = {r: _layers_of(lay) for r, lay in self.layouts.items()}
        self.total = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in recipe.slices)
        self.items: list[PlanItem] = []
        arch = self.ckpts[self.reference].config.get("architectures")
        for r, c in self.ckpts.items():
            if arch and c.config.get("architectures") and c.config.get("architectures") != arch:
                raise ValueError(
                    f"{source}: model {r} has architectures {c.config.get('architectures')}, but "
                    f"{self.reference} has {arch}; slices combine layers of one architecture"
                )

    def meta(self, ref: str, name: str, like: TensorMeta | None, where: str) -> TensorMeta:
        m = self.ckpts[ref].tensors.get(name)
        if m is None:
            raise ValueError(f"{self.source}: {where}: model {ref} has no tensor {name!r}")
        if like is not None and (m.shape != like.shape or m.dtype != like.dtype):
            raise ValueError(
                f"{self.source}: {where}: tensor {name!r} of model {ref} is {m.dtype} "
                f"{list(m.shape)}, but {like.name!r} is {like.dtype} {list(like.shape)}"
            )
        return m

    def item(
        self, out_name: str, metas: list[TensorMeta], sl: OutputSlice | None, layer: int | None, t: float, where: str
    ) -> PlanItem:
        """One planned output tensor from the slice's sources (`metas` in source order; `sl` None = copy)."""
        first = metas[0]
        common = dict(name=out_name, shape=first.shape, layer=layer, num_layers=self.total)
        out_dtype = self.recipe.output_dtype_code or first.dtype
        if first.dtype not in FLOAT_CODES:
            return PlanItem(**common, dtype=first.dtype, op=COPY, inputs=(first,), base=None, params=())
        copy = sl is None or self.spec is None
        if first.dtype in FLOAT8_CODES and not (copy or _is_passthrough(self.recipe, self.spec)):
            raise ValueError(
                f"{self.source}: {where}: tensor {first.name!r} ({first.file}) is {first.dtype}, a "
                "quantized 8-bit float format that merge methods cannot combine; dequantize first"
            )
        if copy:
            return PlanItem(**common, dtype=out_dtype, op=COPY, inputs=(first,), base=None, params=())
        inputs, base_at = _slice_inputs(self.recipe, self.spec, sl)
        params = resolve_slice_params(self.recipe, self.spec, sl, out_name, [m.name for m in metas], inputs, t)
        if _is_passthrough(self.recipe, self.spec) and all(  # no `scale` etc. given: a verbatim copy
            all(same_value(v, p.default) for v in (params[p.name] if p.per_model else (params[p.name],)))
            for p in self.spec.params
        ):
            return PlanItem(**common, dtype=out_dtype, op=COPY, inputs=(first,), base=None, params=())
        return PlanItem(
            **common,
            dtype=out_dtype,
            op=self.spec.name,
            inputs=tuple(metas[i] for i in inputs),
            base=metas[base_at] if base_at is not None else None,
            params=tuple(sorted(params.items())),
        )

    def plan_layers(self) -> list[str | None]:
        """Every output decoder layer's tensors; returns each output layer's (first source's) layer type."""
        out_layer, types = 0, []
        root = self.layers[self.reference][1]
        for k, sl in enumerate(self.recipe.slices):
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for j in range(n):
                t = j / (n - 1) if n > 1 else 1.0
                subs = [self._source_layer(k, i, s.model, s.layer_range[0] + j) for i, s in enumerate(sl.sources)]
                for i in range(1, len(subs)):
                    if set(subs[i]) != set(subs[0]):
                        raise ValueError(
                            f"{self.source}: slices[{k}].sources[{i}]: layer {sl.sources[i].layer_range[0] + j} of "
                            f"model {sl.sources[i].model} and layer {sl.sources[0].layer_range[0] + j} of "
                            f"{sl.sources[0].model} differ in tensors {sorted(set(subs[i]) ^ set(subs[0]))[:8]}; "
                            "every tensor of a layer must be present in every source"
                        )
                for sub in sorted(subs[0]):
                    where = f"slices[{k}] layer {out_layer}"
                    metas = [self.meta(sl.sources[0].model, subs[0][sub], None, where)]
                    metas += [
                        self.meta(s.model, subs[i][sub], metas[0], where) for i, s in enumerate(sl.sources) if i > 0
                    ]
                    self.items.append(
                        self.item(f"{root or 'model.layers'}.{out_layer}.{sub}", metas, sl, out_layer, t, where)
                    )
                lt = self.ckpts[sl.sources[0].model].config
                lt = (lt.get("text_config") or lt).get("layer_types")
                types.append(lt[sl.sources[0].layer_range[0] + j] if isinstance(lt, list) else None)
                out_layer += 1
        return types

    def _source_layer(self, k: int, i: int, ref: str, layer: int) -> dict[str, str]:
        by_layer = self.layers[ref][0]
        where = f"{self.source}: slices[{k}].sources[{i}]"
        if layer not in by_layer:
            raise ValueError(
                f"{where}.layer_range: model {ref} has decoder layers 0..{len(by_layer) - 1}, the "
                f"range asks for layer {layer} (layer_range is [first, stop), stop exclusive)"
            )
        subs = by_layer[layer]
        return subs

    def plan_rest(self) -> None:
        """Tensors outside the decoder layers: embeddings etc. over the first slice, norm/head over the last; an
        MLLM's vision tower and projector copied from the reference model."""
        ref_lay = self.layouts[self.reference]
        rest = [n for n in ref_lay.names if _layer_parts(ref_lay, n) is None]
        for r, lay in self.layouts.items():
            extra = sorted({n for n in lay.names if _layer_parts(lay, n) is None} - set(rest))
            if extra:
                raise ValueError(
                    f"{self.source}: model {r} has tensor(s) {extra[:5]} outside its decoder layers "
                    f"that {self.reference} lacks; the models do not share one architecture"
                )
        for n in rest:
            role = ref_lay.role(n)
            if ref_lay.is_mllm and role.module in ("vision_tower", "projector"):
                self.items.append(self.item(n, [self.ckpts[self.reference].tensors[n]], None, None, 0.0, n))
                continue
            sl = self.recipe.slices[0] if group_key(n)[0] == 0 else self.recipe.slices[-1]
            metas = [self.meta(sl.sources[0].model, n, None, n)]
            metas += [self.meta(s.model, n, metas[0], n) for s in sl.sources[1:]]
            self.items.append(self.item(n, metas, sl, None, 0.0, n))

    def config_updates(self, types: list[str | None]) -> tuple:
        cfg = self.ckpts[self.reference].config
        try:
            key = _layer_count_key(cfg)
        except ValueError as exc:
            raise ValueError(f"{self.source}: model {self.reference}: {exc}") from None
        updates = [(".".join(key), self.total)]
        if all(t is not None for t in types) and types:
            updates.append((".".join(key[:-1] + ("layer_types",)), list(types)))
        return tuple(updates)


def slice_items(recipe: Recipe, source: str, **_) -> tuple[SlicePlanner, list[PlanItem], int]:
    """(planner, plan items in output order, output layer count) of a `slices:` recipe, from headers only."""
    b = _SliceBuilder(recipe, source)
    types = b.plan_layers()
    b.plan_rest()
    items = sorted(b.items, key=lambda it: (group_key(it.name), it.name))
    planner = SlicePlanner(b.ckpts, b.reference, b.config_updates(types), layouts=b.layouts)
    return planner, items, b.total


register(
    Form("slices", check=check_slices_recipe, items=slice_items, matches=lambda recipe: bool(recipe.slices), order=0)
)
