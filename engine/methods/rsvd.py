"""Truncated SVD and polar factors for the SVD merge family (tsv, iso_c, iso_cts, cart, pivot).

Why a module of its own: the SVD methods spend almost all their time in decompositions, and the right algorithm
depends on the matrix size and on how many triplets are kept. `truncated_svd` picks one of three paths:

- "exact": `torch.linalg.svd` (LAPACK gesdd / cuSOLVER). Used when the smaller side is <= `exact_threshold`
  [1024]; results of every method must match dense SVD there, and small SVDs are cheap anyway.
- "randomized": Halko, Martinsson & Tropp (2011), Alg. 4.4 (randomized range finder with `n_iter` [4] power
  iterations, QR re-orthonormalisation after every product) followed by an SVD of the small l x n projected matrix
  through its float64 l x l Gram (8x faster than gesdd on 3 x 204 x 3440: 0.2 s vs 1.8 s). The sketch is l = rank +
  oversample wide with oversample = max(10, rank) by default, i.e. twice the rank: merge methods use every kept
  direction (tsv orthogonalises them, cart sums them), so the directions near the cut must be right, not only the
  spectral error small. Measured on 384 x 1032 updates with a sigma_i ~ 1/i spectrum plus 1 % noise, tsv's max
  relative deviation from dense float64: p = 10 -> 0.18, p = 64 -> 2.4e-3, p = rank (128) -> 1.8e-5; cart (rank 30):
  p = 10 -> 4e-2, p = 64 -> 1.8e-5. Used above the threshold while l <= randomized_max_fraction [0.25] * min(m, n):
  at l = min(m, n) / 4 its ~(2 n_iter + 2) products of the matrix with an l-wide block cost about as many flops as
  the Gram path (4096 x 11008: ~1.2 TFLOP each), beyond that the Gram path is cheaper. Spectral-norm error bound
  (Halko et al. eq. 1.9 combined with their Prop. 8.6 for the power scheme, plus the sigma_{k+1} that the final
  rank-k truncation adds, their Sec. 9.4), with probability >= 1 - 6 p^-p:
      ||A - U_k S_k V_k^T||_2 <= (1 + [1 + 11 sqrt(k + p) sqrt(min(m, n))]^(1 / (2q + 1))) * sigma_{k+1}(A)
  where k = rank, p = oversample, q = n_iter (`halko_bound`). On a matrix of rank <= k the bound is 0: the
  randomized path is exact up to float rounding.
- "gram": eigendecomposition of the float64 Gram matrix of the smaller side, for large matrices of which many
  triplets are kept (tsv with few experts, iso_cts's common space, full spectra). Direct, not random; singular
  values accurate to about eps64 * sigma_max^2 / sigma_i, i.e. better than a float32 SVD for every
  sigma_i > 1e-7 sigma_max. Its cost against a float32 SVD is in BENCHMARKS.md ("SVD paths").

Every path returns singular triplets sorted by decreasing singular value, and triplets whose singular value is at
most `null_tolerance(m, n)` * sigma_max = 10 sqrt(max(m, n)) eps32 sigma_max are returned as ZERO vectors: they are
rounding noise of a rank-deficient float32 matrix (identical experts, LoRA-merged task vectors; the noise measures
~0.2 eps32 sigma_max on small matrices and grows ~sqrt(size)), their directions are arbitrary (LAPACK- and path-
dependent), and the orthogonalisation steps downstream give every kept direction unit weight, so they must not see
them. numpy's matrix_rank rule max(m, n) eps32 was too coarse: it drops real directions of large updates (sigma_1365
/ sigma_1 = 7e-4 < 1.3e-3 for a 1/i spectrum at 4096 x 11008). This makes every method's output a function of the
inputs only, identical across paths, devices and batch layouts up to float rounding.

Randomness is deterministic: the Gaussian test matrix is drawn on the CPU from `generator` (a fresh generator
seeded with DEFAULT_SEED when None) and depends only on the seed and the matrix shape, then moved to the input's
device. A batch shares one test matrix, so the batched result equals the per-matrix one.
"""

from __future__ import annotations

import math

import torch

EXACT_THRESHOLD = 1024  # smaller side at or below which the exact LAPACK SVD is used
RANDOMIZED_MAX_FRACTION = 0.25  # randomized only while the sketch width l <= this fraction of the smaller side
DEFAULT_OVERSAMPLE = None  # None: p = max(10, rank), i.e. a sketch twice the rank (see module doc)
DEFAULT_N_ITER = 4  # power iterations; spectra of fine-tuning updates decay slowly, so q = 4 rather than 1-2
DEFAULT_SEED = 0
PATHS = ("auto", "exact", "randomized", "gram")
_EPS32 = torch.finfo(torch.float32).eps
_EPS64 = torch.finfo(torch.float64).eps


def choose_path(
    m: int,
    n: int,
    rank: int,
    *,
    exact_threshold: int = EXACT_THRESHOLD,
    oversample: int | None = DEFAULT_OVERSAMPLE,
    randomized_max_fraction: float = RANDOMIZED_MAX_FRACTION,
) -> str:
    """Which algorithm `truncated_svd(path="auto")` uses for an m x n matrix and `rank` triplets (see module doc)."""
    small = min(m, n)
    if small <= exact_threshold:
        return "exact"
    if rank + resolve_oversample(rank, oversample) <= randomized_max_fraction * small:
        return "randomized"
    return "gram"


def resolve_oversample(rank: int, oversample: int | None) -> int:
    """The oversampling p actually used: `oversample`, or max(10, rank) when None (a sketch twice the rank)."""
    return max(10, rank) if oversample is None else oversample


def halko_bound(
    m: int, n: int, rank: int, oversample: int | None = DEFAULT_OVERSAMPLE, n_iter: int = DEFAULT_N_ITER
) -> float:
    """Factor c with ||A - A_k(randomized)||_2 <= c * sigma_{rank+1}(A) (probability >= 1 - 6 p^-p, module doc)."""
    q = max(n_iter, 0)
    p = resolve_oversample(rank, oversample)
    bracket = 1.0 + 11.0 * math.sqrt(rank + p) * math.sqrt(min(m, n))
    return 1.0 + bracket ** (1.0 / (2 * q + 1))


def _check_matrix(A: torch.Tensor, rank: int, batched: bool) -> None:
    want = 3 if batched else 2
    if A.dim() != want:
        raise ValueError(f"truncated SVD expects a {want}-D tensor, got shape {tuple(A.shape)}")
    if A.dtype != torch.float32:
        raise ValueError(f"truncated SVD expects float32 input (the engine's compute dtype), got {A.dtype}")
    small = min(A.shape[-2], A.shape[-1])
    if not 1 <= rank <= small:
        raise ValueError(f"rank must be in [1, {small}] for a matrix of shape {tuple(A.shape[-2:])}, got {rank}")


def drop_small_triplets(U, S, Vh, floor: torch.Tensor):
    """Zero the triplets with S <= floor (floor broadcasts against S[..., :1]): their directions are noise."""
    keep = S > floor
    S = torch.where(keep, S, torch.zeros_like(S))
    return U * keep[..., None, :], S, Vh * keep[..., :, None]


def null_tolerance(m: int, n: int) -> float:
    """Relative singular value at or below which a float32 m x n matrix's triplet is rounding noise."""
    return 10.0 * math.sqrt(max(m, n)) * _EPS32


def _zero_null_triplets(U, S, Vh, m: int, n: int):
    """Zero the triplets below the null tolerance (arbitrary directions, see module doc)."""
    return drop_small_triplets(U, S, Vh, S[..., :1] * null_tolerance(m, n))


def _exact(A: torch.Tensor, rank: int):
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _randomized(A: torch.Tensor, rank: int, oversample: int, n_iter: int, generator: torch.Generator):
    """Halko et al. Alg. 4.4 + Alg. 5.1 on a wide batch A (B, m, n), m <= n."""
    m, n = A.shape[-2:]
    width = min(rank + oversample, m)
    omega = torch.randn((n, width), generator=generator, dtype=torch.float32).to(A.device)
    Q = _orthonormal(A @ omega)
    for _ in range(n_iter):
        Z = _orthonormal(A.mT @ Q)
        Q = _orthonormal(A @ Z)
    Ub, S, Vh = _gram(Q.mT @ A, width)  # the small (l x n) projected matrix, via its float64 l x l Gram
    return (Q @ Ub)[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _gram(A: torch.Tensor, rank: int):
    """Top `rank` triplets of a wide batch A (B, m, n), m <= n, from the float64 Gram A A^T."""
    A64 = A.double()
    w, Q = torch.linalg.eigh(A64 @ A64.mT)
    w, Q = w.flip(-1)[..., :rank], Q.flip(-1)[..., :rank]
    S = w.clamp_min(0).sqrt()
    safe = torch.where(S > 0, S, torch.ones_like(S))
    Vh = (Q.mT @ A64) / safe[..., :, None]
    return Q.float(), S.float(), Vh.float()


def truncated_svd_batched(
    A: torch.Tensor,
    rank: int,
    *,
    path: str = "auto",
    exact_threshold: int = EXACT_THRESHOLD,
    oversample: int | None = DEFAULT_OVERSAMPLE,
    n_iter: int = DEFAULT_N_ITER,
    randomized_max_fraction: float = RANDOMIZED_MAX_FRACTION,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of B same-shape matrices A (B, m, n) -> U (B, m, rank), S (B, rank), Vh (B, rank, n).

    Batched because on GPU the same-shape matrices of all experts (and of all layers) decompose in one call.
    """
    _check_matrix(A, rank, batched=True)
    if path not in PATHS:
        raise ValueError(f"svd path must be one of {PATHS}, got {path!r}")
    if (oversample is not None and oversample < 0) or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample} and {n_iter}")
    m, n = A.shape[-2:]
    if path == "auto":
        path = choose_path(
            m,
            n,
            rank,
            exact_threshold=exact_threshold,
            oversample=oversample,
            randomized_max_fraction=randomized_max_fraction,
        )
    tall = m > n
    work = A.mT if tall else A  # the algorithms below assume a wide matrix
    if path == "exact":
        U, S, Vh = _exact(work, rank)
    elif path == "randomized":
        gen = generator if generator is not None else torch.Generator().manual_seed(DEFAULT_SEED)
        U, S, Vh = _randomized(work, rank, resolve_oversample(rank, oversample), n_iter, gen)
    else:
        U, S, Vh = _gram(work, rank)
    if tall:
        U, Vh = Vh.mT, U.mT
    return _zero_null_triplets(U, S, Vh, m, n)


def truncated_svd(
    A: torch.Tensor,
    rank: int,
    *,
    path: str = "auto",
    exact_threshold: int = EXACT_THRESHOLD,
    oversample: int | None = DEFAULT_OVERSAMPLE,
    n_iter: int = DEFAULT_N_ITER,
    randomized_max_fraction: float = RANDOMIZED_MAX_FRACTION,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of one matrix A (m, n) -> U (m, rank), S (rank,), Vh (rank, n); see the module doc."""
    _check_matrix(A, rank, batched=False)
    U, S, Vh = truncated_svd_batched(
        A[None],
        rank,
        path=path,
        exact_threshold=exact_threshold,
        oversample=oversample,
        n_iter=n_iter,
        randomized_max_fraction=randomized_max_fraction,
        generator=generator,
    )
    return U[0], S[0], Vh[0]


def polar_factor(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal polar factor W of A (..., p, q) and A's singular values (..., min(p, q)), descending.

    W = A (A^T A)^(-1/2) (tall) or (A A^T)^(-1/2) A (wide), i.e. U V^T of A's SVD, with the directions of
    numerically zero singular values left out (W is then a partial isometry): the classic U V^T there depends on
    LAPACK's arbitrary completion, this one does not -- and it makes tsv of K identical experts the expert.
    Computed from the float64 Gram of the smaller side (an eigh is ~10x cheaper than a float32 gesdd at LLM
    sizes on CPU). Directions are dropped only at the Gram's own float64 noise, sigma <= 10 sqrt(max(p, q)
    eps64) sigma_max (4e-6 relative at 1536): the stacked U's of tsv are square and nearly singular (smallest
    sigma 6e-5 relative measured at 1536 x 1536), and dropping such a real direction changed tsv by 4 %.
    """
    if A.dim() < 2:
        raise ValueError(f"polar_factor expects a matrix (or a batch of them), got shape {tuple(A.shape)}")
    p, q = A.shape[-2:]
    wide = p < q
    A64 = (A.mT if wide else A).double()  # tall: (..., big, small)
    w, Q = torch.linalg.eigh(A64.mT @ A64)
    s = w.clamp_min(0).sqrt()
    tol = s.amax(dim=-1, keepdim=True) * (10.0 * math.sqrt(max(p, q) * _EPS64))
    inv = torch.where(s > tol, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    W = A64 @ ((Q * inv[..., None, :]) @ Q.mT)
    W = W.mT if wide else W
    return W.to(A.dtype), s.flip(-1).to(A.dtype)


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold at least `energy` of sum(S^2) (0 for an all-zero S).

    The energy rule is how PivotMerge sizes its shared space: rank follows the spectrum of the update
    instead of a fixed count, so a near-rank-1 update keeps 1 direction and a diffuse one keeps many.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if S.dim() != 1:
        raise ValueError(f"energy_rank expects a 1-D vector of singular values, got shape {tuple(S.shape)}")
    sq = S.double().square()
    total = float(sq.sum())
    if total == 0.0:
        return 0
    frac = torch.cumsum(sq, 0) / total
    # 1e-12 slack: energy = 1.0 must select the whole spectrum despite rounding of the cumulative sum
    return min(int((frac < energy - 1e-12).sum()) + 1, S.numel())
