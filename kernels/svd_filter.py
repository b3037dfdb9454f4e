"""Shared-subspace filtering of K task-vector matrices, batched over B same-shape matrices (PivotMerge, SVD methods).

For each matrix b (e.g. a projector layer) with shared bases U_b (m × r) and V_b (n × s) and experts k:

  project       C_bk = U_bᵀ Δ_bk V_b                                        (torch matmul / cuBLAS)
  trim          C_bk[i,j] = 0 where |C_bk[i,j]| < thr_bk                    (magnitude trim, shared coordinates)
  elect         d_bk = λ_bk C_bk;  vote = Σ_k d_bk·|C_bk| ("energy": each expert votes with its energy C², signed)
                or Σ_k d_bk ("sum", TIES's rule);  m = +1 if vote >= 0 else −1
  suppress      C̃_bk = C_bk where sign(d_bk) == m, else 0                   (minority-sign entries dropped)
  combine       M_b = Σ_k λ_bk C̃_bk   (/ Σ_k λ_bk [sign(d_bk) == m], 0 -> 1, when normalize)
  reconstruct   out_b = U_b M_b V_bᵀ                                         (torch matmul / cuBLAS)

The trim/elect/suppress/combine step is one fused elementwise Triton kernel (`_filter_kernel`) reading every C entry
once; the matmuls stay in torch. Bases may be zero-padded to a common rank across the batch (`shared_basis` does
this): a zero column contributes nothing. Everything is float32; the result is cast to `out_dtype`.

PivotMerge elects differently (engine/methods/pivot.py is the spec; `pivot_filter_coords` fuses its rule):
  noise floor   entries with |C_bk| <= floor_b neither vote nor conflict (and are kept): rounding noise
  vote          sign(C_bk) times ||C_bk||² ("expert_energy"), C_bk² ("entry_energy"), |C_bk| ("magnitude") or 1
                ("count"); score = Σ_k vote; a tie (|score| <= tie_rtol · Σ_k |vote|) elects no sign
  suppress      conflict = above the floor and sign(C_bk) not the elected sign (every such entry on a tie)
  combine       M_b = Σ_k λ_bk C̃_bk (no normalisation), plus the number of conflicts per matrix

Files: `_filter_kernel` + `filter_coords_triton()` / `filter_coords_reference()` / `filter_coords()` for the fused
step; `svd_filter_triton()` / `svd_filter_reference()` / `svd_filter()` for the whole op; `project`, `reconstruct`,
`shared_thresholds` and `shared_basis` helpers; `_pivot_filter_kernel` + `pivot_filter_coords_triton()` /
`pivot_filter_coords_reference()` / `pivot_filter_coords()` for PivotMerge's fused step.
"""

from __future__ import annotations

import functools
import math

import torch

from shardmerge.kernels._util import check_float_dtype, import_triton

ELECTIONS = ("energy", "sum")
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


def _check_filter_args(name, coords, lambdas, thresholds, election):
    c, squeezed = _batched(name, coords, 4, "coords (B, K, r, s)")
    check_float_dtype(name, c, "coords")
    if election not in ELECTIONS:
        raise ValueError(f"{name}: unknown election {election!r}; expected one of {ELECTIONS}")
    b, k = c.shape[:2]
    lam = _per_bk(name, lambdas, b, k, "lambdas", c.device)
    if lam is None or not torch.isfinite(lam).all():
        raise ValueError(f"{name}: lambdas must be finite, one per (matrix, expert); got {lambdas!r}")
    thr = _per_bk(name, thresholds, b, k, "thresholds", c.device)
    if thr is not None and (thr < 0).any():
        raise ValueError(f"{name}: thresholds must be >= 0, got {thresholds!r}")
    return c, squeezed, lam, thr


def project(deltas: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """C = Uᵀ Δ V in float32: deltas (B, K, m, n) or (K, m, n), U (B, m, r) or (m, r), V (B, n, s) or (n, s)."""
    d, squeezed = _batched("project", deltas, 4, "deltas (B, K, m, n)")
    u, _ = _batched("project", U, 3, "U (B, m, r)")
    v, _ = _batched("project", V, 3, "V (B, n, s)")
    b, _, m, n = d.shape
    if u.shape[0] not in (1, b) or v.shape[0] not in (1, b) or u.shape[1] != m or v.shape[1] != n:
        raise ValueError(
            f"project: U {tuple(U.shape)} / V {tuple(V.shape)} do not fit deltas {tuple(deltas.shape)}"
            f"; expected U (B, {m}, r) and V (B, {n}, s) with B = {b} or 1"
        )
    c = u.float().transpose(-1, -2).unsqueeze(1) @ d.float() @ v.float().unsqueeze(1)
    return c.squeeze(0) if squeezed else c


def reconstruct(
    merged: torch.Tensor, U: torch.Tensor, V: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """U M Vᵀ for merged (B, r, s) or (r, s), cast to out_dtype."""
    mm, squeezed = _batched("reconstruct", merged, 3, "merged (B, r, s)")
    u, _ = _batched("reconstruct", U, 3, "U (B, m, r)")
    v, _ = _batched("reconstruct", V, 3, "V (B, n, s)")
    out = (u.float() @ mm.float() @ v.float().transpose(-1, -2)).to(out_dtype)
    return out.squeeze(0) if squeezed else out


def shared_thresholds(coords: torch.Tensor, density: float) -> torch.Tensor:
    """Per-(matrix, expert) trim thresholds keeping the top `density` fraction of |C| (the TIES count rule:
    k = max(1, int(density · r·s)); density >= 1 -> 0, density <= 0 -> inf). Shape (B, K), or (K,) for 3-d input."""
    c, squeezed = _batched("shared_thresholds", coords, 4, "coords (B, K, r, s)")
    density = float(density)
    if math.isnan(density):
        raise ValueError("shared_thresholds: density is NaN; expected a number in [0, 1]")
    flat = c.detach().float().abs().flatten(2)
    if density >= 1:
        thr = torch.zeros(flat.shape[:2])
    elif density <= 0 or flat.shape[2] == 0:
        thr = torch.full(flat.shape[:2], math.inf)
    else:
        k = max(1, int(density * flat.shape[2]))
        thr = torch.topk(flat, k, dim=2, sorted=False).values.amin(dim=2).cpu()
    return thr.squeeze(0) if squeezed else thr


def shared_basis(deltas: torch.Tensor, energy: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PivotMerge step 2: U_s from the SVD of [Δ_1 … Δ_K] (m × Kn), V_s from that of [Δ_1; …; Δ_K] (Km × n),
    each keeping the fewest top directions holding `energy` of Σσ². Returns U (B, m, r), V (B, n, s), ranks (B, 2)
    (r_U, r_V per matrix); columns past a matrix's own rank are zero so the batch shares one r and one s."""
    d, squeezed = _batched("shared_basis", deltas, 4, "deltas (B, K, m, n)")
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"shared_basis: energy must be in (0, 1], got {energy!r}")
    b, k, m, n = d.shape
    d = d.float()
    u_full, su, _ = torch.linalg.svd(d.permute(0, 2, 1, 3).reshape(b, m, k * n), full_matrices=False)
    _, sv, vh_full = torch.linalg.svd(d.reshape(b, k * m, n), full_matrices=False)

    def rank(s: torch.Tensor) -> torch.Tensor:
        e = s.square().cumsum(-1)
        return ((e < float(energy) * e[..., -1:]).sum(-1) + 1).clamp(max=s.shape[-1])

    ru, rv = rank(su), rank(sv)
    cu = torch.arange(int(ru.max()), device=d.device)
    cv = torch.arange(int(rv.max()), device=d.device)
    U = u_full[..., : cu.numel()] * (cu < ru[:, None].to(d.device))[:, None, :]
    V = vh_full[:, : cv.numel(), :].transpose(-1, -2) * (cv < rv[:, None].to(d.device))[:, None, :]
    ranks = torch.stack([ru, rv], dim=1).cpu()
    return (U[0], V[0], ranks[0]) if squeezed else (U, V, ranks)


# ------------------------------------------------------------------------------------------------ torch reference


def filter_coords_reference(
    coords: torch.Tensor, lambdas, *, thresholds=None, election: str = "energy", normalize: bool = False
) -> torch.Tensor:
    """Trim, elect, suppress and combine in plain torch: coords (B, K, r, s) -> merged (B, r, s), float32."""
    c, squeezed, lam, thr = _check_filter_args("filter_coords_reference", coords, lambdas, thresholds, election)
    c = c.float()
    if thr is not None:
        c = c * (c.abs() >= thr[..., None, None])
    w = lam[..., None, None]
    d = w * c
    vote = (d * c.abs() if election == "energy" else d).sum(dim=1)
    majority = torch.where(vote >= 0, 1.0, -1.0)
    agree = d.sign() == majority[:, None]
    merged = (d * agree).sum(dim=1)
    if normalize:
        divisor = (w * agree).sum(dim=1)
        divisor[divisor == 0] = 1
        merged = merged / divisor
    return merged.squeeze(0) if squeezed else merged


def svd_filter_reference(
    deltas: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    lambdas,
    *,
    thresholds=None,
    density: float | None = None,
    election: str = "energy",
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The whole op in plain torch; arguments as in `svd_filter`."""
    return _svd_filter(
        filter_coords_reference, deltas, U, V, lambdas, thresholds, density, election, normalize, out_dtype
    )


def _svd_filter(filter_fn, deltas, U, V, lambdas, thresholds, density, election, normalize, out_dtype):
    if thresholds is not None and density is not None:
        raise ValueError("svd_filter: pass thresholds or density, not both")
    check_float_dtype("svd_filter", deltas, "deltas")
    coords = project(deltas, U, V)
    if density is not None:
        thresholds = shared_thresholds(coords, density)
    merged = filter_fn(coords, lambdas, thresholds=thresholds, election=election, normalize=normalize)
    return reconstruct(merged, U, V, out_dtype or deltas.dtype)


# ------------------------------------------------------------------------------------------------------- Triton

# Bound by _kernels() on first launch: `tl` and the @triton.jit kernel.
tl = _filter_kernel = None


@functools.lru_cache(maxsize=1)
def _kernels():
    """Define the Triton kernel on first use (see shardmerge.kernels._util); bound as module globals, as Triton resolves names
    through the module's globals, not closures."""
    global tl, _filter_kernel
    triton, tl = import_triton()

    @triton.jit
    def _filter_kernel(
        c_ptr,
        lam_ptr,
        thr_ptr,
        out_ptr,
        RS,
        K: tl.constexpr,
        ENERGY: tl.constexpr,
        TRIM: tl.constexpr,
        NORMALIZE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = j < RS
        vote = tl.zeros([BLOCK], tl.float32)
        pos = tl.zeros([BLOCK], tl.float32)  # Σ positive d and their λ ...
        neg = tl.zeros([BLOCK], tl.float32)  # ... and the same for negative d
        wpos = tl.zeros([BLOCK], tl.float32)
        wneg = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(K):
            c = tl.load(c_ptr + (b * K + k) * RS + j, mask=valid, other=0.0).to(tl.float32)
            if TRIM:
                c = tl.where(tl.abs(c) >= tl.load(thr_ptr + b * K + k), c, 0.0)
            w = tl.load(lam_ptr + b * K + k)
            d = w * c
            if ENERGY:
                vote += d * tl.abs(c)
            else:
                vote += d
            pos += tl.where(d > 0, d, 0.0)
            neg += tl.where(d < 0, d, 0.0)
            wpos += tl.where(d > 0, w, 0.0)
            wneg += tl.where(d < 0, w, 0.0)
        up = vote >= 0
        merged = tl.where(up, pos, neg)
        if NORMALIZE:
            div = tl.where(up, wpos, wneg)
            merged = merged / tl.where(div == 0.0, 1.0, div)
        tl.store(out_ptr + b * RS + j, merged, mask=valid)

    return triton, _filter_kernel


def filter_coords_triton(
    coords: torch.Tensor,
    lambdas,
    *,
    thresholds=None,
    election: str = "energy",
    normalize: bool = False,
    block: int = BLOCK,
) -> torch.Tensor:
    """The fused Triton trim/elect/suppress/combine (CUDA, or CPU under TRITON_INTERPRET=1); as the reference."""
    c, squeezed, lam, thr = _check_filter_args("filter_coords_triton", coords, lambdas, thresholds, election)
    if block < 16 or block & (block - 1):
        raise ValueError(f"filter_coords_triton: block must be a power of two >= 16, got {block}")
    triton, kernel = _kernels()
    c = c.contiguous()
    b, k, r, s = c.shape
    out = torch.empty((b, r, s), dtype=torch.float32, device=c.device)
    if out.numel():
        kernel[(b, triton.cdiv(r * s, block))](
            c,
            lam,
            thr if thr is not None else lam,
            out,
            r * s,
            K=k,
            ENERGY=election == "energy",
            TRIM=thr is not None,
            NORMALIZE=bool(normalize),
            BLOCK=block,
        )
    return out.squeeze(0) if squeezed else out


def filter_coords(
    coords: torch.Tensor, lambdas, *, thresholds=None, election: str = "energy", normalize: bool = False
) -> torch.Tensor:
    """Dispatcher for the fused step: Triton for CUDA coords, the torch reference otherwise."""
    fn = filter_coords_triton if coords.is_cuda else filter_coords_reference
    return fn(coords, lambdas, thresholds=thresholds, election=election, normalize=normalize)


def svd_filter_triton(
    deltas: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    lambdas,
    *,
    thresholds=None,
    density: float | None = None,
    election: str = "energy",
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The whole op with the fused step in Triton (matmuls in torch); arguments as in `svd_filter`."""
    return _svd_filter(filter_coords_triton, deltas, U, V, lambdas, thresholds, density, election, normalize, out_dtype)


def svd_filter(
    deltas: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    lambdas,
    *,
    thresholds=None,
    density: float | None = None,
    election: str = "energy",
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """U (Σ_k λ_k C̃_k) Vᵀ for B same-shape matrices; Triton for the fused step on CUDA, torch otherwise.

    deltas: (B, K, m, n) task vectors (or (K, m, n) for one matrix); U: (B, m, r); V: (B, n, s) (or unbatched).
    lambdas: λ per (matrix, expert), shape (B, K) or (K,). thresholds: trim |C_bk| below thr_bk, (B, K) or (K,);
    or density: thresholds from `shared_thresholds`. election: "energy" (vote Σ λ C·|C|) or "sum" (Σ λ C).
    normalize: disjoint mean (divide by the agreeing λ sum). out_dtype: default deltas.dtype.
    Returns (B, m, n) (or (m, n)).
    """
    fn = svd_filter_triton if deltas.is_cuda else svd_filter_reference
    return fn(
        deltas,
        U,
        V,
        lambdas,
        thresholds=thresholds,
        density=density,
        election=election,
        normalize=normalize,
        out_dtype=out_dtype,
    )


# ------------------------------------------------------------------------------------ PivotMerge's sign election


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


# Bound by _pivot_kernels() on first launch, like _filter_kernel.
_pivot_filter_kernel = None


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
