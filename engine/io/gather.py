"""Input tensors whose rows are computed in the read path: vocabulary rows gathered into the output tokenizer's
order, and LoRA-adapted weights W + s * B A. Both are TensorMeta subclasses with their own `read_rows`, so every
reader (merge methods, copies, batched SVD) sees them as ordinary tensors, chunk by chunk: no permutation matrix,
no whole-tensor copy, nothing materialised on disk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from shardmerge.engine.io.checkpoint import DTYPES, TensorMeta, read_rows

PAD = -(2**31)  # row-map code of a padding row (pad_to_multiple_of): the mean of the tensor's vocabulary rows
_PAD_BLOCK = 4096  # rows per read of the padding mean: fixed, so the mean does not depend on the chunk size


def read_row_set(meta: TensorMeta, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (1-D int64, any order, repeats allowed) of `meta`, each contiguous run read once."""
    if rows.numel() == 0:
        return torch.empty((0,) + tuple(meta.shape[1:]), dtype=DTYPES[meta.dtype][0])
    uniq, inv = torch.unique(rows, sorted=True, return_inverse=True)
    u = uniq.tolist()
    parts, i = [], 0
    while i < len(u):
        j = i
        while j + 1 < len(u) and u[j + 1] == u[j] + 1:
            j += 1
        parts.append(read_rows(meta, u[i], u[j] + 1))
        i = j + 1
    return torch.cat(parts)[inv]


@dataclass(frozen=True)
class GatheredMeta(TensorMeta):
    """A vocabulary tensor (embeddings, LM head) of one input, in the output vocabulary's row order.
    `row_map[i]` (int32) is the input row for output row i, `-1 - f` for a token the input lacks (or a forced
    one), filled with `fills[f]`: the mean of `(donor, row)` rows of the inputs in `donors` (empty: zeros), or
    PAD for a padding row past `vocab_rows` (the mean of this tensor's rows below it)."""

    source: TensorMeta | None = field(default=None, kw_only=True)
    row_map: bytes = field(default=b"", kw_only=True)
    fills: tuple = field(default=(), kw_only=True)
    donors: tuple = field(default=(), kw_only=True)
    vocab_rows: int = field(default=0, kw_only=True)

    def read_rows(self, row_start: int, row_stop: int) -> torch.Tensor:
        codes = torch.frombuffer(bytearray(self.row_map[4 * row_start : 4 * row_stop]), dtype=torch.int32).long()
        dtype = DTYPES[self.dtype][0]
        out = torch.empty((row_stop - row_start,) + tuple(self.shape[1:]), dtype=dtype)
        own = codes >= 0
        if bool(own.any()):
            out[own] = read_row_set(self.source, codes[own])
        for code in torch.unique(codes[(~own) & (codes != PAD)]).tolist():
            out[codes == code] = self._fill(-1 - code)
        if bool((codes == PAD).any()):
            out[codes == PAD] = self._pad_row()
        return out

    def _fill(self, f: int) -> torch.Tensor:
        rows = self.fills[f]
        acc = torch.zeros(self.shape[1:], dtype=torch.float32)
        for donor, row in rows:
            acc += read_rows(self.donors[donor], row, row + 1)[0].float()
        return (acc / len(rows) if rows else acc).to(DTYPES[self.dtype][0])

    def _pad_row(self) -> torch.Tensor:
        acc = torch.zeros(self.shape[1:], dtype=torch.float64)
        for start in range(0, self.vocab_rows, _PAD_BLOCK):
            acc += self.read_rows(start, min(self.vocab_rows, start + _PAD_BLOCK)).double().sum(0)
        return (acc / max(1, self.vocab_rows)).to(DTYPES[self.dtype][0])


def gathered(source: TensorMeta, row_map: list[int], fills: tuple, donors: tuple, vocab_rows: int) -> GatheredMeta:
    """`source` seen through a row map (see GatheredMeta); the plan's view of one input's vocabulary tensor."""
    import array

    shape = (len(row_map),) + tuple(source.shape[1:])
    nbytes = DTYPES[source.dtype][1] * len(row_map) * source.row_numel
    return GatheredMeta(
        source.name,
        source.file,
        source.dtype,
        shape,
        0,
        nbytes,
        source=source,
        row_map=array.array("i", row_map).tobytes(),
        fills=fills,
        donors=donors,
        vocab_rows=vocab_rows,
    )


@dataclass(frozen=True)
class LoraMeta(TensorMeta):
    """A base weight with a LoRA adapter applied: rows [a, b) = W[a:b] + scale * (B A)[a:b], formed per read.
    `a_meta` is lora_A (r, in) and `b_meta` lora_B (out, r) for a Linear; `embedding` adapters store
    A as (r, num_embeddings) and B as (dim, r), `fan_in_fan_out` (GPT-2's Conv1D) stores W transposed."""

    base: TensorMeta | None = field(default=None, kw_only=True)
    a_meta: TensorMeta | None = field(default=None, kw_only=True)
    b_meta: TensorMeta | None = field(default=None, kw_only=True)
    scale: float = field(default=1.0, kw_only=True)
    layout: str = field(default="linear", kw_only=True)  # linear | embedding | fan_in_fan_out

    def read_rows(self, row_start: int, row_stop: int) -> torch.Tensor:
        w = read_rows(self.base, row_start, row_stop)
        if self.layout == "linear":  # (B[a:b] @ A)
            delta = read_rows(self.b_meta, row_start, row_stop).float() @ _whole(self.a_meta).float()
        else:  # embedding, or fan_in_fan_out (W is (in, out)): rows of (B @ A).T = A[:, a:b].T @ B.T
            a = _whole(self.a_meta).float()[:, row_start:row_stop]
            delta = a.T @ _whole(self.b_meta).float().T
        return (w.float() + self.scale * delta.reshape(w.shape)).to(w.dtype)


def _whole(meta: TensorMeta) -> torch.Tensor:
    return read_rows(meta, 0, meta.rows)


def gather_identity(units) -> str:
    """Digest of every row-gathered input's row map and fills (shardmerge.engine.io.gather)."""
    h = hashlib.sha256()
    for u in units:
        for t in u.tensors:
            for m in (*t.inputs, t.base):
                if m is not None and hasattr(m, "row_map"):
                    h.update(t.name.encode() + m.row_map + repr(m.fills).encode())
    return h.hexdigest()
