"""Recipe + checkpoints → frozen Plan: every output tensor with its inputs, work units, shard layout, plan hash.

The plan fixes the output bytes' layout completely (shard files, headers, every tensor's absolute offset), so workers
can write their tensors into the shard files independently and the output is identical for any worker count,
chunk size or placement. Architecture, tensor-set, shape and dtype mismatches are planning errors naming the model
and tensor; nothing is skipped silently.

The recipe's form (shardmerge.engine.plan.forms: standard `models:`, `slices:`, PlaM, PivotMerge) turns it into
typed plan items (shardmerge.engine.plan.model.PlanItem) in output order; this module lays them out into shards,
groups them into work units (one per LM decoder layer / vision block, plus embeddings, head, vision stem,
projector: shardmerge.engine.plan.grouping) and hashes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import shardmerge
from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import Checkpoint, files_identity, open_checkpoint
from shardmerge.engine.io.gather import gather_identity
from shardmerge.engine.io.paths import check_confined
from shardmerge.engine.io.writer import COPIED_FILES
from shardmerge.engine.plan.forms import Form, form_of
from shardmerge.engine.plan.grouping import group_key
from shardmerge.engine.plan.model import COPY as COPY
from shardmerge.engine.plan.model import FLOAT8_CODES as FLOAT8_CODES
from shardmerge.engine.plan.model import OutputTensor as OutputTensor
from shardmerge.engine.plan.model import Plan as Plan
from shardmerge.engine.plan.model import PlanItem as PlanItem
from shardmerge.engine.plan.model import ShardSpec as ShardSpec
from shardmerge.engine.plan.model import WorkUnit as WorkUnit
from shardmerge.engine.plan.vocab import tokenizer_outputs
from shardmerge.engine.recipe.model import Recipe

log = logging.getLogger("shardmerge.plan")


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


def _layout_shards(groups: list[list[PlanItem]], shard_size: int) -> list[list[PlanItem]]:
    """Pack whole work units into shards of at most shard_size; only a unit larger than a shard is split (by
    tensor). Keeping units inside one shard lets a finished shard be published without waiting on other units."""
    shards: list[list[PlanItem]] = [[]]
    used = 0
    for group in groups:
        size = sum(it.nbytes for it in group)
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        for it in group:
            if shards[-1] and used + it.nbytes > shard_size:
                shards.append([])
                used = 0
            shards[-1].append(it)
            used += it.nbytes
    return shards


def _header(items: list[PlanItem]) -> tuple[bytes, list[int]]:
    """safetensors header bytes (length prefix + JSON padded to 8 bytes) and each tensor's absolute data offset."""
    hdr: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    rel = []
    for it in items:
        n = it.nbytes
        hdr[it.name] = {"dtype": it.dtype, "shape": list(it.shape), "data_offsets": [pos, pos + n]}
        rel.append(pos)
        pos += n
    body = json.dumps(hdr, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    head = len(body).to_bytes(8, "little") + body
    return head, [len(head) + r for r in rel]


# Decoder layers (or vision blocks) per work unit for recipes with batchable whole-matrix methods (SVD family),
# by device, when --svd-batch-layers is not given. CPU 1: LAPACK loops over a batch there, so batching buys
# nothing and plans stay as they were. CUDA 4 (chosen, not yet measured on a GPU): a Llama layer holds three
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
    form = form_of(recipe)
    planner, items, num_layers = form.items(recipe, source, state=state, address=address)
    if not items:
        raise ValueError(f"{source}: model {planner.reference} has no tensors to merge")
    return _assemble(recipe, form, planner, items, shard_size, svd_batch_layers)


def _assemble(
    recipe: Recipe, form: Form, planner, items: list[PlanItem], shard_size: int, layers_per_unit: int = 1
) -> Plan:
    groups: list[list[PlanItem]] = []
    for it in items:
        if groups and group_key(groups[-1][0].name) == group_key(it.name):
            groups[-1].append(it)
        else:
            groups.append([it])
    packed = _layout_shards(groups, shard_size)
    n = len(packed)
    shards, outs = [], {}
    for i, members in enumerate(packed):
        head, offsets = _header(members)
        size = len(head) + sum(it.nbytes for it in members)
        shards.append(
            ShardSpec(i, f"model-{i + 1:05d}-of-{n:05d}.safetensors", head, size, tuple(it.name for it in members))
        )
        for it, off in zip(members, offsets):
            outs[it.name] = OutputTensor.place(it, i, off)
    units = _join_layers(groups, layers_per_unit)
    work = tuple(WorkUnit(i, _joined_label(g), tuple(outs[it.name] for it in g)) for i, g in enumerate(units))
    tok_dir = _tokenizer_dir(recipe, form, planner)
    check_confined(planner.ckpts[planner.reference].root, ["config.json"])  # copied into the output
    check_confined(Path(tok_dir), COPIED_FILES)
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


def _tokenizer_dir(recipe: Recipe, form: Form, planner) -> str:
    """The model dir whose tokenizer/processor files the output gets (a built tokenizer's files replace them)."""
    if not form.vocabulary:
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
        planner.ckpts[planner.reference].root if tok in (None, "base", "union") else planner.tokenizer_ckpt(tok).root
    )


def _batchable(it: PlanItem) -> bool:
    """Whether a planned tensor is a 2-D matrix of a whole-matrix method with a batched entry (shardmerge.engine.run.unit)."""
    if it.op == COPY or len(it.shape) != 2:
        return False
    spec = methods.get(it.op)
    return not spec.chunkwise and spec.merge_batch is not None


def _join_layers(groups: list[list[PlanItem]], n: int) -> list[list[PlanItem]]:
    """Work units from the layout groups: up to `n` consecutive decoder-layer (vision-block) groups of one block
    stack that hold batchable matrices become one unit; every other group stays a unit of its own. The shard
    layout is made from the groups before this, so it, the tensor order and the output bytes do not depend on n;
    a unit spanning two shards is fine (a shard is finalised once every unit touching it is done)."""
    units: list[list[PlanItem]] = []
    run, run_len = None, 0
    for g in groups:
        key = group_key(g[0].name)
        joinable = n > 1 and key[0] in (1, 5) and any(_batchable(it) for it in g)
        if joinable and units and run == key[:2] and run_len < n:
            units[-1] = units[-1] + g
            run_len += 1
        else:
            units.append(list(g))
            run, run_len = (key[:2] if joinable else None), 1
    return units


def _joined_label(g: list[PlanItem]) -> str:
    """`model.layers.4` for one layer, `model.layers.4-7` for a unit of joined layers."""
    first, last = _unit_label(g[0].name), group_key(g[-1].name)
    return first if group_key(g[0].name) == last else f"{first}-{last[2]}"


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
