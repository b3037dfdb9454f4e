"""The plan's data model: what a merge will write, fixed before any tensor data is read.

A recipe form (shardmerge.engine.plan.forms) turns a recipe into `PlanItem`s, one per output tensor in output
order; the builder (shardmerge.engine.plan.build) places each item in a shard (`OutputTensor` = item + shard +
absolute offset), groups them into `WorkUnit`s and freezes everything into a `Plan` with its hash. Executors,
workers and the writer read these types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardmerge.engine.io.dtypes import DTYPES, TensorMeta
from shardmerge.engine.recipe.model import Recipe

COPY = "copy"  # op for tensors taken verbatim from one input
FLOAT8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})  # quantized weights: their scales live in other tensors


@dataclass(frozen=True)
class PlanItem:
    """One planned output tensor: its name, dtype and shape, and the op (COPY or a registered method name) that
    makes it from `inputs` (in method order; COPY: the one source) and `base`, with its resolved parameters."""

    name: str
    dtype: str  # output dtype code
    shape: tuple[int, ...]
    op: str  # COPY or a registered method name
    inputs: tuple[TensorMeta, ...]  # method inputs in order (COPY: the one source)
    base: TensorMeta | None
    params: tuple[tuple[str, Any], ...]
    layer: int | None
    num_layers: int

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
class OutputTensor(PlanItem):
    """A plan item placed in the output: its shard and the absolute byte offset of its data in that file."""

    shard: int
    offset: int  # absolute byte offset of the data in the shard file

    @classmethod
    def place(cls, item: PlanItem, shard: int, offset: int) -> OutputTensor:
        return cls(**{name: getattr(item, name) for name in PlanItem.__dataclass_fields__}, shard=shard, offset=offset)


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
