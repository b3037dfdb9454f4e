"""SVD merge family: tsv, iso_c, iso_cts and cart as pure whole-tensor methods (docs/svd.md).

Each method works on one 2-D weight at a time through its singular vectors, so it is registered with
`chunkwise=False` and receives whole float32 matrices. 0-D and 1-D tensors (biases, norms) have no SVD; they are
averaged as each paper's reference code does:
- task-vector methods (tsv, iso_c, iso_cts): theta = theta_0 + alpha * mean_k(tau_k)  -- the authors apply the
  same alpha to the averaged 1-D task vectors as to the 2-D update;
- cart: theta = mean_k(theta_k), which is exactly CART's formula at full rank (sum_k (theta_k - mean) = 0).
Tensors with more than 2 dimensions (a vision tower's conv patch embedding (out, in, kh, kw)) are merged as the
matrix (out, in * kh * kw) and reshaped back: a convolution is exactly that matrix applied to unfolded patches
(conv = unfold + matmul with W.reshape(out, -1)), so the method's spectral rule acts on the linear map the
weight is. (FusionBench and the authors' code average such tensors instead; averaging would make the method's
result on them a plain task-arithmetic mean, a different method for one weight of the model.)

The `*_update` cores take leading batch dimensions (..., K, m, n) so the engine can stack same-shape weights of
several layers and decompose them in one batched call (the GPU path): each method registers a `merge_batch` that
stacks B same-shape 2-D tensors to (B, K, m, n) and calls its core once; `merge` calls the same core with one
tensor, so both go through the same arithmetic (the leading dimension is the only difference).
All decompositions go through `shardmerge.engine.methods.rsvd` (exact / randomized / Gram paths; triplets
of numerically zero singular values are dropped, so results do not depend on LAPACK's arbitrary null vectors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from shardmerge.engine.methods import register
from shardmerge.engine.methods.base import Chunk, MethodSpec, Param, TensorInfo, matrix_shape, whole_data_bytes
from shardmerge.engine.methods.rsvd import DEFAULT_SEED, PATHS, drop_small_triplets, polar_factor, truncated_svd_batched

# ---------------------------------------------------------------- shared input handling


def _where(info: TensorInfo | None) -> str:
    return f"tensor {info.name!r}" if info is not None else "tensor <unnamed>"


def stack_inputs(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    info: TensorInfo | None,
    *,
    needs_base: bool,
) -> torch.Tensor:
    """Validate the inputs of one whole tensor and stack the experts to (K, *shape) (shared by svd and pivot)."""
    check_inputs(method, tensors, base, info, needs_base=needs_base)
    return torch.stack(list(tensors))


def check_inputs(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    info: TensorInfo | None,
    *,
    needs_base: bool,
) -> tuple[int, ...]:
    """Refuse bad inputs of one whole tensor (ValueError naming the tensor); returns the common shape."""
    if len(tensors) == 0:
        raise ValueError(f"{method}: {_where(info)}: no expert tensors given; expected at least one")
    if needs_base and base is None:
        raise ValueError(f"{method}: {_where(info)}: a base model is required (set base_model in the recipe)")
    ref = tuple(tensors[0].shape)
    named = list(enumerate(tensors)) + ([("base", base)] if base is not None else [])
    for idx, t in named:
        label = "base" if idx == "base" else f"expert {idx}"
        if tuple(t.shape) != ref:
            raise ValueError(
                f"{method}: {_where(info)}: {label} has shape {tuple(t.shape)} but expert 0 has {ref}; "
                "all inputs of one tensor must have the same shape"
            )
        if t.dtype != torch.float32:
            raise ValueError(f"{method}: {_where(info)}: {label} has dtype {t.dtype}; expected float32")
    return ref


def as_matrices(stack: torch.Tensor, base: torch.Tensor | None, lead: int) -> tuple:
    """View N-D weights (lead dims, then dim 0 of the weight, then the rest) as matrices (..., out, rest)."""
    shape = tuple(stack.shape[lead:])
    if len(shape) <= 2:
        return stack, base
    m = shape[0]
    x = stack.reshape(tuple(stack.shape[:lead]) + (m, -1))
    b = None if base is None else base.reshape(tuple(base.shape[: lead - 1]) + (m, -1))
    return x, b


def stack_batch(
    method: str,
    inputs: Sequence[Sequence[torch.Tensor]],
    bases: Sequence[torch.Tensor | None],
    infos: Sequence[TensorInfo | None],
    *,
    needs_base: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate B tensors' inputs and copy them into one (B, K, *shape) stack and one (B, *shape) base stack.

    Every tensor is checked as `merge` checks it; the batch must share one shape and one expert count, because
    the batched core decomposes all B*K matrices in one call. One preallocated stack instead of B per-tensor
    stacks plus their stack keeps the data footprint at one extra copy, as for a single tensor.
    """
    if not (len(inputs) == len(bases) == len(infos)) or not inputs:
        raise ValueError(
            f"{method}: merge_batch needs one expert list, base and info per tensor (at least one); "
            f"got {len(inputs)} expert lists, {len(bases)} bases and {len(infos)} infos"
        )
    if not needs_base:  # a base the method does not use (cart) is not validated, as in `merge`
        bases = [None] * len(bases)
    ref = check_inputs(method, inputs[0], bases[0], infos[0], needs_base=needs_base)
    for xs, base, info in zip(inputs[1:], bases[1:], infos[1:]):
        shape = check_inputs(method, xs, base, info, needs_base=needs_base)
        if shape != ref or len(xs) != len(inputs[0]):
            raise ValueError(
                f"{method}: merge_batch: {_where(info)} has {len(xs)} experts of shape {shape} but "
                f"{_where(infos[0])} has {len(inputs[0])} of shape {ref}; a batch holds same-shape tensors with the "
                "same number of experts"
            )
    x = inputs[0][0].new_empty((len(inputs), len(inputs[0])) + ref)
    for b, xs in enumerate(inputs):
        for k, t in enumerate(xs):
            x[b, k].copy_(t)
    if not needs_base:
        return x, None
    base = x.new_empty((len(bases),) + ref)
    for b, t in enumerate(bases):
        base[b].copy_(t)
    return x, base


def svd_options(method: str, info: TensorInfo | None, svd_path: str, seed: int) -> dict:
    """Keyword arguments for `truncated_svd_batched` from the recipe's `svd_path` and `seed` parameters."""
    if svd_path not in PATHS:
        raise ValueError(f"{method}: {_where(info)}: svd_path must be one of {PATHS}, got {svd_path!r}")
    return {"path": svd_path, "generator": torch.Generator().manual_seed(int(seed))}


def _check_positive(method: str, info: TensorInfo | None, name: str, value: float, upper=None) -> None:
    if not (value > 0 and (upper is None or value <= upper)) or not math.isfinite(value):
        bound = f"(0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{method}: {_where(info)}: {name} must be {bound}, got {value!r}")


def _flatten_batch(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(..., K, m, n) -> (B, K, m, n) and the leading shape to restore."""
    lead = tuple(x.shape[:-3])
    return x.reshape((-1,) + tuple(x.shape[-3:])), lead


def _concat_triplets(U, S, Vh):
    """Per-task triplets (B, K, m, k), (B, K, k), (B, K, k, n) -> one stack (B, m, K k), (B, K k), (B, K k, n)."""
    B, K, m, k = U.shape
    n = Vh.shape[-1]
    return (
        U.permute(0, 2, 1, 3).reshape(B, m, K * k),
        S.reshape(B, K * k),
        Vh.reshape(B, K * k, n),
    )


def _decompose_tasks(x: torch.Tensor, rank: int, svd: dict):
    """Top-`rank` triplets of each of the B*K matrices of x (B, K, m, n), batched in one call."""
    B, K, m, n = x.shape
    U, S, Vh = truncated_svd_batched(x.reshape(B * K, m, n), rank, **svd)
    return U.reshape(B, K, m, rank), S.reshape(B, K, rank), Vh.reshape(B, K, rank, n)


# ---------------------------------------------------------------- batched cores


def tsv_update(taus: torch.Tensor, *, rank_fraction: float = 1.0, **svd) -> torch.Tensor:
    """TSV-Merge update M (..., m, n) of task vectors (..., K, m, n) (Gargiulo et al., arXiv 2412.00081).

    Each task keeps k = floor(rank_fraction * r / K) triplets (r = min(m, n); at least 1, at most r), the
    concatenated U's and V's are replaced by their orthogonal polar factors (removing inter-task interference),
    and M = U_perp diag(sigma) V_perp^T with the tasks' own singular values.
    """
    x, lead = _flatten_batch(taus)
    B, K, m, n = x.shape
    r = min(m, n)
    k = min(r, max(1, math.floor(rank_fraction * r / K)))
    U, S, Vh = _concat_triplets(*_decompose_tasks(x, k, svd))
    Wu, _ = polar_factor(U)
    Wv, _ = polar_factor(Vh)
    return ((Wu * S[:, None, :]) @ Wv).reshape(lead + (m, n))


def iso_c_update(taus: torch.Tensor) -> torch.Tensor:
    """Iso-C update (Marczak et al., arXiv 2502.04959): sum of task vectors with a flat (isotropic) spectrum.

    Delta = sum_k tau_k = U S V^T -> mean(S) * U V^T; U V^T is Delta's polar factor, so no truncated SVD is
    involved and every singular value (including zeros) enters the mean, as in the authors' code.
    """
    delta = taus.sum(dim=-3)
    W, s = polar_factor(delta)
    return W * s.mean(dim=-1)[..., None, None]


def iso_cts_split(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) for Iso-CTS, as in the authors' code.

    common = floor(common_fraction * r); the task-specific remainder is rounded (Python round, half to even) to a
    multiple of K and common absorbs the difference, so common + K * per_task == r always.
    """
    common = int(common_fraction * r)
    per_task = round((r - common) / num_tasks)
    if num_tasks * per_task > r:  # only for tiny r (< K / 2 directions rounded up): give them all to the tasks
        per_task = r // num_tasks
    return r - num_tasks * per_task, per_task


def _projection_noise_floor(x: torch.Tensor) -> torch.Tensor:
    """Per-task singular-value floor (B, K, 1) below which a residual direction of Iso-CTS is rounding noise.

    When a task lies (almost) inside the common subspace its residual is float32 noise of ~5 eps sigma_max(tau_k)
    (measured). The isotropic spectrum would give such noise directions the full mean singular value, so they
    are dropped: floor = 10 max(m, n) eps32 ||tau_k||_F / sqrt(min(m, n)) (||tau||_F / sqrt(r) is the task's RMS
    singular value), >= 25x the measured noise on 60 x 90 to 1000 x 1200 matrices.
    """
    m, n = x.shape[-2:]
    rms_sigma = x.flatten(2).norm(dim=-1) / math.sqrt(min(m, n))
    return (10 * max(m, n) * torch.finfo(torch.float32).eps * rms_sigma)[..., None]


def iso_cts_update(taus: torch.Tensor, *, common_fraction: float = 0.8, **svd) -> torch.Tensor:
    """Iso-CTS update (arXiv 2502.04959): common subspace of sum tau + per-task residual directions, isotropic.

    The top `common` directions of Delta = sum_k tau_k form the common subspace; each task adds the top
    `per_task` directions of its component outside it ((I - U_c U_c^T) tau_k); the joined U's and V's are
    orthogonalised by polar factors and every singular value is replaced by the mean of the joined ones.
    """
    x, lead = _flatten_batch(taus)
    B, K, m, n = x.shape
    common, per_task = iso_cts_split(min(m, n), K, common_fraction)
    if svd.get("path", "auto") == "auto":
        # never randomized unless asked: the flat spectrum gives every kept direction the same weight, so the
        # approximate directions near a sketch's cut are not damped (7.5 % max deviation measured on 384 x 1032)
        svd = {**svd, "randomized_max_fraction": 0.0}
    parts = []  # (U, S, Vh) blocks: task-specific directions first, then the common ones (authors' order)
    Uc = x.new_zeros(B, m, 0)
    if common > 0:
        Uc, Sc, Vhc = _decompose_tasks(x.sum(dim=1, keepdim=True), common, svd)
        Uc = Uc[:, 0]
        parts.append((Uc, Sc[:, 0], Vhc[:, 0]))
    if per_task > 0:
        resid = x - Uc[:, None] @ (Uc.mT[:, None] @ x)
        Ut, St, Vht = _decompose_tasks(resid, per_task, svd)
        parts.insert(0, _concat_triplets(*drop_small_triplets(Ut, St, Vht, _projection_noise_floor(x))))
    Us, Ss, Vhs = zip(*parts)
    U, S, Vh = torch.cat(Us, dim=-1), torch.cat(Ss, dim=-1), torch.cat(Vhs, dim=-2)
    Wu, _ = polar_factor(U)
    Wv, _ = polar_factor(Vh)
    return ((Wu @ Wv) * S.mean(dim=-1)[:, None, None]).reshape(lead + (m, n))


def cart_update(experts: torch.Tensor, *, rank_fraction: float = 0.08, **svd) -> tuple[torch.Tensor, torch.Tensor]:
    """CART pieces (Choi et al., arXiv 2412.12153) of experts (..., K, m, n): (mean, sum_k lowrank_k(theta_k - mean)).

    Rank k = max(1, floor(rank_fraction * min(m, n))) as in the authors' code; theta = mean + lambda * second.
    """
    x, lead = _flatten_batch(experts)
    B, K, m, n = x.shape
    mean = x.mean(dim=1)
    k = min(min(m, n), max(1, int(rank_fraction * min(m, n))))
    U, S, Vh = _decompose_tasks(x - mean[:, None], k, svd)
    low = ((U * S[..., None, :]) @ Vh).sum(dim=1)
    return mean.reshape(lead + (m, n)), low.reshape(lead + (m, n))


# ---------------------------------------------------------------- registered methods
#
# Each method's 2-D formula is one `_<method>_2d(x, base, info, **params)` on experts x (..., K, m, n) and bases
# (..., m, n): `merge` calls it with one tensor, `merge_batch` with a (B, K, m, n) stack. The parameters are
# validated there, so both entries refuse the same bad values with the same message.


def _tsv_2d(
    x, base, info, *, alpha: float = 1.0, rank_fraction: float = 1.0, svd_path: str = "auto", seed: int = DEFAULT_SEED
):
    _check_positive("tsv", info, "rank_fraction", rank_fraction, upper=x.shape[-3])
    update = tsv_update(x - base.unsqueeze(-3), rank_fraction=rank_fraction, **svd_options("tsv", info, svd_path, seed))
    return base + alpha * update


def _iso_c_2d(x, base, info, *, alpha: float = 1.0):
    return base + alpha * iso_c_update(x - base.unsqueeze(-3))


def _iso_cts_2d(
    x, base, info, *, alpha: float = 1.0, common_fraction: float = 0.8, svd_path: str = "auto", seed: int = DEFAULT_SEED
):
    _check_positive("iso_cts", info, "common_fraction", common_fraction, upper=1.0)
    svd = svd_options("iso_cts", info, svd_path, seed)
    return base + alpha * iso_cts_update(x - base.unsqueeze(-3), common_fraction=common_fraction, **svd)


def _cart_2d(x, base, info, *, rank_fraction: float = 0.08, svd_path: str = "auto", seed: int = DEFAULT_SEED, **params):
    lam = _cart_lambda(info, params)
    _check_positive("cart", info, "rank_fraction", rank_fraction, upper=1.0)
    mean, low = cart_update(x, rank_fraction=rank_fraction, **svd_options("cart", info, svd_path, seed))
    return mean + lam * low


def _cart_lambda(info, params: dict) -> float:
    """CART's `lambda` (a Python keyword, so it arrives in **params); any other leftover is refused."""
    params = dict(params)
    lam = float(params.pop("lambda", 1.0))
    if params:
        raise ValueError(f"cart: {_where(info)}: unknown parameters {sorted(params)}")
    return lam


def _mean_1d(stack, base, alpha: float):
    """0-D/1-D tensors have no SVD: theta_0 + alpha * mean(tau) (task-vector methods), mean(theta) (cart)."""
    if base is None:
        return stack.mean(dim=0)
    return base + alpha * (stack - base).mean(dim=0)


def merge_tsv(
    tensors,
    base,
    *,
    stats=None,
    chunk: Chunk | None = None,
    info: TensorInfo | None = None,
    alpha: float = 1.0,
    rank_fraction: float = 1.0,
    svd_path: str = "auto",
    seed: int = DEFAULT_SEED,
):
    """tsv: theta_0 + alpha * TSV(tau_1..tau_K); 1-D: theta_0 + alpha * mean(tau)."""
    stack = stack_inputs("tsv", tensors, base, info, needs_base=True)
    _check_positive("tsv", info, "rank_fraction", rank_fraction, upper=len(tensors))
    if stack.dim() < 3:
        return _mean_1d(stack, base, alpha)
    x, b = as_matrices(stack, base, lead=1)
    out = _tsv_2d(x, b, info, alpha=alpha, rank_fraction=rank_fraction, svd_path=svd_path, seed=seed)
    return out.reshape(stack.shape[1:])


def merge_iso_c(
    tensors, base, *, stats=None, chunk: Chunk | None = None, info: TensorInfo | None = None, alpha: float = 1.0
):
    """iso_c: theta_0 + alpha * mean(sigma(Delta)) U V^T with Delta = sum tau; 1-D: theta_0 + alpha * mean(tau)."""
    stack = stack_inputs("iso_c", tensors, base, info, needs_base=True)
    if stack.dim() < 3:
        return _mean_1d(stack, base, alpha)
    x, b = as_matrices(stack, base, lead=1)
    out = _iso_c_2d(x, b, info, alpha=alpha)
    return out.reshape(stack.shape[1:])


def merge_iso_cts(
    tensors,
    base,
    *,
    stats=None,
    chunk: Chunk | None = None,
    info: TensorInfo | None = None,
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    svd_path: str = "auto",
    seed: int = DEFAULT_SEED,
):
    """iso_cts: theta_0 + alpha * IsoCTS(tau_1..tau_K); 1-D: theta_0 + alpha * mean(tau)."""
    stack = stack_inputs("iso_cts", tensors, base, info, needs_base=True)
    _check_positive("iso_cts", info, "common_fraction", common_fraction, upper=1.0)
    if stack.dim() < 3:
        return _mean_1d(stack, base, alpha)
    x, b = as_matrices(stack, base, lead=1)
    out = _iso_cts_2d(x, b, info, alpha=alpha, common_fraction=common_fraction, svd_path=svd_path, seed=seed)
    return out.reshape(stack.shape[1:])


def merge_cart(
    tensors,
    base,
    *,
    stats=None,
    chunk: Chunk | None = None,
    info: TensorInfo | None = None,
    rank_fraction: float = 0.08,
    svd_path: str = "auto",
    seed: int = DEFAULT_SEED,
    **params,
):
    """cart: mean + lambda * sum_k lowrank(theta_k - mean); 1-D: mean. A given base is not used by CART."""
    _cart_lambda(info, params)
    stack = stack_inputs("cart", tensors, None, info, needs_base=False)
    _check_positive("cart", info, "rank_fraction", rank_fraction, upper=1.0)
    if stack.dim() < 3:
        return _mean_1d(stack, None, 1.0)
    x, b = as_matrices(stack, None, lead=1)
    out = _cart_2d(x, None, info, rank_fraction=rank_fraction, svd_path=svd_path, seed=seed, **params)
    return out.reshape(stack.shape[1:])


def _batch_entry(method: str, merge, formula, needs_base: bool):
    """`merge_batch` of a method: B same-shape 2-D tensors stacked to (B, K, m, n) through `formula` in one call.

    0-D/1-D tensors have no decomposition to batch: they go through `merge` one by one (same result by
    construction). The params are one set for the whole batch: the engine batches only tensors whose resolved
    params are identical, so per-layer gradients never mix.
    """

    def merge_batch(inputs, bases, infos, **params) -> list:
        if inputs and inputs[0] and inputs[0][0].dim() < 2:
            return [merge(xs, b, info=i, **params) for xs, b, i in zip(inputs, bases, infos)]
        x, base = stack_batch(method, inputs, bases, infos, needs_base=needs_base)
        shape = tuple(x.shape[2:])
        x, base = as_matrices(x, base, lead=2)
        return [y.reshape(shape) for y in formula(x, base, infos[0], **params).unbind(0)]

    merge_batch.__name__ = f"merge_{method}_batch"
    merge_batch.__doc__ = f"{method} on B same-shape tensors with one batched decomposition (MethodSpec.merge_batch)."
    return merge_batch


def svd_memory(extra: int):
    """Whole-matrix estimate of a method that decomposes the K task matrices in one batched call (+ `extra` more
    decompositions of the matrix's size): the data (whole_data_bytes) + (K + extra) (16 m n + 32 min(m, n)^2).
    An a x b decomposition (a <= b, float64 Gram path, the largest) holds its float64 copy, factors and their
    float32 copies (~24 a b) and the Gram matrix, eigenvectors and eigh workspace (~40 a^2), less when few
    triplets are kept. N-D weights count as their (out, rest) matrix; 0-D/1-D tensors only hold data."""

    def estimate(shape: tuple, n_inputs: int, has_base: bool) -> int:
        data = whole_data_bytes(shape, n_inputs, has_base)
        if len(shape) < 2:
            return data
        m, n = matrix_shape(shape)
        return data + (max(1, n_inputs) + extra) * (16 * m * n + 32 * min(m, n) ** 2)

    return estimate


ALPHA = Param("alpha", default=1.0, doc="scale of the merged task vector (the papers tune it, e.g. 1.0-2.0)")
SVD_PATH = Param("svd_path", "str", "auto", choices=PATHS, doc="decomposition path (shardmerge.engine.methods.rsvd)")
SEED = Param("seed", "int", DEFAULT_SEED, doc="seed of randomized decompositions")
_MATRIX_RULE = "whole matrix (N-D weights as (out, rest); 0-D/1-D averaged)"

register(
    MethodSpec(
        name="tsv",
        merge=merge_tsv,
        needs_base=True,
        chunkwise=False,
        params=(
            ALPHA,
            Param(
                "rank_fraction",
                default=1.0,
                lo=0,
                lo_open=True,
                hi_models=True,
                doc="per-task rank = rank_fraction * min(m, n) / K; K = every task at full rank",
            ),
            SVD_PATH,
            SEED,
        ),
        doc="Task Singular Vectors (arXiv 2412.00081): per-task top r/K triplets, orthogonalised U and V.",
        merge_batch=_batch_entry("tsv", merge_tsv, _tsv_2d, needs_base=True),
        memory=svd_memory(0),
        whole_tensor_stats=_MATRIX_RULE,
        reference="https://arxiv.org/abs/2412.00081",
    )
)
register(
    MethodSpec(
        name="iso_c",
        merge=merge_iso_c,
        needs_base=True,
        chunkwise=False,
        params=(ALPHA,),
        doc="Iso-C (arXiv 2502.04959): sum of task vectors with its spectrum flattened to the mean.",
        merge_batch=_batch_entry("iso_c", merge_iso_c, _iso_c_2d, needs_base=True),
        memory=svd_memory(0),
        whole_tensor_stats=_MATRIX_RULE,
        reference="https://arxiv.org/abs/2502.04959",
    )
)
register(
    MethodSpec(
        name="iso_cts",
        merge=merge_iso_cts,
        needs_base=True,
        chunkwise=False,
        params=(
            ALPHA,
            Param(
                "common_fraction",
                default=0.8,
                lo=0,
                lo_open=True,
                hi=1,
                doc="fraction of the rank given to the common subspace",
            ),
            SVD_PATH,
            SEED,
        ),
        doc="Iso-CTS (arXiv 2502.04959): common subspace + task-specific residual directions, isotropic spectrum.",
        merge_batch=_batch_entry("iso_cts", merge_iso_cts, _iso_cts_2d, needs_base=True),
        memory=svd_memory(2),
        whole_tensor_stats=_MATRIX_RULE,
        reference="https://arxiv.org/abs/2502.04959",
    )
)
register(
    MethodSpec(
        name="cart",
        merge=merge_cart,
        needs_base=False,
        base="unused",
        chunkwise=False,
        params=(
            Param("lambda", default=1.0, doc="scale of the low-rank centred task vectors"),
            Param("rank_fraction", default=0.08, lo=0, lo_open=True, hi=1, doc="rank = rank_fraction * min(m, n)"),
            SVD_PATH,
            SEED,
        ),
        doc="CART (arXiv 2412.12153): experts' mean + lambda * sum of rank-k centred task vectors.",
        merge_batch=_batch_entry("cart", merge_cart, _cart_2d, needs_base=False),
        memory=svd_memory(0),
        whole_tensor_stats=_MATRIX_RULE,
        reference="https://arxiv.org/abs/2412.12153",
    )
)
