"""Recipe + checkpoints → frozen Plan: every output tensor with its inputs, work units, shard layout, plan hash.

The plan fixes the output bytes' layout completely (shard files, headers, every tensor's absolute offset), so workers
can write their tensors into the shard files independently and the output is identical for any worker count,
chunk size or placement. Architecture, tensor-set, shape and dtype mismatches are planning errors naming the model
and tensor; nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import engine
from engine import methods
from engine.checkpoint import DTYPES, FLOAT_CODES, Checkpoint, TensorMeta, open_checkpoint
from engine.recipe import Recipe
from engine.recipe_checks import input_models, resolve_params

COPY = "copy"  # op for tensors taken verbatim from one input
_NUMBERED = re.compile(r"^(.*?)\.(layers|blocks|h)\.(\d+)\.")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    op: str  # COPY or a registered method name
    inputs: tuple[TensorMeta, ...]  # method inputs in order (COPY: the one source)
    base: Optional[TensorMeta]
    params: tuple[tuple[str, Any], ...]
    layer: Optional[int]
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
    out_dtype: Optional[str]
    plan_hash: str
    inputs: tuple[str, ...] = field(default=())  # model dirs read

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
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    if unit not in mult:
        raise ValueError(f"size {text!r}: unknown unit {m.group(2)!r}")
    value = int(float(m.group(1)) * mult[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def num_layers_of(ckpt: Checkpoint) -> int:
    cfg = ckpt.config
    for c in (cfg.get("text_config") or {}, cfg):
        if isinstance(c.get("num_hidden_layers"), int):
            return c["num_hidden_layers"]
    idx = [int(m.group(3)) for n in ckpt.tensors if (m := _NUMBERED.match(n)) and m.group(2) == "layers"]
    return max(idx) + 1 if idx else 0


def group_key(name: str) -> tuple:
    """Work-unit grouping: one unit per numbered block (decoder layer, vision block); embeddings and head alone."""
    m = _NUMBERED.match(name)
    if m:
        return (1, m.group(1) + "." + m.group(2), int(m.group(3)))
    if "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
        return (0, "embed", 0)
    if name.endswith("lm_head.weight"):
        return (3, "lm_head", 0)
    return (2, "other", 0)


def lm_layer(name: str) -> Optional[int]:
    m = _NUMBERED.match(name)
    return int(m.group(3)) if m and m.group(2) == "layers" and "visual" not in m.group(1) else None


class _Planner:
    def __init__(self, recipe: Recipe, source: str):
        self.recipe = recipe
        self.source = source
        self.spec = methods.get(recipe.merge_method)
        refs = list(dict.fromkeys(recipe.model_refs + ([recipe.base_model] if recipe.base_model else [])))
        self.ckpts: dict[str, Checkpoint] = {r: open_checkpoint(r) for r in refs}
        self.inputs = input_models(recipe, self.spec)
        self.reference = recipe.mllm or recipe.base_model or recipe.model_refs[0]

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

    def inputs_for(self, name: str) -> tuple[tuple[TensorMeta, ...], Optional[TensorMeta]]:
        ref_meta = self.ckpts[self.reference].tensors[name]
        metas = []
        for r in self.inputs + ([self.recipe.base_model] if self.recipe.base_model else []):
            m = self.ckpts[r].tensors.get(name)
            if m is None:
                raise ValueError(f"{self.source}: model {r} has no tensor {name!r} (present in {self.reference})")
            if m.shape != ref_meta.shape:
                raise ValueError(
                    f"{self.source}: tensor {name!r}: shape {list(m.shape)} in model {r} differs from "
                    f"{list(ref_meta.shape)} in {self.reference}"
                )
            if m.dtype != ref_meta.dtype:
                raise ValueError(
                    f"{self.source}: tensor {name!r}: dtype {m.dtype} in model {r} differs from "
                    f"{ref_meta.dtype} in {self.reference}"
                )
            metas.append(m)
        base = metas.pop() if self.recipe.base_model else None
        if self.spec.base_is_input:  # linear-style: a listed base is one more input, an unlisted one is unused
            base = None
        return tuple(metas), base

    def check_tensor_sets(self) -> None:
        ref_names = set(self.ckpts[self.reference].tensors)
        for r, c in self.ckpts.items():
            extra = sorted(set(c.tensors) - ref_names)
            if extra:
                raise ValueError(
                    f"{self.source}: model {r} has tensor(s) {extra[:5]} that {self.reference} lacks; "
                    "the models do not share one architecture"
                )

    def tensor(self, name: str, num_layers: int) -> dict:
        ref_meta = self.ckpts[self.reference].tensors[name]
        layer = lm_layer(name)
        out_dtype = self.recipe.output_dtype_code or ref_meta.dtype
        common = dict(name=name, shape=ref_meta.shape, layer=layer, num_layers=num_layers)
        if ref_meta.dtype not in FLOAT_CODES:
            return dict(common, dtype=ref_meta.dtype, op=COPY, inputs=(ref_meta,), base=None, params=())
        inputs, base = self.inputs_for(name)
        t = layer / (num_layers - 1) if layer is not None and num_layers > 1 else 0.0
        params = resolve_params(self.recipe, self.spec, name, t)
        return dict(common, dtype=out_dtype, op=self.spec.name, inputs=inputs, base=base,
                    params=tuple(sorted(params.items())))


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


def build_plan(recipe: Recipe, *, shard_size: int | str = "5GB", source: str = "<recipe>") -> Plan:
    """Plan a merge without reading tensor data (headers only)."""
    shard_size = parse_size(shard_size)
    if recipe.merge_method == "plam":
        from engine.plam_plan import plam_items

        planner, items, num_layers = plam_items(recipe, source)
    else:
        planner = _Planner(recipe, source)
        planner.check_architectures()
        planner.check_tensor_sets()
        num_layers = num_layers_of(planner.ckpts[planner.reference])
        names = sorted(planner.ckpts[planner.reference].tensors, key=lambda n: (group_key(n), n))
        items = [planner.tensor(n, num_layers) for n in names]
    if not items:
        raise ValueError(f"{source}: model {planner.reference} has no tensors to merge")
    return _assemble(recipe, planner, items, shard_size)


def _assemble(recipe: Recipe, planner, items: list[dict], shard_size: int) -> Plan:
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
        shards.append(ShardSpec(i, f"model-{i + 1:05d}-of-{n:05d}.safetensors", head, size,
                                tuple(it["name"] for it in members)))
        for it, off in zip(members, offsets):
            outs[it["name"]] = OutputTensor(**it, shard=i, offset=off)
    work = tuple(
        WorkUnit(i, _unit_label(g[0]["name"]), tuple(outs[it["name"]] for it in g)) for i, g in enumerate(groups)
    )
    tok = recipe.tokenizer_source
    tok_dir = str(planner.ckpts[planner.reference].root) if tok in (None, "base") else str(open_checkpoint(tok).root)
    phash = _plan_hash(recipe, work, shards, planner.ckpts)
    return Plan(recipe, work, tuple(shards), str(planner.ckpts[planner.reference].root), tok_dir,
                recipe.output_dtype_code, phash, tuple(str(c.root) for c in planner.ckpts.values()))


def _unit_label(name: str) -> str:
    k = group_key(name)
    return f"{k[1]}.{k[2]}" if k[0] == 1 else k[1]


def _plan_hash(recipe: Recipe, units, shards, ckpts: dict[str, Checkpoint]) -> str:
    """Identity of the output: engine version, recipe, layout, and every input file's identity (size, mtime)."""
    h = hashlib.sha256()
    h.update(f"shardmerge {engine.__version__}\n".encode())
    h.update(recipe.canonical_json().encode())
    for s in shards:
        h.update(s.filename.encode() + s.header)
    for u in units:
        for t in u.tensors:
            h.update(repr((t.name, t.op, t.params, [(m.name, m.file) for m in t.inputs],
                           t.base.name if t.base else None)).encode())
    files = sorted({m.file for c in ckpts.values() for m in c.tensors.values()})
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
