"""The recipe format: a frozen, validated Recipe (a mergekit-compatible subset plus our methods) and its parts.

These are the types only; shardmerge.engine.recipe.schema parses YAML into them (paths resolved, the semantic checks
of shardmerge.engine.recipe.checks run), so every configuration error is raised before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from shardmerge.engine.io.dtypes import NAME_TO_CODE

Scalar = bool | int | float | str


class Condition(BaseModel):
    """A filtered parameter value: applies to tensors whose name contains `filter` (mergekit semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Scalar | list[Scalar]
    filter: str | None = None


Number = StrictInt | StrictFloat


class PairWeights(BaseModel):
    """PlaM's unnormalised form `weights: {mllm: 0.9, base: 0.3}` (each a number or a per-layer gradient list):
    W = mllm * W_mllm + base * W_base. A mapping of its own so that a typo'd key is an error, not a silent 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mllm: Number | list[Number]
    base: Number | list[Number]


Setting = Scalar | list[Scalar] | Condition | list[Condition] | PairWeights


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One input of an output slice: layers [first, stop) of `model` (mergekit's `layer_range`, end exclusive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    layer_range: tuple[StrictInt, StrictInt]
    parameters: dict[str, Setting] = Field(default_factory=dict)


class OutputSlice(BaseModel):
    """A run of output decoder layers: its sources (equal layer counts) merge layer by layer with the recipe's
    method; `base_model` and `parameters` override the recipe's for this slice (shardmerge.engine.plan.forms.slices)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)


class ModuleRecipe(BaseModel):
    """Per-module override for MLLMs: `modules: {vision_tower: {merge_method: passthrough}, ...}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: str
    parameters: dict[str, Setting] = Field(default_factory=dict)
    source: str | None = None  # for passthrough: which model to copy from (default: base or first model)


class CalibrationRecipe(BaseModel):
    """PivotMerge's `calibration:`: a Parquet file of image-caption pairs (or a pivot_calibration.json written by an
    earlier merge), as a bare path or a mapping with these keys (shardmerge.engine.plan.forms.pivot_calibration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    max_pairs: int = Field(default=256, gt=0)  # rows sampled (seeded, kept in file order); all when fewer
    seed: int = 0  # which rows are sampled when the file has more than max_pairs
    # contrastive: matched-caption cosine minus the mean mismatched-caption cosine per image; cosine: the matched
    # cosine alone (dominated by the offset between image features and caption embeddings)
    score: Literal["contrastive", "cosine"] = "contrastive"
    image_column: str = ""  # "" = the first of image / image_bytes / img
    caption_column: str = ""  # "" = the first of caption / text / captions / sentence
    device: str = "auto"  # auto = cuda when available (where it runs), else cpu
    # where it runs: the driver process, a Ray task (1 GPU when the cluster has GPUs), or auto = a Ray task when the
    # merge runs on a cluster (--address / RAY_ADDRESS) that has GPUs and the driver has none, else the driver
    where: Literal["auto", "driver", "ray"] = "auto"


class TokenSource(BaseModel):
    """A `tokenizer.tokens.<token>.source` mapping: `{kind: zero}` or `{kind: model_token, model, token | token_id}`
    (that model's row of another token)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero", "model_token"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self):
        if self.kind == "model_token" and (self.model is None or (self.token is None) == (self.token_id is None)):
            raise ValueError("kind: model_token needs `model` and exactly one of `token` / `token_id`")
        return self


class TokenEmbedding(BaseModel):
    """Where one token's embedding row comes from: a model name (its row of the token) or a TokenSource;
    `force: true` uses it for every model, even those that have the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: TokenSource | str | None = None
    force: bool = False


class TokenizerRecipe(BaseModel):
    """mergekit's `tokenizer:` section (shardmerge.engine.plan.vocab)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"  # union | base | a model
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry | str] = Field(default_factory=list)  # a bare string = {model: <string>}
    slices: list[OutputSlice] = Field(default_factory=list)  # mergekit's `slices:` (instead of `models:`)
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # base | union | a model (shardmerge.engine.plan.vocab)
    tokenizer: TokenizerRecipe | None = None
    chat_template: str | None = None
    modules: dict[str, ModuleRecipe] = Field(default_factory=dict)
    # PlaM form: `mllm` + `base_llm` instead of `models`
    mllm: str | None = None
    base_llm: str | None = None
    # PivotMerge form
    init_model: str | None = None
    calibration: CalibrationRecipe | None = None  # a bare string = {path: <string>}
    allow_different_backbones: bool = False
    allow_unaligned: bool = False  # pivot: skip the shared-initialisation check of the experts' projectors

    @field_validator("calibration", mode="before")
    @classmethod
    def _bare_calibration(cls, v):
        return {"path": v} if isinstance(v, str) else v

    @field_validator("models", mode="after")
    @classmethod
    def _bare_models(cls, v: list) -> list:
        return [ModelEntry(model=m) if isinstance(m, str) else m for m in v]

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in NAME_TO_CODE:
            raise ValueError(f"unknown dtype {v!r}; expected one of {', '.join(sorted(NAME_TO_CODE))}")
        return v

    @property
    def model_refs(self) -> list[str]:
        """Input models in order (PlaM: mllm then base_llm)."""
        if self.merge_method == "plam":
            return [r for r in (self.mllm, self.base_llm) if r]
        if self.slices:  # every model a slice names, in order of first mention
            refs = [src.model for sl in self.slices for src in sl.sources]
            refs += [sl.base_model for sl in self.slices if sl.base_model]
            return list(dict.fromkeys(refs))
        return [m.model for m in self.models]

    @property
    def output_dtype_code(self) -> str | None:
        name = self.out_dtype or self.dtype
        return NAME_TO_CODE[name] if name else None

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
