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
torch.kthvalue(|x|.flatten(), numel - k + 1).
Exactly k: entries are ranked by |x| descending, then by flat index ascending (a total order that does not depend
on the chunking). `rank_streaming` returns, besides t, the flat index of the entry of rank k, found by one more
pass that runs only when t is tied and the cut falls inside the ties; the top k are then the entries with |x| > t
plus those with |x| == t up to that index. bf16 fine-tunes make such ties common (their task vectors lie on a
coarse grid), so keeping every tied entry would keep more than k. mergekit also keeps exactly k, but which of the
tied entries it keeps is its parallel sort's (unstable, thread-dependent) order: the kept count is the same, the
positions may differ among entries of equal |x| at the threshold.
NaN magnitudes are refused (their bit patterns would sort above +inf); -0.0 counts as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

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
                raise ValueError(f"{label}: stream {stream}: k must be an int in [1, numel={n}], got {k!r}")


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


class Rank(NamedTuple):
    """The entry of rank k (|x| descending, then flat index ascending) of one stream."""

    value: float  # its |x|: the k-th largest magnitude
    need: int  # how many entries with |x| == value rank within the top k (1 <= need <= ties)
    ties: int  # how many entries have |x| == value
    index: int | None = None  # its flat index; None unless asked for and needed (1 < ties)


def _select(read: StreamReader, ks: Sequence[Sequence[int]], label: str) -> list[list[Rank]]:
    """Two passes: the k-th largest |x| of every (stream, k), with its tie counts (index not yet located)."""
    n_streams = len(ks)
    high, n = _pass_high(read, n_streams, label)
    _check_ks(ks, n, label)
    picks: dict[tuple[int, int], tuple[int, int]] = {}
    for i, wanted in enumerate(ks):
        for k in wanted:
            picks[(i, k)] = _top_bucket(high[i], k)
    low = _pass_low(read, {(i, bucket): None for (i, _), (bucket, _) in picks.items()})
    out: list[list[Rank]] = []
    for i, wanted in enumerate(ks):
        row = []
        for k in wanted:
            bucket, need = picks[(i, k)]
            hist = low[(i, bucket)]
            low_bits, need_low = _top_bucket(hist, need)
            row.append(Rank(_bits_to_float((bucket << _LOW_BITS) | low_bits), need_low, int(hist[low_bits])))
        out.append(row)
    return out


def _locate(read: StreamReader, wanted: dict[tuple[int, float], set[int]]) -> dict[tuple[int, float, int], int]:
    """One pass: for each (stream, value) and each n in its set, the flat index of the n-th entry (in flat order)
    with |x| == value. Stops reading once every index is found."""
    found: dict[tuple[int, float, int], int] = {}
    todo = sum(len(v) for v in wanted.values())
    seen = dict.fromkeys(wanted, 0)
    offset = 0
    bits_of = {key: int(torch.tensor([key[1]], dtype=torch.float32).view(torch.int32)[0]) for key in wanted}
    for parts in read():
        size = parts[0].numel() if parts else 0
        for key, ns in wanted.items():
            eq = abs_bits(parts[key[0]]) == bits_of[key]
            count = int(eq.sum())
            hits = [n for n in ns if seen[key] < n <= seen[key] + count]
            if hits:
                where = eq.nonzero().reshape(-1)
                for n in hits:
                    found[(key[0], key[1], n)] = offset + int(where[n - seen[key] - 1])
            seen[key] += count
        offset += size
        if len(found) == todo:
            break
    return found


def rank_streaming(
    read: StreamReader,
    ks: Sequence[Sequence[int]],
    *,
    label: str = "magnitude selection",
    locate: Callable[[int, int, Rank], bool] = lambda i, j, r: r.ties > 1,
) -> list[list[Rank]]:
    """Exact k-th ranked entries for several streams and several k per stream: two passes over `read()`, plus a
    third for the flat indices of the ranks where `locate(stream, position in ks[stream], rank)` is true
    (default: the value is tied)."""
    if len(ks) == 0 or not any(ks):
        return [[] for _ in ks]
    ranks = _select(read, ks, label)
    wanted: dict[tuple[int, float], set[int]] = {}
    for i, row in enumerate(ranks):
        for j, r in enumerate(row):
            if locate(i, j, r):
                wanted.setdefault((i, r.value), set()).add(r.need)
    if not wanted:
        return ranks
    found = _locate(read, wanted)
    return [
        [r._replace(index=found[(i, r.value, r.need)]) if locate(i, j, r) else r for j, r in enumerate(row)]
        for i, row in enumerate(ranks)
    ]


def kth_largest_abs_streaming(
    read: StreamReader, ks: Sequence[Sequence[int]], *, label: str = "magnitude selection"
) -> list[list[float]]:
    """Exact k-th largest |x| for several streams and several k per stream, in two passes over `read()`.

    `ks[i]` lists the k values wanted for stream i (1 <= k <= numel); returns the thresholds in the same layout,
    each exactly representable as float32. `label` names the tensor in error messages.
    """
    if len(ks) == 0 or not any(ks):
        return [[] for _ in ks]
    return [[r.value for r in row] for row in _select(read, ks, label)]


def _with_ties(mag: torch.Tensor, value: float, strict: torch.Tensor, start: int | None, stop: int | None):
    """`strict` plus the entries with mag == value at flat chunk positions [start, stop) (None: open end)."""
    ties = (mag == value).reshape(-1)
    if start:
        ties[:start] = False
    if stop is not None:
        ties[stop:] = False
    return strict | ties.reshape(mag.shape)


def keep_in_window(
    mag: torch.Tensor, lo: float, hi: float | None, lo_last: int | None, hi_first: int | None, elem_offset: int = 0
) -> torch.Tensor:
    """Keep mask of a chunk of magnitudes (flat positions from `elem_offset`) for the window lo <= mag <= hi, where
    of the entries equal to lo only those at flat index <= lo_last, and of those equal to hi only those at flat
    index >= hi_first, are kept (None: all of them): the exact top-k cuts of `rank_streaming`."""
    size = mag.numel()
    last = None if lo_last is None else lo_last - elem_offset
    if last is None or last >= size - 1:
        keep = mag >= lo
    elif last < 0:
        keep = mag > lo
    else:
        keep = _with_ties(mag, lo, mag > lo, None, last + 1)
    if hi is not None:
        first = None if hi_first is None else hi_first - elem_offset
        if first is None or first <= 0:
            keep &= mag <= hi
        elif first >= size:
            keep &= mag < hi
        else:
            keep &= _with_ties(mag, hi, mag < hi, first, None)
    return keep


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


__all__ = [
    "Rank",
    "StreamReader",
    "abs_bits",
    "keep_in_window",
    "kth_largest_abs",
    "kth_largest_abs_streaming",
    "rank_streaming",
]
