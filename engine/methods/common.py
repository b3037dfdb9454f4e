"""Shared pieces of the classic (mergekit-compatible) methods.

- input/parameter checks with error messages that name the tensor;
- `RowSum`: a float64 sum over a tensor seen in row chunks that is bit-identical whatever the chunking or thread
  count (SLERP norms and dot product, L1 rescale factors);
- magnitude sparsification (mergekit's `magnitude` and `magnitude_outliers`) as per-expert |tau| windows whose
  bounds come from the exact streaming selection in `select.py`;
- `combine_deltas`: mergekit's generalized task arithmetic (weights, TIES "sum" sign consensus, divisor, lambda);
- the fused kernel path: `on_kernel_device` / `fused_merge` / `window_thresholds`: chunks on CUDA are merged by
  ONE call of `shardmerge.kernels.interpolate.interpolate` (the Triton kernel); CPU chunks keep the eager torch code above,
  whose operation order the kernel's torch reference restates bit for bit (tests/kernels/test_kernel_wiring.py);
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardmerge.engine.methods.base import Chunk, ChunkReader, Param, TensorInfo
from shardmerge.engine.methods.select import keep_in_window, rank_streaming
from shardmerge.kernels._util import use_triton
from shardmerge.kernels.interpolate import interpolate

RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor: no rescale when either L1 norm is below this


# ----------------------------------------------------------------------------------------------- declarations
MERGEKIT_URL = "https://github.com/arcee-ai/mergekit/blob/v0.1.5/docs/merge_methods.md"
WEIGHT = Param("weight", per_model=True, doc="the model's weight in the sum")
DENSITY = Param(
    "density",
    default=1.0,
    per_model=True,
    lo=0,
    lo_open=True,
    hi=1,
    doc="fraction of the task vector's entries kept (1 = all)",
)


def gta_params(normalize: bool, rescale: bool = False) -> tuple[Param, ...]:
    """mergekit's generalized task arithmetic globals (normalize default differs per method), in the order the
    plan hash has always seen them."""
    return (
        Param("int8_mask", "bool", False, doc="accepted for mergekit recipes; no numeric effect"),
        Param("normalize", "bool", normalize, doc="divide by the sum of the (agreeing) weights"),
        Param("rescale", "bool", rescale, doc="rescale kept entries to the task vector's L1 norm"),
        Param("lambda", "float", 1.0, doc="scale of the merged task vector"),
    )


# ----------------------------------------------------------------------------------------------- checks
def per_model(name: str, values: Any, n: int, info: TensorInfo) -> tuple[float, ...]:
    """A per-model parameter as a tuple of n finite floats (the engine passes tuples aligned with `tensors`)."""
    if not isinstance(values, (tuple, list)) or len(values) != n:
        raise ValueError(
            f"tensor {info.name!r}: per-model parameter {name!r} must be a tuple of {n} values "
            f"(one per non-base input), got {values!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"tensor {info.name!r}: parameter {name!r} must hold finite numbers, got {values!r}")
        out.append(float(v))
    return tuple(out)


def check_fraction(name: str, values: Sequence[float], info: TensorInfo, upper: float | None = None) -> None:
    """density/gamma must be >= 0 (and <= upper when given); mergekit treats density >= 1 as 'keep all'."""
    for v in values:
        if v < 0 or (upper is not None and v > upper):
            bound = f"[0, {upper}]" if upper is not None else ">= 0"
            raise ValueError(f"tensor {info.name!r}: {name} must be {bound}, got {v!r}")


def check_inputs(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, info: TensorInfo, needs_base: bool
) -> None:
    """Every input float32 and of one shape; the base present when the method needs one."""
    if not tensors:
        raise ValueError(f"tensor {info.name!r}: no input tensors to merge")
    if needs_base and base is None:
        raise ValueError(f"tensor {info.name!r}: this method needs a base model; add base_model to the recipe")
    shape = tensors[0].shape
    for i, t in enumerate(list(tensors) + ([base] if base is not None else [])):
        if t.dtype != torch.float32:
            raise ValueError(f"tensor {info.name!r}: input {i} is {t.dtype}, expected float32 from the engine")
        if t.shape != shape:
            raise ValueError(f"tensor {info.name!r}: input {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def numel_of(info: TensorInfo) -> int:
    return math.prod(info.shape)


# ----------------------------------------------------------------------------------------------- chunk-proof sums
def pairwise_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum each row of a 2-D tensor by a fixed pairwise tree of elementwise additions.

    Why not torch.sum: its association order depends on the tensor's shape and the thread count (a 1-row chunk
    is split across threads, a many-row one is not: with 2 threads, 8 of 13 rows of 70001 floats summed
    differently alone than in one 13-row call), so per-chunk partials would change with the chunking. Here a
    row's result depends only on its own values and the row length. Pairwise summation is also accurate."""
    rows, width = x.shape
    if width == 0:
        return torch.zeros(rows, dtype=x.dtype, device=x.device)
    w = 1 << (width.bit_length() - 1)  # largest power of two <= width: fold the tail onto the head
    if w != width:
        head = x[:, :w].clone()
        head[:, : width - w] += x[:, w:]
        x = head
    while w > 1:
        w //= 2
        x = x[:, :w] + x[:, w:]
    return x[:, 0]


class RowSum:
    """Sum of a per-element float64 quantity over a whole tensor that arrives in row chunks, bit-identical
    whatever the chunking: each row is reduced by `pairwise_rows`, and the per-row partials of all chunks are
    concatenated in row order and reduced once the same way."""

    def __init__(self, label: str = "sum") -> None:
        self._label = label
        self._rows: list[torch.Tensor] = []

    def add(self, values: torch.Tensor) -> None:
        """Add one chunk (rows along dim 0; a 0-d/1-d tensor is a single row) of float64 values."""
        if values.dtype != torch.float64:
            raise ValueError(f"{self._label}: RowSum expects float64 values, got {values.dtype}")
        rows = values.reshape(1, -1) if values.dim() <= 1 else values.reshape(values.shape[0], -1)
        self._rows.append(pairwise_rows(rows))

    def value(self) -> float:
        """The total; refuses NaN/inf, which would silently turn the merged tensor into NaN."""
        if not self._rows:
            return 0.0
        total = float(pairwise_rows(torch.cat(self._rows).reshape(1, -1))[0])
        if not math.isfinite(total):
            raise ValueError(f"{self._label}: the sum is {total}; expected finite weights (inf/NaN in the input?)")
        return total


# ----------------------------------------------------------------------------------------------- sparsification
@dataclass(frozen=True)
class Window:
    """The entries of one expert's tau that survive: lo <= |tau| <= hi (None = unbounded); drop_all keeps none.
    Exactly-k cuts inside ties (select.py ranks ties by flat index): of the entries with |tau| == lo only those at
    flat index <= lo_last survive, of those with |tau| == hi only those at flat index >= hi_first (None: all)."""

    lo: float | None = None
    hi: float | None = None
    drop_all: bool = False
    lo_last: int | None = None
    hi_first: int | None = None

    @property
    def keeps_all(self) -> bool:
        return not self.drop_all and self.lo is None and self.hi is None


@dataclass(frozen=True)
class SparsifyStats:
    """Per-expert windows and L1 rescale multipliers (1.0 = none); small and picklable, shipped to workers."""

    windows: tuple[Window, ...]
    scales: tuple[float, ...]


def magnitude_ks(n: int, density: float) -> tuple[int, int | None] | None:
    """mergekit `magnitude`: keep the top k = max(1, int(density * n)) |tau|. Returns (k_lo, k_hi) ranks from the
    top (k_hi None = no upper bound), None to keep all (density >= 1), (0, None) to drop all."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return (0, None)
    return (max(1, int(density * n)), None)


def outlier_ks(n: int, density: float, gamma: float) -> tuple[int, int | None] | None:
    """mergekit `magnitude_outliers`: drop the int(gamma * n) largest |tau| (fewer when needed to keep the target),
    then keep the next int(density * n). In descending rank: keep ranks [drop_top, drop_top + target_n)."""
    if density >= 1:
        return None
    target_n = int(density * n)
    if target_n <= 0:
        return (0, None)
    n_bot = max(0, n - target_n - int(gamma * n))
    drop_top = n - n_bot - target_n
    return (drop_top + target_n, drop_top + 1 if drop_top > 0 else None)


def _taus(read: ChunkReader, experts: Sequence[int]):
    """A stream reader of tau_e = theta_e - theta_0 for the chosen experts, chunk by chunk."""
    return lambda: ([tensors[e] - base for e in experts] for _, tensors, base in read())


def select_windows(
    read: ChunkReader, ks: Sequence[tuple[int, int | None] | None], info: TensorInfo
) -> tuple[Window, ...]:
    """Turn per-expert rank bounds into exact |tau| windows that keep exactly the ranks asked for: two streaming
    passes, plus one when a bound cuts through tied magnitudes (none at all if nothing is to be selected)."""
    chosen = [e for e, k in enumerate(ks) if k is not None and k[0] > 0]
    wanted = [[ks[e][0]] + ([ks[e][1]] if ks[e][1] is not None else []) for e in chosen]

    def cuts_ties(_i: int, j: int, r) -> bool:  # j 0: lower bound (keep the first `need` ties), 1: upper bound
        return r.need < r.ties if j == 0 else r.need > 1

    found = rank_streaming(_taus(read, chosen), wanted, label=f"tensor {info.name!r}", locate=cuts_ties)
    windows = []
    for e, k in enumerate(ks):
        if k is None:
            windows.append(Window())
        elif k[0] == 0:
            windows.append(Window(drop_all=True))
        else:
            lo, *hi = found[chosen.index(e)]
            windows.append(
                Window(
                    lo=lo.value, hi=hi[0].value if hi else None, lo_last=lo.index, hi_first=hi[0].index if hi else None
                )
            )
    return tuple(windows)


def window_mask(tau: torch.Tensor, window: Window, elem_offset: int = 0) -> torch.Tensor | None:
    """Boolean keep mask of tau (a chunk starting at flat index `elem_offset`) for a window (None: keep all)."""
    if window.keeps_all:
        return None
    if window.drop_all:
        return torch.zeros_like(tau, dtype=torch.bool)
    return keep_in_window(tau.abs(), window.lo, window.hi, window.lo_last, window.hi_first, elem_offset)


MaskFn = Callable[[int, Chunk, torch.Tensor], torch.Tensor | None]


def l1_scales(read: ChunkReader, mask_fn: MaskFn, n_experts: int, info: TensorInfo) -> tuple[float, ...]:
    """mergekit's L1 rescale (RescaleNorm.l1): per expert, sum|tau| / sum|tau * mask| over the whole tensor, 1.0
    when either is below 1e-7 or nothing is masked. One pass; RowSum sums, so independent of the chunking."""
    before = [RowSum(f"tensor {info.name!r} L1 of expert {e}") for e in range(n_experts)]
    after = [RowSum(f"tensor {info.name!r} L1 of expert {e}") for e in range(n_experts)]
    masked_any = [False] * n_experts
    for chunk, tensors, base in read():
        for e in range(n_experts):
            tau = tensors[e] - base
            keep = mask_fn(e, chunk, tau)
            if keep is None:
                continue
            masked_any[e] = True
            before[e].add(tau.abs().to(torch.float64))
            after[e].add((tau * keep).abs().to(torch.float64))
    scales = []
    for e in range(n_experts):
        b, a = before[e].value(), after[e].value()
        scales.append(b / a if masked_any[e] and b >= RESCALE_EPS and a >= RESCALE_EPS else 1.0)
    return tuple(scales)


def masked_deltas(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, chunk, mask_fn: MaskFn, scales: Sequence[float]
) -> list[torch.Tensor]:
    """Each expert's task vector on this chunk with its keep mask applied (mask_fn may return None: keep all) and
    its L1 rescale factor (from l1_scales) multiplied in: the drop-and-rescale step DARE and DELLA share."""
    deltas = []
    for e, t in enumerate(tensors):
        tau = t - base
        keep = mask_fn(e, chunk, tau)
        if keep is not None:
            tau = tau * keep
        if scales[e] != 1.0:
            tau = tau * scales[e]
        deltas.append(tau)
    return deltas


def prepare_magnitude(
    read: ChunkReader,
    info: TensorInfo,
    n_experts: int,
    density: Sequence[float],
    gamma: Sequence[float] | None,
    rescale: bool,
) -> SparsifyStats:
    """Whole-tensor statistics of TIES / breadcrumbs sparsification: 2 passes, plus 1 when `rescale` is on."""
    n = numel_of(info)
    if gamma is None:
        ks = [magnitude_ks(n, d) for d in density]
    else:
        ks = [outlier_ks(n, d, g) for d, g in zip(density, gamma)]
    windows = select_windows(read, ks, info)
    scales = (1.0,) * n_experts
    if rescale and any(not w.keeps_all and not w.drop_all for w in windows):
        scales = l1_scales(read, lambda e, c, tau: window_mask(tau, windows[e], c.elem_offset), n_experts, info)
    return SparsifyStats(windows=windows, scales=scales)


def sparsified_deltas(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, stats: SparsifyStats, elem_offset: int = 0
) -> list:
    """tau_e * mask_e * scale_e for every expert of one chunk (mergekit's sparsify + rescaled_masked_tensor)."""
    out = []
    for e, t in enumerate(tensors):
        tau = t - base
        keep = window_mask(tau, stats.windows[e], elem_offset)
        if keep is not None:
            tau = tau * keep
        if stats.scales[e] != 1.0:
            tau = tau * stats.scales[e]
        out.append(tau)
    return out


# ----------------------------------------------------------------------------------------------- combination
def combine_deltas(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """mergekit GeneralizedTaskArithmeticMerge after sparsification: weight the deltas; with consensus elect the
    sign of sum_k w_k d_k per element (ties to +) and keep only agreeing entries; divide by the (agreeing) weight
    sum when `normalize` (a zero divisor becomes 1); scale by lambda; add to the base. Elementwise, so any
    chunking gives identical bits."""
    weighted = [d * w for d, w in zip(deltas, weights)]  # fresh tensors: everything below may update them in place
    mixed = weighted[0] if len(weighted) == 1 else weighted[0] + weighted[1]
    for x in weighted[2:]:
        mixed.add_(x)
    if consensus:
        mixed, divisor = _consensus(base, weighted, weights, mixed)
    else:
        divisor = float(torch.tensor(weights, dtype=torch.float32).sum())  # float32 sum on CPU, any device
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)  # == base + mixed: IEEE addition is commutative


def _consensus(
    base: torch.Tensor, weighted: Sequence[torch.Tensor], weights: Sequence[float], mixed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election: (sum of the agreeing weighted deltas, sum of their weights with 0 -> 1).

    Written with preallocated outputs and in-place updates; every value goes through the same operations in the
    same order as `0 + x_1 [sign(x_1) == m] + x_2 [...]` with fresh tensors did, so the bits are unchanged, but no
    4-byte-per-element tensor is allocated per operation (fresh allocations page-fault: 3 x 0.1 GB TIES spent
    most of combine_deltas there)."""
    majority = torch.where(mixed >= 0, 1.0, -1.0)
    agree = torch.empty_like(base, dtype=torch.bool)
    sign = torch.empty_like(base)
    tmp = torch.empty_like(base)
    total = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for x, w in zip(weighted, weights):
        torch.sign(x, out=sign)
        torch.eq(sign, majority, out=agree)
        torch.mul(x, agree, out=tmp)
        total.add_(tmp)
        torch.mul(agree, torch.tensor(w, dtype=torch.float32, device=base.device), out=tmp)
        divisor.add_(tmp)
    divisor.masked_fill_(divisor == 0, 1.0)
    return total, divisor


# ----------------------------------------------------------------------------------------------- fused kernel path
def on_kernel_device(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> bool:
    """True when every input of the chunk is a CUDA tensor: the chunk is then merged in one pass by the fused
    Triton kernel (inputs read once, output written once) instead of one eager torch op per step. CPU chunks keep
    the eager path, which is the CPU reference the kernel is tested against."""
    return use_triton(list(tensors) + ([base] if base is not None else []))


def fused_merge(
    mode: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    weights: Sequence[float],
    chunk: Chunk,
    *,
    normalize: bool,
    lam: float = 1.0,
    **sparsify: Any,
) -> torch.Tensor:
    """Merge one chunk with a single `shardmerge.kernels.interpolate.interpolate` call (float32 out: the engine casts).

    `sparsify` holds the mode's per-expert arguments (thresholds, upper_thresholds, dare_keys, densities,
    scales); `chunk.elem_offset` places the chunk's DARE counters in the whole tensor's Philox stream."""
    return interpolate(
        list(tensors),
        tuple(weights),
        mode=mode,
        base=base,
        normalize=normalize,
        lam=lam,
        elem_offset=chunk.elem_offset,
        out_dtype=torch.float32,
        **sparsify,
    )


def _float32_above(x: float) -> float:
    """The next float32 above x (x a float32 value): turns an inclusive bound into an exclusive one."""
    one = torch.tensor(x, dtype=torch.float32)
    return float(torch.nextafter(one, torch.tensor(math.inf, dtype=torch.float32)))


def _float32_below(x: float) -> float:
    one = torch.tensor(x, dtype=torch.float32)
    return float(torch.nextafter(one, torch.tensor(-math.inf, dtype=torch.float32)))


def chunk_windows(windows: Sequence[Window], elem_offset: int, size: int) -> tuple[tuple[Window, ...], list[int]]:
    """The windows restricted to one chunk (flat positions [elem_offset, elem_offset + size)) as plain magnitude
    bounds for the fused kernel, which knows no flat index: a tie cut outside the chunk becomes an inclusive or
    exclusive bound; a cut inside it keeps the inclusive bound and the expert is listed in the second result (its
    cut-off tied entries must be removed from the kernel's inputs, `drop_cut_ties`)."""
    out, cut = [], []
    for e, w in enumerate(windows):
        lo, hi = w.lo, w.hi
        if w.lo_last is not None and w.lo_last < elem_offset + size - 1:
            if w.lo_last >= elem_offset:
                cut.append(e)
            else:
                lo = _float32_above(lo)  # the chunk lies after the cut: none of its ties at lo are kept
        if w.hi_first is not None and w.hi_first > elem_offset:
            if w.hi_first < elem_offset + size:
                cut.append(e)
            else:
                hi = _float32_below(hi)
        out.append(Window(lo=lo, hi=hi, drop_all=w.drop_all or (hi is not None and lo is not None and lo > hi)))
    return tuple(out), sorted(set(cut))


def drop_cut_ties(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, windows: Sequence[Window], cut: Sequence[int], elem_offset: int
) -> list[torch.Tensor]:
    """The inputs with every tied entry that an exactly-k cut drops set equal to the base (tau = 0, which adds
    nothing to any sum, sign vote or norm), so the kernel's magnitude bounds alone give the exact selection."""
    out = list(tensors)
    for e in cut:
        tau = tensors[e] - base
        bounds = Window(lo=windows[e].lo, hi=windows[e].hi)
        drop = ~window_mask(tau, windows[e], elem_offset) & window_mask(tau, bounds)
        out[e] = torch.where(drop, base, tensors[e])
    return out


def window_thresholds(windows: Sequence[Window]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The windows as interpolate's per-expert (thresholds, upper_thresholds): keep lo <= |tau| < hi.

    A Window's hi is inclusive (the largest kept magnitude, a float32 value from select.py) and the kernel's is
    exclusive, so hi becomes the next float32 above it: for float32 |tau| both keep exactly the same entries.
    keep-all is (0, inf); drop-all is (inf, inf), which keeps no finite entry."""
    lo, hi = [], []
    for w in windows:
        if w.drop_all:
            lo.append(math.inf)
            hi.append(math.inf)
            continue
        lo.append(0.0 if w.lo is None else float(w.lo))
        hi.append(math.inf if w.hi is None else _float32_above(float(w.hi)))
    return tuple(lo), tuple(hi)


def windowed_merge(mode: str, consensus: bool):
    """The per-chunk merge of every magnitude-window method (ties, breadcrumbs, breadcrumbs_ties): apply the
    prepared per-expert |tau| windows and L1 scales, then sum or TIES-combine the weighted task vectors.
    CUDA chunks take one fused kernel call with the same windows and scales."""
    upper = mode != "ties"  # TIES windows have no upper bound

    def merge(
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        *,
        stats: SparsifyStats,
        chunk: Chunk,
        info: TensorInfo,
        **params,
    ) -> torch.Tensor:
        check_inputs(tensors, base, info, needs_base=True)
        weights = per_model("weight", params["weight"], len(tensors), info)
        normalize, lam = bool(params["normalize"]), float(params["lambda"])
        if on_kernel_device(tensors, base):
            windows, cut = chunk_windows(stats.windows, chunk.elem_offset, base.numel())
            tensors = drop_cut_ties(tensors, base, stats.windows, cut, chunk.elem_offset) if cut else tensors
            lo, hi = window_thresholds(windows)
            extra = {"upper_thresholds": hi} if upper else {}
            return fused_merge(
                mode,
                tensors,
                base,
                weights,
                chunk,
                normalize=normalize,
                lam=lam,
                thresholds=lo,
                scales=stats.scales,
                **extra,
            )
        deltas = sparsified_deltas(tensors, base, stats, chunk.elem_offset)
        return combine_deltas(base, deltas, weights, consensus=consensus, normalize=normalize, lam=lam)

    merge.__doc__ = windowed_merge.__doc__
    return merge
