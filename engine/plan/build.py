"""Recipe + checkpoints → frozen Plan: every output tensor with its inputs, work units, shard layout, plan hash.

The plan fixes the output bytes' layout completely (shard files, headers, every tensor's absolute offset), so workers
can write their tensors into the shard files independently and the output is identical for any worker count,
chunk size or placement. Architecture, tensor-set, shape and dtype mismatches are planning errors naming the model
and tensor; nothing is skipped silently.

Tensor roles come from shardmerge.engine.layout.roles: work units are one per LM decoder layer / vision block (plus embeddings,
head, vision stem, projector), and a recipe's `modules:` entry applies to the tensors of the layout module it names
(`passthrough` = copy verbatim from its source model). PlaM recipes are planned by shardmerge.engine.plan.forms.plam, PivotMerge
recipes (`merge_method: pivot`) by shardmerge.engine.plan.forms.pivot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shardmerge
from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import (
    DTYPES,
    FLOAT_CODES,
    Checkpoint,
    TensorMeta,
    check_confined,
    files_identity,
    open_checkpoint,
)
from shardmerge.engine.io.gather import gather_identity
from shardmerge.engine.io.lora import open_model
from shardmerge.engine.io.writer import COPIED_FILES
from shardmerge.engine.layout.roles import Layout, TensorRole, classify
from shardmerge.engine.recipe.checks import (
    PASSTHROUGH,
    input_models,
    module_key,
    module_settings,
    passthrough_source,
    resolve_params,
)
from shardmerge.engine.recipe.schema import ModuleRecipe, Recipe

log = logging.getLogger("shardmerge.plan")

COPY = "copy"  # op for tensors taken verbatim from one input
FLOAT8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})  # quantized weights: their scales live in other tensors
_NUMBERED = re.compile(r"^(.*?)\.(layers|blocks|h)\.(\d+)\.")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    op: str  # COPY or a registered method name
    inputs: tuple[TensorMeta, ...]  # method inputs in order (COPY: the one source)
    base: TensorMeta | None
    params: tuple[tuple[str, Any], ...]
    layer: int | None
    num_layers: int
    shard: int
    offset: int  # absolute byte offset of the data in the shard file

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n

    @property
    def in_bytes(self) -> int:
        return sum(m.nbytes for m in self.inputs) + (self.base.nbytes if self.base else 0)


@dataclass(frozen=True)
class WorkUnit:
    id: int
    key: str  # human-readable group, e.g. "model.layers.3" or "embed"
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def shards(self) -> frozenset[int]:
        return frozenset(t.shard for t in self.tensors)


@dataclass(frozen=True)
class ShardSpec:
    index: int
    filename: str
    header: bytes  # 8-byte length prefix + JSON header, padded
    size: int  # total file size
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    units: tuple[WorkUnit, ...]
    shards: tuple[ShardSpec, ...]
    config_source: str  # model dir whose config.json is copied
    tokenizer_source: str  # model dir whose tokenizer/processor files are copied
    out_dtype: str | None
    plan_hash: str
    inputs: tuple[str, ...] = field(default=())  # model dirs read
    notes: tuple[str, ...] = field(default=())  # findings that are not errors (e.g. PlaM vocabulary differences)
    # (file name, text) written into the output dir beside the reports and into the state dir at the start of a
    # run, so --resume can reuse them (e.g. PivotMerge's calibration gains, shardmerge.engine.plan.forms.pivot_calibration)
    artifacts: tuple[tuple[str, str], ...] = field(default=())
    # (dotted config.json key, value) set in the output's config.json: the vocabulary size of a built tokenizer,
    # a slices merge's layer count and layer types (shardmerge.engine.plan.forms.slices)
    config_updates: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def tensors(self) -> list[OutputTensor]:
        return [t for u in self.units for t in u.tensors]


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '64KB' / bytes → bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
    }
    if unit not in mult:
        raise ValueError(f"size {text!r}: unknown unit {m.group(2)!r}")
    value = int(float(m.group(1)) * mult[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def _regex_layers(names) -> int:
    idx = [int(m.group(3)) for n in names if (m := _NUMBERED.match(n)) and m.group(2) == "layers"]
    return max(idx) + 1 if idx else 0


def layout_of(ckpt: Checkpoint) -> Layout:
    """Roles of a checkpoint's tensors (shardmerge.engine.layout.roles); names the layout does not know get module "other" and
    are grouped by the generic numbered-block rule, so LLMs of any family still plan."""
    return Layout.from_config(ckpt.config, ckpt.tensors, source=ckpt.ref, unknown="other")


def num_layers_of(ckpt: Checkpoint) -> int:
    """Language-model decoder layers: config (text_config first), cross-checked with the names by the layout."""
    return layout_of(ckpt).num_layers or _regex_layers(ckpt.tensors)


def _numbered_group(name: str) -> tuple:
    """Grouping of names without a known role: numbered blocks (`.layers.i.`, `.blocks.i.`, `.h.i.`), embeddings
    and head alone, the rest together."""
    m = _NUMBERED.match(name)
    if m:
        return (1, m.group(1) + "." + m.group(2), int(m.group(3)))
    if "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
        return (0, "embed", 0)
    if name.endswith("lm_head.weight"):
        return (3, "lm_head", 0)
    return (2, "other", 0)


def _block_root(name: str, role: TensorRole) -> str:
    """`model.language_model.layers` for `model.language_model.layers.3.mlp.up_proj.weight`."""
    return name[: len(name) - len(role.sub) - 1].rsplit(".", 1)[0]


_ROLE_GROUPS = {
    "embed": (0, "embed", 0),
    "final_norm": (2, "other", 0),
    "lm_head": (3, "lm_head", 0),
    "vision_other": (4, "vision_tower", 0),
    "projector_layer": (6, "projector", 0),
    "projector_other": (6, "projector", 0),
}


def group_key(name: str) -> tuple:
    """Work-unit grouping (and output order) by layout role: embeddings, one unit per LM decoder layer, final norm
    and unknown tensors ("other"), lm_head, the vision tower's non-block tensors, one unit per vision block, the
    projector. For plain LLMs this is the order and grouping the engine has always written."""
    role = classify(name)
    if role is None or role.module == "other":
        return _numbered_group(name)
    if role.kind in ("layer", "vision_block"):
        return (1 if role.kind == "layer" else 5, _block_root(name, role), role.layer)
    return _ROLE_GROUPS[role.kind]


def lm_layer(name: str) -> int | None:
    """The language-model decoder layer of a tensor, None for everything else (vision blocks included)."""
    role = classify(name)
    if role is None or role.module == "other":
        m = _NUMBERED.match(name)
        return int(m.group(3)) if m and m.group(2) == "layers" and "visual" not in m.group(1) else None
    return role.layer if role.kind == "layer" else None


class _Planner:
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
        self.num_layers = self.layout.num_layers or _regex_layers(self.layout.names)
        self.modules: dict[str, ModuleRecipe] = {module_key(k): m for k, m in recipe.modules.items()}
        self._block_counts = _block_counts(self.layout)
        self.vocab, self.vocab_names = None, frozenset()  # set by plan_vocabulary (shardmerge.engine.plan.vocab)

    def check_architectures(self) -> None:
        ref_cfg = self.ckpts[self.reference].config
        ref_arch = ref_cfg.get("architectures")
        for r, c in self.ckpts.items():
            arch = c.config.get("architectures")
            if self.recipe.merge_method != "plam" and arch and ref_arch and arch != ref_arch:
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
        from shardmerge.engine.plan.vocab import gather_inputs

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
        from shardmerge.engine.plan.vocab import plan_vocabulary

        kind = self.tokenizer_kind()
        src = None if kind in (None, "base", "union") else self._tokenizer_ckpt(kind)
        self.vocab, self.vocab_names = plan_vocabulary(
            self.recipe, kind, self.ckpts, self.reference, src, group_key, self.source
        )

    def _tokenizer_ckpt(self, ref: str) -> Checkpoint:
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

    def tensor(self, name: str, num_layers: int) -> dict:
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
            return dict(common, dtype=ref_meta.dtype, op=COPY, inputs=(ref_meta,), base=None, params=())
        if module is not None and module.merge_method == PASSTHROUGH:
            src_ref = passthrough_source(self.recipe, module)
            src = self._same_meta(src_ref, name, ref_meta)
            if self.vocab is not None and name in self.vocab_names:  # copied in the output's vocabulary order
                src = self._gather({src_ref: src})[src_ref]
                common["shape"] = src.shape
            return dict(common, dtype=out_dtype, op=COPY, inputs=(src,), base=None, params=())
        spec = methods.get(module.merge_method) if module is not None else self.spec
        settings = module_settings(self.recipe, module) if module is not None else None
        inputs, base = self.inputs_for(name, spec)
        if self.vocab is not None and name in self.vocab_names:
            inputs, base = self.vocab_inputs(inputs, base, spec)
            common["shape"] = inputs[0].shape
        params = resolve_params(self.recipe, spec, name, self._t(role, layer), settings)
        return dict(
            common, dtype=out_dtype, op=spec.name, inputs=inputs, base=base, params=tuple(sorted(params.items()))
        )


def _block_counts(layout: Layout) -> dict[str, int]:
    """Number of vision blocks and projector layers (the span of a per-layer gradient inside those modules)."""
    seen: dict[str, set] = {}
    for n in layout.names:
        r = layout.role(n)
        if r.kind in ("vision_block", "projector_layer") and r.layer is not None:
            seen.setdefault(r.kind, set()).add(r.layer)
    return {k: max(v) + 1 for k, v in seen.items()}


def _nbytes(it: dict) -> int:
    return DTYPES[it["dtype"]][1] * _prod(it["shape"])


def _layout_shards(groups: list[list[dict]], shard_size: int) -> list[list[dict]]:
    """Pack whole work units into shards of at most shard_size; only a unit larger than a shard is split (by
    tensor). Keeping units inside one shard lets a finished shard be published without waiting on other units."""
    shards: list[list[dict]] = [[]]
    used = 0
    for group in groups:
        size = sum(_nbytes(it) for it in group)
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        for it in group:
            if shards[-1] and used + _nbytes(it) > shard_size:
                shards.append([])
                used = 0
            shards[-1].append(it)
            used += _nbytes(it)
    return shards


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _header(items: list[dict]) -> tuple[bytes, list[int]]:
    """safetensors header bytes (length prefix + JSON padded to 8 bytes) and each tensor's absolute data offset."""
    hdr: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    rel = []
    for it in items:
        n = DTYPES[it["dtype"]][1] * _prod(it["shape"])
        hdr[it["name"]] = {"dtype": it["dtype"], "shape": list(it["shape"]), "data_offsets": [pos, pos + n]}
        rel.append(pos)
        pos += n
    body = json.dumps(hdr, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    head = len(body).to_bytes(8, "little") + body
    return head, [len(head) + r for r in rel]


# Decoder layers (or vision blocks) per work unit for recipes with batchable whole-matrix methods (SVD family),
# by device, when --svd-batch-layers is not given. CPU 1: LAPACK loops over a batch there, so batching buys
# nothing and plans stay as they were. CUDA 4 (chosen, not measured: no GPU here): a Llama layer holds three
# same-shape pairs (q/o, k/v, gate/up), so 4 layers give batches of 8 matrices (down_proj: 4), while an 80-layer
# model still has 20 layer units for 8 GPUs and a lost unit redoes at most 4 layers.
SVD_BATCH_LAYERS = {"cpu": 1, "cuda": 4}


def build_plan(
    recipe: Recipe,
    *,
    shard_size: int | str = "5GB",
    source: str = "<recipe>",
    state: Path | None = None,
    svd_batch_layers: int = 1,
    address: str | None = None,
) -> Plan:
    """Plan a merge without reading tensor data (headers only; PivotMerge with a calibration set runs the
    calibration, reusing a matching result saved in `state`, the state dir of an output being resumed, possibly as
    a task on the Ray cluster at `address`).
    `svd_batch_layers` = N puts N consecutive decoder layers (vision blocks) into one work unit where their tensors
    use a batchable whole-matrix method, so their same-shape matrices can share batched SVD calls (shardmerge.engine.run.unit);
    N = 1 is the plan as it always was."""
    if isinstance(svd_batch_layers, bool) or not isinstance(svd_batch_layers, int) or svd_batch_layers < 1:
        raise ValueError(f"{source}: --svd-batch-layers must be an integer >= 1, got {svd_batch_layers!r}")
    shard_size = parse_size(shard_size)
    if recipe.merge_method == "plam":
        from shardmerge.engine.plan.forms.plam import plam_items

        planner, items, num_layers = plam_items(recipe, source)
    elif recipe.slices:
        from shardmerge.engine.plan.forms.slices import slice_items

        planner, items, num_layers = slice_items(recipe, source)
    elif recipe.merge_method in ("pivot", "pivotmerge"):
        from shardmerge.engine.plan.forms.pivot import pivot_items

        planner, items, num_layers = pivot_items(recipe, source, state=state, address=address)
    else:
        planner = _Planner(recipe, source)
        planner.check_architectures()
        planner.check_tensor_sets()
        planner.check_modules_used()
        planner.plan_vocabulary()
        num_layers = planner.num_layers
        names = sorted(planner.ckpts[planner.reference].tensors, key=lambda n: (group_key(n), n))
        items = [planner.tensor(n, num_layers) for n in names]
    if not items:
        raise ValueError(f"{source}: model {planner.reference} has no tensors to merge")
    return _assemble(recipe, planner, items, shard_size, svd_batch_layers)


def _assemble(recipe: Recipe, planner, items: list[dict], shard_size: int, layers_per_unit: int = 1) -> Plan:
    groups: list[list[dict]] = []
    for it in items:
        if groups and group_key(groups[-1][0]["name"]) == group_key(it["name"]):
            groups[-1].append(it)
        else:
            groups.append([it])
    packed = _layout_shards(groups, shard_size)
    n = len(packed)
    shards, outs = [], {}
    for i, members in enumerate(packed):
        head, offsets = _header(members)
        size = len(head) + sum(_nbytes(it) for it in members)
        shards.append(
            ShardSpec(i, f"model-{i + 1:05d}-of-{n:05d}.safetensors", head, size, tuple(it["name"] for it in members))
        )
        for it, off in zip(members, offsets):
            outs[it["name"]] = OutputTensor(**it, shard=i, offset=off)
    units = _join_layers(groups, layers_per_unit)
    work = tuple(WorkUnit(i, _joined_label(g), tuple(outs[it["name"]] for it in g)) for i, g in enumerate(units))
    tok_dir = _tokenizer_dir(recipe, planner)
    check_confined(planner.ckpts[planner.reference].root, ["config.json"])  # copied into the output
    check_confined(Path(tok_dir), COPIED_FILES)
    from shardmerge.engine.plan.vocab import tokenizer_outputs

    artifacts, updates = tokenizer_outputs(recipe, planner, getattr(planner, "source", "<recipe>"))
    phash = _plan_hash(recipe, work, shards, planner.ckpts, joined=len(units) != len(groups))
    if artifacts or updates:  # what the inputs' file identities do not cover: the built tokenizer's files
        phash = hashlib.sha256(f"{phash}\n{repr((artifacts, updates))}\n{gather_identity(work)}".encode()).hexdigest()
    return Plan(
        recipe,
        work,
        tuple(shards),
        str(planner.ckpts[planner.reference].root),
        tok_dir,
        recipe.output_dtype_code,
        phash,
        tuple(str(getattr(c, "location", c.root)) for c in planner.ckpts.values()),  # URL of a remote input
        (*getattr(planner, "notes", ()), *input_notes(planner.ckpts)),
        tuple(getattr(planner, "artifacts", ())) + artifacts,
        updates + tuple(getattr(planner, "config_updates", ())),
    )


def input_notes(ckpts: dict[str, Checkpoint]) -> tuple[str, ...]:
    """What the inputs hold that is accepted but worth a warning (logged; also in the plan's notes and the model
    card): shards the index does not list, a model dir without config.json."""
    notes = [n for c in ckpts.values() for n in c.notes]
    notes += [
        f"model {r}: {c.root} has no config.json; its layout is read from the tensor names"
        + (" and the output gets no config.json (transformers needs one to load it)" if i == 0 else "")
        for i, (r, c) in enumerate(ckpts.items())
        if not os.path.lexists(c.root / "config.json")
    ]
    for n in notes:
        log.warning("%s", n)
    return tuple(notes)


def _tokenizer_dir(recipe: Recipe, planner) -> str:
    """The model dir whose tokenizer/processor files the output gets (a built tokenizer's files replace them)."""
    if not isinstance(planner, _Planner):
        if recipe.tokenizer is not None or recipe.tokenizer_source == "union":
            raise ValueError(
                f"{getattr(planner, 'source', '<recipe>')}: tokenizer: merge_method "
                f"{recipe.merge_method!r} keeps its reference model's vocabulary; tokenizer_source: "
                "union and the tokenizer: section apply to the other methods (use base or a model)"
            )
        tok = recipe.tokenizer_source
        return str(planner.ckpts[planner.reference].root if tok in (None, "base") else open_checkpoint(tok).root)
    tok = planner.tokenizer_kind()
    return str(
        planner.ckpts[planner.reference].root if tok in (None, "base", "union") else planner._tokenizer_ckpt(tok).root
    )


def _batchable(it: dict) -> bool:
    """Whether a planned tensor is a 2-D matrix of a whole-matrix method with a batched entry (shardmerge.engine.run.unit)."""
    if it["op"] == COPY or len(it["shape"]) != 2:
        return False
    spec = methods.get(it["op"])
    return not spec.chunkwise and spec.merge_batch is not None


def _join_layers(groups: list[list[dict]], n: int) -> list[list[dict]]:
    """Work units from the layout groups: up to `n` consecutive decoder-layer (vision-block) groups of one block
    stack that hold batchable matrices become one unit; every other group stays a unit of its own. The shard
    layout is made from the groups before this, so it, the tensor order and the output bytes do not depend on n;
    a unit spanning two shards is fine (a shard is finalised once every unit touching it is done)."""
    units: list[list[dict]] = []
    run, run_len = None, 0
    for g in groups:
        key = group_key(g[0]["name"])
        joinable = n > 1 and key[0] in (1, 5) and any(_batchable(it) for it in g)
        if joinable and units and run == key[:2] and run_len < n:
            units[-1] = units[-1] + g
            run_len += 1
        else:
            units.append(list(g))
            run, run_len = (key[:2] if joinable else None), 1
    return units


def _joined_label(g: list[dict]) -> str:
    """`model.layers.4` for one layer, `model.layers.4-7` for a unit of joined layers."""
    first, last = _unit_label(g[0]["name"]), group_key(g[-1]["name"])
    return first if group_key(g[0]["name"]) == last else f"{first}-{last[2]}"


def _unit_label(name: str) -> str:
    k = group_key(name)
    return f"{k[1]}.{k[2]}" if k[0] in (1, 5) else k[1]


def _plan_hash(recipe: Recipe, units, shards, ckpts: dict[str, Checkpoint], *, joined: bool = False) -> str:
    """Identity of the output: engine version, recipe, layout, and every input file's identity (size, mtime)."""
    h = hashlib.sha256()
    h.update(f"shardmerge {shardmerge.__version__}\n".encode())
    h.update(recipe.canonical_json().encode())
    for s in shards:
        h.update(s.filename.encode() + s.header)
    for u in units:
        for t in u.tensors:
            h.update(
                repr(
                    (t.name, t.op, t.params, [(m.name, m.file) for m in t.inputs], t.base.name if t.base else None)
                ).encode()
            )
    h.update(files_identity(ckpts.values()))
    if joined:  # layers joined into units (--svd-batch-layers): resume's journal names units, so their
        # boundaries are part of the identity; plans without joined units keep the hash they always had
        return hashlib.sha256(f"{h.hexdigest()}\nunits {[len(u.tensors) for u in units]}".encode()).hexdigest()
    return h.hexdigest()
