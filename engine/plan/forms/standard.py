"""The standard recipe form: `models:` (with an optional `base_model:` and `modules:`), every tensor of the
reference model through the recipe's method or, for MLLMs, the method of the `modules:` entry its layout module
names (`passthrough` = copy verbatim from its source model); a `tokenizer:` section or `tokenizer_source: union`
plans the output vocabulary (shardmerge.engine.plan.vocab). The form every recipe has unless another claims it.
"""

from __future__ import annotations

from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import FLOAT_CODES, Checkpoint, TensorMeta
from shardmerge.engine.io.lora import open_model
from shardmerge.engine.layout.roles import Layout, TensorRole
from shardmerge.engine.plan.forms import Form, register
from shardmerge.engine.plan.grouping import group_key, layout_of, lm_layer, regex_layers
from shardmerge.engine.plan.model import COPY, FLOAT8_CODES, PlanItem
from shardmerge.engine.plan.vocab import gather_inputs, plan_vocabulary
from shardmerge.engine.recipe.checks import (
    PASSTHROUGH,
    check_method,
    check_models_recipe,
    input_models,
    module_key,
    module_settings,
    passthrough_source,
    resolve_params,
)
from shardmerge.engine.recipe.model import ModuleRecipe, Recipe


class StandardPlanner:
    """Plans a merge of models that share one architecture: every tensor of the reference model, through the
    recipe's method or, for MLLMs, the method of the `modules:` entry its layout module names."""

    def __init__(self, recipe: Recipe, source: str):
        self.recipe = recipe
        self.source = source
        self.spec = methods.get(recipe.merge_method)
        refs = list(dict.fromkeys(recipe.model_refs + ([recipe.base_model] if recipe.base_model else [])))
        self.ckpts: dict[str, Checkpoint] = {r: open_model(r) for r in refs}
        self.reference = recipe.mllm or recipe.base_model or recipe.model_refs[0]
        self.layout = layout_of(self.ckpts[self.reference])
        for r, c in self.ckpts.items():  # every input's config must agree with its own tensors (layer count)
            if r != self.reference:
                layout_of(c)
        self.num_layers = self.layout.num_layers or regex_layers(self.layout.names)
        self.modules: dict[str, ModuleRecipe] = {module_key(k): m for k, m in recipe.modules.items()}
        self._block_counts = _block_counts(self.layout)
        self.vocab, self.vocab_names = None, frozenset()  # set by plan_vocabulary (shardmerge.engine.plan.vocab)

    def check_architectures(self) -> None:
        ref_cfg = self.ckpts[self.reference].config
        ref_arch = ref_cfg.get("architectures")
        for r, c in self.ckpts.items():
            arch = c.config.get("architectures")
            if arch and ref_arch and arch != ref_arch:
                raise ValueError(
                    f"{self.source}: model {r} has architectures {arch}, but {self.reference} has {ref_arch}; "
                    "models of different architectures cannot be merged tensor by tensor"
                )

    def inputs_for(self, name: str, spec=None) -> tuple[tuple[TensorMeta, ...], TensorMeta | None]:
        spec = spec or self.spec
        ref_meta = self.ckpts[self.reference].tensors[name]
        metas = []
        for r in input_models(self.recipe, spec) + ([self.recipe.base_model] if self.recipe.base_model else []):
            metas.append(self._same_meta(r, name, ref_meta))
        base = metas.pop() if self.recipe.base_model else None
        if spec.base_is_input:  # linear-style: a listed base is one more input, an unlisted one is unused
            base = None
        return tuple(metas), base

    def vocab_inputs(self, inputs: tuple, base: TensorMeta | None, spec) -> tuple[tuple, TensorMeta | None]:
        """A vocabulary tensor's inputs (and base) in the output vocabulary's row order (shardmerge.engine.plan.vocab)."""
        refs = input_models(self.recipe, spec) + ([self.recipe.base_model] if base is not None else [])
        g = self._gather(dict(zip(refs, list(inputs) + ([base] if base is not None else []))))
        return tuple(g[r] for r in refs[: len(inputs)]), (g[refs[-1]] if base is not None else None)

    def _gather(self, metas: dict) -> dict:
        tok = self.recipe.tokenizer
        return gather_inputs(
            self.vocab,
            list(metas),
            metas,
            self.recipe.base_model,
            tok.tokens if tok else {},
            tok.pad_to_multiple_of if tok else None,
            self.vocab.vocabs,
            self.source,
        )

    def _same_meta(self, ref: str, name: str, ref_meta: TensorMeta) -> TensorMeta:
        """`name` in model `ref`, which must match the reference model's shape and dtype."""
        m = self.ckpts[ref].tensors.get(name)
        if m is None:
            raise ValueError(f"{self.source}: model {ref} has no tensor {name!r} (present in {self.reference})")
        if self.vocab is not None and name in self.vocab_names:
            ref_meta = m  # different vocabulary sizes are aligned by the row gather
        if m.shape != ref_meta.shape:
            raise ValueError(
                f"{self.source}: tensor {name!r}: shape {list(m.shape)} in model {ref} differs from "
                f"{list(ref_meta.shape)} in {self.reference}"
            )
        if m.dtype != ref_meta.dtype:
            raise ValueError(
                f"{self.source}: tensor {name!r}: dtype {m.dtype} in model {ref} differs from "
                f"{ref_meta.dtype} in {self.reference}"
            )
        return m

    def check_tensor_sets(self) -> None:
        ref_names = set(self.ckpts[self.reference].tensors)
        for r, c in self.ckpts.items():
            extra = sorted(set(c.tensors) - ref_names)
            if extra:
                raise ValueError(
                    f"{self.source}: model {r} has tensor(s) {extra[:5]} that {self.reference} lacks; "
                    "the models do not share one architecture"
                )

    def tokenizer_kind(self) -> str | None:
        """The recipe's tokenizer source (`tokenizer.source` or `tokenizer_source`), None without either."""
        return self.recipe.tokenizer.source if self.recipe.tokenizer is not None else self.recipe.tokenizer_source

    def plan_vocabulary(self) -> None:
        """With a tokenizer setting, the output vocabulary and each input's row order (shardmerge.engine.plan.vocab); without
        one, the inputs must share a vocabulary size."""
        kind = self.tokenizer_kind()
        src = None if kind in (None, "base", "union") else self.tokenizer_ckpt(kind)
        self.vocab, self.vocab_names = plan_vocabulary(
            self.recipe, kind, self.ckpts, self.reference, src, group_key, self.source
        )

    def tokenizer_ckpt(self, ref: str) -> Checkpoint:
        return self.ckpts[ref] if ref in self.ckpts else open_model(ref)

    def check_modules_used(self) -> None:
        """A `modules:` entry whose module has no tensor in the reference model would be silently ignored."""
        present = {self.layout.role(n).module for n in self.layout.names}
        for key, name in ((module_key(k), k) for k in self.recipe.modules):
            if key not in present:
                raise ValueError(
                    f"{self.source}: modules.{name}: model {self.reference} ({self.layout.family}) "
                    f"has no {key} tensors; its modules are {', '.join(sorted(present))}"
                )

    def _t(self, role: TensorRole, layer: int | None) -> float:
        """Gradient position: LM layer / (L-1); vision blocks and projector layers across their own module."""
        if layer is not None:
            return layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0
        n = self._block_counts.get(role.kind, 0)
        return role.layer / (n - 1) if role.layer is not None and n > 1 else 0.0

    def tensor(self, name: str, num_layers: int) -> PlanItem:
        ref_meta = self.ckpts[self.reference].tensors[name]
        role = self.layout.role(name)
        layer = lm_layer(name)
        out_dtype = self.recipe.output_dtype_code or ref_meta.dtype
        common = dict(name=name, shape=ref_meta.shape, layer=layer, num_layers=num_layers)
        module = self.modules.get(role.module)
        if ref_meta.dtype in FLOAT8_CODES and (module is None or module.merge_method != PASSTHROUGH):
            raise ValueError(
                f"{self.source}: tensor {name!r} ({ref_meta.file}): dtype {ref_meta.dtype} is a quantized 8-bit "
                "float format that merge methods cannot combine (its scales live in other tensors); dequantize "
                "the models first, or copy this module verbatim with `merge_method: passthrough`"
            )
        if ref_meta.dtype not in FLOAT_CODES:
            return PlanItem(**common, dtype=ref_meta.dtype, op=COPY, inputs=(ref_meta,), base=None, params=())
        if module is not None and module.merge_method == PASSTHROUGH:
            src_ref = passthrough_source(self.recipe, module)
            src = self._same_meta(src_ref, name, ref_meta)
            if self.vocab is not None and name in self.vocab_names:  # copied in the output's vocabulary order
                src = self._gather({src_ref: src})[src_ref]
                common["shape"] = src.shape
            return PlanItem(**common, dtype=out_dtype, op=COPY, inputs=(src,), base=None, params=())
        spec = methods.get(module.merge_method) if module is not None else self.spec
        settings = module_settings(self.recipe, module) if module is not None else None
        inputs, base = self.inputs_for(name, spec)
        if self.vocab is not None and name in self.vocab_names:
            inputs, base = self.vocab_inputs(inputs, base, spec)
            common["shape"] = inputs[0].shape
        params = resolve_params(self.recipe, spec, name, self._t(role, layer), settings)
        return PlanItem(
            **common, dtype=out_dtype, op=spec.name, inputs=inputs, base=base, params=tuple(sorted(params.items()))
        )


def _block_counts(layout: Layout) -> dict[str, int]:
    """Number of vision blocks and projector layers (the span of a per-layer gradient inside those modules)."""
    seen: dict[str, set] = {}
    for n in layout.names:
        r = layout.role(n)
        if r.kind in ("vision_block", "projector_layer") and r.layer is not None:
            seen.setdefault(r.kind, set()).add(r.layer)
    return {k: max(v) + 1 for k, v in seen.items()}


def standard_items(recipe: Recipe, source: str, **_) -> tuple[StandardPlanner, list[PlanItem], int]:
    """(planner, plan items in output order, language-model layer count) of a `models:` recipe."""
    planner = StandardPlanner(recipe, source)
    planner.check_architectures()
    planner.check_tensor_sets()
    planner.check_modules_used()
    planner.plan_vocabulary()
    num_layers = planner.num_layers
    names = sorted(planner.ckpts[planner.reference].tensors, key=lambda n: (group_key(n), n))
    return planner, [planner.tensor(n, num_layers) for n in names], num_layers


def check_standard_recipe(recipe: Recipe, source: str) -> None:
    check_models_recipe(recipe, source, check_method(recipe, source))


register(
    Form(
        "standard",
        check=check_standard_recipe,
        items=standard_items,
        matches=lambda recipe: True,
        vocabulary=True,
        order=100,
    )
)
