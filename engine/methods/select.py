"""Exact k-th largest |x| of a tensor that is only ever seen in row chunks (two streaming passes).

Why: TIES and breadcrumbs keep, per expert, the top fraction of |tau| over the WHOLE tensor, but a worker reads the
tensor chunk by chunk and must never rebuild it. A sort is impossible; an approximate quantile would make the output
depend on the chunking. Radix select on float32 bit patterns is exact and chunking-independent: for x >= 0 the int32
bit pattern of a float32 is monotone in its value, so
  pass 1: histogram the high 16 bits of |x| (32768 buckets, since the sign bit is cleared) over all chunks and find
          the bucket holding the k-th largest;
  pass 2: histogram the low 16 bits of the entries inside that bucket and find the exact bit pattern.
Histograms are integer counts, so they are identical whatever the chunking, device or order of chunks.

Semantics: the threshold t returned is exactly the k-th largest |x| counted with multiplicity, i.e.
torch.kthvalue(|x|.flatten(), numel - k + 1). Callers keep entries with |x| >= t.
Tie handling vs mergekit: mergekit keeps exactly k entries via argsort (which of several entries equal to the k-th
value survive is unspecified); keeping |x| >= t keeps all of them, so more than k entries survive exactly when the
k-th largest magnitude is tied. The extra survivors are equal in magnitude to a kept one; ties of zeros (the common
case: an expert equal to the base somewhere) change nothing numerically.
NaN magnitudes are refused (their bit patterns would sort above +inf); -0.0 counts as 0.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

_LOW_BITS = 16
_N_HIGH = 1 << 15  # sign bit cleared: high 16 bits of |x| lie in [0, 2**15)
_N_LOW = 1 << _LOW_BITS
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000

# read() returns, in row order, one sequence of tensors per chunk: stream i of every chunk is one part of tensor i.
StreamReader = Callable[[], Iterable[Sequence[torch.Tensor]]]


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """Flat int32 bit patterns of |x| (sign bit cleared): monotone in |x| for every non-NaN float32."""
    if x.dtype != torch.float32:
        raise ValueError(f"abs_bits: expected a float32 tensor, got {x.dtype}")
    return x.reshape(-1).view(torch.int32) & _ABS_MASK


def _check_ks(ks: Sequence[Sequence[int]], n: int, label: str) -> None:
    for stream, wanted in enumerate(ks):
        for k in wanted:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
                raise ValueError(
                    f"{label}: stream {stream}: k must be an int in [1, numel={n}], got {k!r}"
                )


def _top_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bucket b with count(bucket >= b) >= k, and how many entries of b are still needed (from the top)."""
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[b] = count of entries in buckets >= b
    bucket = int((suffix >= k).nonzero().max())
    above = int(suffix[bucket + 1]) if bucket + 1 < hist.numel() else 0
    return bucket, k - above


class _Histogram:
    """Integer histogram fed in pieces; small pieces are buffered so tiny chunks do not each pay for a full
    65536-bin bincount (the counts are the same whatever the buffering)."""

    _FLUSH = 1 << 20

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self._counts: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0

    def add(self, values: torch.Tensor) -> None:
        self._pending.append(values)
        self._pending_n += values.numel()
        if self._pending_n >= self._FLUSH:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        values = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        h = torch.bincount(values, minlength=self.bins)
        self._counts = h if self._counts is None else self._counts.add_(h)
        self._pending, self._pending_n = [], 0

    def counts(self) -> torch.Tensor:
        self._flush()
        return self._counts if self._counts is not None else torch.zeros(self.bins, dtype=torch.int64)


def _pass_high(read: StreamReader, n_streams: int, label: str) -> tuple[list[torch.Tensor], int]:
    """Pass 1: per-stream histograms of the high 16 bits of |x|, and the element count (checked equal per stream)."""
    hists = [_Histogram(_N_HIGH) for _ in range(n_streams)]
    counts = [0] * n_streams
    for parts in read():
        if len(parts) != n_streams:
            raise RuntimeError(f"{label}: a chunk gave {len(parts)} streams, expected {n_streams}")
        for i, part in enumerate(parts):
            bits = abs_bits(part)
            if bool((bits > _INF_BITS).any()):
                raise ValueError(f"{label}: stream {i} holds NaN; an exact magnitude threshold needs real values")
            hists[i].add(bits >> _LOW_BITS)
            counts[i] += bits.numel()
    if n_streams and len(set(counts)) != 1:
        raise RuntimeError(f"{label}: streams have different element counts {counts}; expected equal")
    return [h.counts() for h in hists], (counts[0] if n_streams else 0)


def _pass_low(read: StreamReader, wanted: dict[tuple[int, int], None]) -> dict[tuple[int, int], torch.Tensor]:
    """Pass 2: for each (stream, bucket), the histogram of the low 16 bits of the entries inside that bucket."""
    hists = {key: _Histogram(_N_LOW) for key in wanted}
    for parts in read():
        for (i, bucket), hist in hists.items():
            bits = abs_bits(parts[i])
            hist.add(bits[(bits >> _LOW_BITS) == bucket] & (_N_LOW - 1))
    return {key: h.counts() for key, h in hists.items()}


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def kth_largest_abs_streaming(
    read: StreamReader, ks: Sequence[Sequence[int]], *, label: str = "magnitude selection"
) -> list[list[float]]:
    """Exact k-th largest |x| for several streams and several k per stream, in two passes over `read()`.

    `ks[i]` lists the k values wanted for stream i (1 <= k <= numel); returns the thresholds in the same layout,
    each exactly representable as float32. `label` names the tensor in error messages.
    """
    n_streams = len(ks)
    if n_streams == 0 or not any(ks):
        return [[] for _ in ks]
    high, n = _pass_high(read, n_streams, label)
    _check_ks(ks, n, label)
    picks: dict[tuple[int, int], tuple[int, int]] = {}
    for i, wanted in enumerate(ks):
        for k in wanted:
            picks[(i, k)] = _top_bucket(high[i], k)
    low = _pass_low(read, {(i, bucket): None for (i, _), (bucket, _) in picks.items()})
    out: list[list[float]] = []
    for i, wanted in enumerate(ks):
        row = []
        for k in wanted:
            bucket, need = picks[(i, k)]
            low_bits, _ = _top_bucket(low[(i, bucket)], need)
            row.append(_bits_to_float((bucket << _LOW_BITS) | low_bits))
        out.append(row)
    return out


def kth_largest_abs(x: torch.Tensor, k: int, *, chunk_rows: int | None = None) -> float:
    """Exact k-th largest |x| of one in-memory float32 tensor (optionally streamed in `chunk_rows` row chunks)."""
    if x.dim() == 0:
        x = x.reshape(1)
    step = x.shape[0] if chunk_rows is None else chunk_rows
    if step < 1:
        raise ValueError(f"kth_largest_abs: chunk_rows must be >= 1, got {chunk_rows!r}")

    def read():
        return ([x[r : r + step]] for r in range(0, max(x.shape[0], 1), step))

    return kth_largest_abs_streaming(read, [[k]])[0][0]


__all__ = ["StreamReader", "abs_bits", "kth_largest_abs", "kth_largest_abs_streaming"]
