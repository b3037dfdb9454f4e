"""PivotMerge's fused step on shared-subspace coordinates, batched over B same-shape matrices (engine/methods/pivot.py
is the spec and the only caller).

For matrix b with coordinates C_bk (r × s) of each expert k in the shared basis:
  noise floor   entries with |C_bk| <= floor_b neither vote nor conflict (and are kept): rounding noise
  vote          sign(C_bk) times ||C_bk||² ("expert_energy"), C_bk² ("entry_energy"), |C_bk| ("magnitude") or 1
                ("count"); score = Σ_k vote; a tie (|score| <= tie_rtol · Σ_k |vote|) elects no sign
  suppress      conflict = above the floor and sign(C_bk) not the elected sign (every such entry on a tie)
  combine       M_b = Σ_k λ_bk C̃_bk (no normalisation), plus the number of conflicts per matrix

`_pivot_filter_kernel` (Triton) + `pivot_filter_coords_triton()` / `pivot_filter_coords_reference()` (torch, also
the CPU path) + `pivot_filter_coords()` dispatcher. The projections into and out of the shared basis stay torch
matmuls.
"""

from __future__ import annotations

import functools
import math

import torch

from shardmerge.kernels._util import check_float_dtype, import_triton

PIVOT_SIGN_WEIGHTS = ("expert_energy", "entry_energy", "magnitude", "count")  # kernel constexpr WEIGHT = index
# Entries of C per Triton program; not tuned on hardware yet (C is small: r × s per matrix and expert).
BLOCK = 1024


def _batched(name: str, t: torch.Tensor, ndim: int, what: str) -> tuple[torch.Tensor, bool]:
    """Return t with a leading batch dim (adding one if t has ndim − 1 dims) and whether it was added."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
    if t.dim() == ndim - 1:
        return t.unsqueeze(0), True
    if t.dim() != ndim:
        raise ValueError(f"{name}: {what} has shape {tuple(t.shape)}; expected {ndim} or {ndim - 1} dims")
    return t, False


def _per_bk(name: str, v, b: int, k: int, what: str, device) -> torch.Tensor | None:
    """Per-(matrix, expert) values as a float32 (B, K) tensor; a (K,) input is shared across the batch."""
    if v is None:
        return None
    v = torch.as_tensor(v, dtype=torch.float32).to(device)
    if v.dim() == 1 and v.shape[0] == k:
        v = v.expand(b, k)
    if tuple(v.shape) != (b, k):
        raise ValueError(f"{name}: {what} has shape {tuple(v.shape)}; expected ({b}, {k}) or ({k},)")
    if torch.isnan(v).any():
        raise ValueError(f"{name}: {what} contains NaN")
    return v.contiguous()


def _check_pivot_args(name, coords, lambdas, floor, sign_weight, tie_rtol):
    c, squeezed = _batched(name, coords, 4, "coords (B, K, r, s)")
    check_float_dtype(name, c, "coords")
    if sign_weight not in PIVOT_SIGN_WEIGHTS:
        raise ValueError(f"{name}: unknown sign_weight {sign_weight!r}; expected one of {PIVOT_SIGN_WEIGHTS}")
    if not (isinstance(tie_rtol, (int, float)) and math.isfinite(tie_rtol) and tie_rtol >= 0):
        raise ValueError(f"{name}: tie_rtol must be a finite number >= 0, got {tie_rtol!r}")
    b, k = c.shape[:2]
    lam = _per_bk(name, lambdas, b, k, "lambdas", c.device)
    if lam is None or not torch.isfinite(lam).all():
        raise ValueError(f"{name}: lambdas must be finite, one per (matrix, expert); got {lambdas!r}")
    fl = torch.as_tensor(floor, dtype=torch.float32).to(c.device)
    fl = fl.expand(b) if fl.dim() == 0 else fl
    if tuple(fl.shape) != (b,) or torch.isnan(fl).any() or (fl < 0).any():
        raise ValueError(f"{name}: floor must be one number >= 0 per matrix, shape ({b},) or a scalar; got {floor!r}")
    return c, squeezed, lam, fl.contiguous()


def pivot_filter_coords_reference(
    coords: torch.Tensor, lambdas, *, floor, sign_weight: str = "expert_energy", tie_rtol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """PivotMerge's noise floor, weighted sign election, suppression and combine in plain torch (the same
    operations in the same order as engine/methods/pivot.py's CPU path, so its results are bit-identical).
    Returns (merged (B, r, s) float32, conflicts (B,) int64); arguments as in `pivot_filter_coords`."""
    c, squeezed, lam, fl = _check_pivot_args(
        "pivot_filter_coords_reference", coords, lambdas, floor, sign_weight, tie_rtol
    )
    c = c.float()
    real = c.abs() > fl[:, None, None, None]
    sign = torch.where(real, c.sign(), torch.zeros_like(c))
    if sign_weight == "expert_energy":
        vote = sign * c.square().sum(dim=(2, 3))[..., None, None]
    else:
        vote = {"entry_energy": sign * c.square(), "magnitude": sign * c.abs(), "count": sign}[sign_weight]
    score = vote.sum(dim=1)
    tie = score.abs() <= tie_rtol * vote.abs().sum(dim=1)
    elected = torch.where(tie, torch.zeros_like(score), score.sign())
    conflict = real & (sign * elected[:, None] <= 0)
    merged = (lam[..., None, None] * torch.where(conflict, torch.zeros_like(c), c)).sum(dim=1)
    conflicts = conflict.flatten(1).sum(dim=1)
    return (merged[0], conflicts[0]) if squeezed else (merged, conflicts)


# Bound by _pivot_kernels() on first launch: `tl` and the @triton.jit kernel.
tl = _pivot_filter_kernel = None


@functools.lru_cache(maxsize=1)
def _pivot_kernels():
    """Define PivotMerge's fused kernel on first use (see `_kernels`)."""
    global tl, _pivot_filter_kernel
    triton, tl = import_triton()

    @triton.jit
    def _pivot_filter_kernel(
        c_ptr,
        lam_ptr,
        energy_ptr,
        floor_ptr,
        out_ptr,
        count_ptr,
        RS,
        NBLK,
        tie_rtol,
        K: tl.constexpr,
        WEIGHT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One pass over the K experts: the merge for each possible outcome (+, -, tie, no sign when the score is
        # NaN) is accumulated in expert order, as the reference sums, and the election picks one at the end.
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        j = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = j < RS
        floor = tl.load(floor_ptr + b)
        score = tl.zeros([BLOCK], tl.float32)
        total = tl.zeros([BLOCK], tl.float32)  # Σ |vote|
        up = tl.zeros([BLOCK], tl.float32)  # Σ λ C over entries kept when + wins (noise and positive) ...
        down = tl.zeros([BLOCK], tl.float32)  # ... when − wins, on a tie (noise only) and with no sign (all)
        tied = tl.zeros([BLOCK], tl.float32)
        every = tl.zeros([BLOCK], tl.float32)
        npos = tl.zeros([BLOCK], tl.int32)
        nneg = tl.zeros([BLOCK], tl.int32)
        for k in tl.static_range(K):
            c = tl.load(c_ptr + (b * K + k) * RS + j, mask=valid, other=0.0).to(tl.float32)
            real = tl.abs(c) > floor
            pos = real & (c > 0)
            neg = real & (c < 0)
            sgn = tl.where(pos, 1.0, tl.where(neg, -1.0, 0.0))
            if WEIGHT == 0:
                vote = sgn * tl.load(energy_ptr + b * K + k)
            elif WEIGHT == 1:
                vote = sgn * (c * c)
            elif WEIGHT == 2:
                vote = sgn * tl.abs(c)
            else:
                vote = sgn
            score += vote
            total += tl.abs(vote)
            x = tl.load(lam_ptr + b * K + k) * c
            up += tl.where(neg, 0.0, x)
            down += tl.where(pos, 0.0, x)
            tied += tl.where(real, 0.0, x)
            every += x
            npos += pos.to(tl.int32)
            nneg += neg.to(tl.int32)
        tie = tl.abs(score) <= tie_rtol * total
        merged = tl.where(tie, tied, tl.where(score > 0, up, tl.where(score < 0, down, every)))
        conflicts = tl.where(tie, npos + nneg, tl.where(score > 0, nneg, tl.where(score < 0, npos, 0)))
        tl.store(out_ptr + b * RS + j, merged, mask=valid)
        tl.store(count_ptr + b * NBLK + blk, tl.sum(tl.where(valid, conflicts, 0), axis=0))

    return triton, _pivot_filter_kernel


def pivot_filter_coords_triton(
    coords: torch.Tensor,
    lambdas,
    *,
    floor,
    sign_weight: str = "expert_energy",
    tie_rtol: float = 1e-5,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PivotMerge's fused step in Triton (CUDA, or CPU under TRITON_INTERPRET=1); as the reference. Conflicts are
    counted per block and summed in torch (deterministic, no atomics); expert energies are a torch reduction."""
    c, squeezed, lam, fl = _check_pivot_args(
        "pivot_filter_coords_triton", coords, lambdas, floor, sign_weight, tie_rtol
    )
    if block < 16 or block & (block - 1):
        raise ValueError(f"pivot_filter_coords_triton: block must be a power of two >= 16, got {block}")
    triton, kernel = _pivot_kernels()
    c = c.contiguous()
    b, k, r, s = c.shape
    energy = c.float().square().sum(dim=(2, 3)).contiguous() if sign_weight == "expert_energy" else lam
    nblk = triton.cdiv(r * s, block)
    out = torch.empty((b, r, s), dtype=torch.float32, device=c.device)
    counts = torch.zeros((b, max(nblk, 1)), dtype=torch.int32, device=c.device)
    if out.numel() and k:
        kernel[(b, nblk)](
            c,
            lam,
            energy,
            fl,
            out,
            counts,
            r * s,
            nblk,
            float(tie_rtol),
            K=k,
            WEIGHT=PIVOT_SIGN_WEIGHTS.index(sign_weight),
            BLOCK=block,
        )
    elif out.numel():
        out.zero_()
    conflicts = counts.sum(dim=1)
    return (out[0], conflicts[0]) if squeezed else (out, conflicts)


def pivot_filter_coords(
    coords: torch.Tensor, lambdas, *, floor, sign_weight: str = "expert_energy", tie_rtol: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k λ_bk C̃_bk under PivotMerge's election, and the conflict count; Triton for CUDA coords, torch otherwise.

    coords: (B, K, r, s) shared coordinates C (or (K, r, s) for one matrix). lambdas: λ per (matrix, expert), (B, K)
    or (K,). floor: the noise floor per matrix, (B,) or a scalar (|C| <= floor neither votes nor conflicts).
    sign_weight: one of PIVOT_SIGN_WEIGHTS. tie_rtol: |score| <= tie_rtol · Σ|votes| elects no sign.
    Returns (merged (B, r, s) float32, conflicts (B,) int64: entries of C zeroed), unbatched for 3-d coords.
    """
    fn = pivot_filter_coords_triton if coords.is_cuda else pivot_filter_coords_reference
    return fn(coords, lambdas, floor=floor, sign_weight=sign_weight, tie_rtol=tie_rtol)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports here (callers with a torch fallback ask before choosing the kernel path)."""
    try:
        import_triton()
    except RuntimeError:
        return False
    return True
