"""The merge-method contract.

A merge method is a pure tensor function registered by name: no I/O, no Ray, no device choice inside.
The engine hands it float32 tensors (a row chunk of every input, all on one device) and casts the result.

Two kinds of method:
- chunkwise (classic methods): `merge` is called once per row chunk. A method that needs whole-tensor statistics
  (TIES/breadcrumbs magnitude thresholds, SLERP norms and dot product) declares `prepare`, which receives a
  re-iterable reader over the tensor's chunks and returns small, picklable statistics handed to every `merge` call
  as `stats=`. Statistics must not depend on the chunking (exact selection, per-row partials summed once).
- whole-tensor (SVD family): `chunkwise=False`; `merge` gets the full tensors once; the plan budgets memory for it
  with the spec's `memory` estimate.

A method is one module under engine/methods/ that registers its MethodSpec(s) on import (shardmerge.engine.methods discovers
the modules). The spec is the single place that describes the method to the rest of the engine: its parameters
(`Param`: kind, default, per-model or global, required, valid range or choices), its input contract (model count,
what the base model is for), whether it streams, its whole-matrix memory estimate, its report, a reference and
its mergekit name and aliases. Recipe checks, the memory check, docs/methods.md and the model card read the spec;
nothing else keys behaviour on a parameter's or a method's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TensorInfo:
    """What a method may know about the tensor it merges (for keyed randomness and layer schedules)."""

    name: str  # output tensor name, e.g. "model.layers.3.mlp.up_proj.weight"
    shape: tuple[int, ...]
    layer: int | None = None  # language-model decoder layer index, None for embeddings/head/other
    num_layers: int = 0


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of rows (dim 0) of a tensor; 0-d/1-d tensors are one chunk of all elements."""

    row_start: int
    row_stop: int
    elem_offset: int  # flat index of the first element of this chunk in the whole tensor


# A reader yields, in row order, (chunk, expert tensors (float32), base tensor (float32) or None).
ChunkReader = Callable[[], Iterator[tuple[Chunk, Sequence[torch.Tensor], torch.Tensor | None]]]


PARAM_KINDS = ("float", "int", "bool", "str")
BASE_ROLES = ("required", "optional", "input", "unused")


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method.

    kind: "float" (any finite number; YAML ints accepted), "int", "bool" or "str". default None = required.
    lo/hi bound the value (inclusive unless lo_open/hi_open); hi_models: the upper bound is the number of input
    models (checked where the model count is known). choices: the allowed values of a "str" parameter. A value
    equal to the default is always accepted (sentinel defaults such as "auto" or NaN mean "not set").
    internal: set by the planner from the plan's structure (e.g. how many trailing inputs are a companion tensor's),
    never by a recipe: the recipe checks refuse it by name, every op gets the default unless its planner sets it,
    and docs/methods.md lists it as internal. It must have a default."""

    name: str
    kind: str = "float"
    default: Any = None
    per_model: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hi_models: bool = False
    choices: tuple = ()
    doc: str = ""
    internal: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of {PARAM_KINDS}, got {self.kind!r}")
        if self.internal and self.default is None:
            raise ValueError(f"parameter {self.name!r}: an internal parameter needs a default (the planner sets it)")

    @property
    def required(self) -> bool:
        return self.default is None

    def range_text(self, n_models: int | None = None) -> str:
        """The valid range as interval text ("(0, 1]", ">= 0", "(0, K]"), or "" when unbounded."""
        hi = "K" if self.hi_models and n_models is None else (n_models if self.hi_models else self.hi)
        if self.lo is not None and hi is not None:
            return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(hi)}"
        return ""

    def check(self, value: Any, where: str, n_models: int | None = None) -> None:
        """Raise ValueError naming `where`, the value and what is expected, unless the value is valid."""
        if value is None or same_value(value, self.default):
            return
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true/false, got {value!r}")
            return
        if self.kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{where}: expected a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise ValueError(
                    f"{where}: {self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
                )
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if self.kind == "int" and not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        if not self._in_range(value, n_models):
            shown = self.range_text(n_models)
            interval = shown[0] in "[("
            suffix = " (K = the number of input models)" if self.hi_models and n_models is None else ""
            raise ValueError(f"{where}: {self.name} must be {'in ' if interval else ''}{shown}{suffix}, got {value!r}")

    def _in_range(self, v: float, n_models: int | None) -> bool:
        hi = n_models if self.hi_models else self.hi
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return hi is None or (v < hi if self.hi_open else v <= hi)


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, (int, float)) and float(x).is_integer() else str(x)


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type (so 1 != 1.0 != True), with NaN equal to NaN: a parameter left at its default."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _same_dict(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)


def _legacy_params(per_model: Mapping[str, Any], global_: Mapping[str, Any]) -> tuple[Param, ...]:
    """Params of a spec written with the name -> default dicts: kind from the default, no declared range."""

    def kind(default: Any) -> str:
        return "bool" if isinstance(default, bool) else "str" if isinstance(default, str) else "float"

    return tuple(
        [Param(k, kind(d), d, per_model=True) for k, d in per_model.items()]
        + [Param(k, kind(d), d) for k, d in global_.items()]
    )


# Estimated peak bytes of a whole-matrix merge of one tensor: (shape, number of non-base inputs, base given,
# input_shapes=the shapes of those inputs) -> bytes. `input_shapes` matters where inputs are not all of the output's
# shape (pivot's bias op, which also receives its layer weight's inputs); an estimate may ignore it.
MemoryEstimate = Callable[..., int]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n) of a tensor seen as a matrix: dim 0 by the product of the rest (how whole-matrix methods see N-D)."""
    m = shape[0] if shape else 1
    return m, math.prod(shape[1:])


def whole_data_bytes(shape: tuple[int, ...], n_inputs: int, has_base: bool, input_shapes: tuple = ()) -> int:
    """Data of a whole-matrix merge: the K (+ base) float32 inputs as read, their stack, the task vectors, the
    result and its output-dtype copy, D = 4 m n (3 K + base + 2); the default estimate of a whole-matrix method
    that declares none (one without decompositions)."""
    m, n = matrix_shape(shape)
    return 4 * m * n * (3 * max(1, n_inputs) + (1 if has_base else 0) + 2)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    merge(tensors, base, *, stats, chunk, info, **params) -> Tensor (float32, same shape as the chunk)
      tensors: the non-base inputs, in recipe order (the base is passed separately as `base`);
      per-model parameters arrive as tuples aligned with `tensors`; global parameters as scalars.
    prepare(read, *, info, **params) -> stats   (only when the method needs whole-tensor statistics)
    merge_batch(inputs, bases, infos, **params) -> list of Tensors   (optional, whole-tensor methods only)
      B same-shape tensors with identical params in one call: inputs[b] / bases[b] / infos[b] are what `merge`
      would get for tensor b; returns the B results in order, equal to B `merge` calls up to float rounding.
      Why: on GPU one batched decomposition of B same-shape matrices (across layers and experts) replaces B
      small launches. The engine batches only when the device is not the CPU or when asked (shardmerge.engine.run.unit).
    merge_with_report(same arguments as merge) -> (Tensor, JSON-able dict)   (optional, whole-tensor methods)
      the engine calls it instead of `merge` and gathers the dicts into `<report>_report.json`.

    Parameters are declared either as `params` (Param entries: kind, range, choices) or, in the older form, as
    the `per_model_params` / `global_params` dicts of name -> default (None = required); each form is derived
    from the other, so code reading either sees every parameter.
    base: what a base model is to the method: "required" (the reference point of task vectors), "optional"
    (used when given), "input" (one more weighted input, as linear) or "unused" (accepted and ignored); derived
    from needs_base / base_is_input when not given.
    """

    name: str
    merge: Callable[..., torch.Tensor]
    needs_base: bool
    per_model_params: Mapping[str, Any] = field(default_factory=dict)  # name -> default (None = required)
    global_params: Mapping[str, Any] = field(default_factory=dict)  # name -> default (None = required)
    prepare: Callable[..., Any] | None = None
    chunkwise: bool = True
    # linear-style methods treat a listed base model as one more input instead of a reference point
    base_is_input: bool = False
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""
    merge_batch: Callable[..., list] | None = None
    params: tuple[Param, ...] = ()
    base: str = ""
    memory: MemoryEstimate | None = None  # whole-matrix methods: peak bytes for one tensor
    whole_tensor_stats: str = ""  # chunkwise methods: the statistics `prepare` computes over the whole tensor
    reference: str = ""  # paper or code the method follows
    mergekit_name: str | None = None  # mergekit 0.1.5's name for the same method (None: not in mergekit)
    aliases: tuple[str, ...] = ()
    report: str = ""  # name of the report file (<report>_report.json) written by merge_with_report
    merge_with_report: Callable[..., tuple] | None = None

    def __post_init__(self) -> None:
        if self.params:
            per_model = {p.name: p.default for p in self.params if p.per_model}
            global_ = {p.name: p.default for p in self.params if not p.per_model}
            given = (dict(self.per_model_params), dict(self.global_params))
            if any(given) and not (_same_dict(given[0], per_model) and _same_dict(given[1], global_)):
                raise ValueError(
                    f"method {self.name!r}: per_model_params / global_params disagree with `params`; "
                    "declare the parameters once, as `params`"
                )
            object.__setattr__(self, "per_model_params", per_model)
            object.__setattr__(self, "global_params", global_)
        else:
            object.__setattr__(self, "params", _legacy_params(self.per_model_params, self.global_params))
        if len({p.name for p in self.params}) != len(self.params):
            raise ValueError(f"method {self.name!r}: a parameter is declared twice")
        derived = "required" if self.needs_base else "input" if self.base_is_input else "optional"
        base = self.base or derived
        if base not in BASE_ROLES or (base == "required") != self.needs_base or (base == "input") != self.base_is_input:
            raise ValueError(
                f"method {self.name!r}: base {self.base!r} contradicts needs_base={self.needs_base}, "
                f"base_is_input={self.base_is_input}; expected one of {BASE_ROLES} consistent with them"
            )
        object.__setattr__(self, "base", base)
        if self.merge_with_report is not None and not self.report:
            raise ValueError(f"method {self.name!r}: merge_with_report needs the report's name (`report`)")

    def param(self, name: str) -> Param | None:
        """The declared parameter `name`, None when the method has none by that name."""
        return next((p for p in self.params if p.name == name), None)
