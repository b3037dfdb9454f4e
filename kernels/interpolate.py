"""Fused K-way interpolation of same-shape chunks: linear, task arithmetic, TIES, DARE, breadcrumbs.

One pass: every input element is read once, the output written once, all arithmetic in float32, the result cast
to the output dtype. The semantics are mergekit 0.1.5's (`linear_merge` and `GeneralizedTaskArithmeticMerge`),
restated per element so a row chunk can be merged on its own, given statistics computed over the whole tensor:

  linear            out = Σ w_k x_k            (/ Σ w_k when normalize; Σ w_k = 0 is an error)
  task modes        τ_k = x_k − b;  τ̂_k = sparsify_k(τ_k) · s_k;  d_k = w_k τ̂_k
    no consensus    mixed = Σ d_k,                    divisor = Σ w_k            (|divisor| < 1e-8 -> 1)
    consensus       m = +1 if Σ d_k >= 0 else −1;  a_k = [sign(d_k) == m]
                    mixed = Σ a_k d_k,                divisor = Σ a_k w_k        (divisor == 0 -> 1)
    out = b + λ · mixed (/ divisor when normalize)

  mode              sparsify_k                                   consensus
  task_arithmetic   none                                         no
  ties              keep |τ| >= lo_k                             yes
  breadcrumbs(_ties) keep lo_k <= |τ| < hi_k                     no (yes)
  dare_linear       keep iff philox(key_k, offset) passes density_k  no
  dare_ties         as dare_linear                               yes

Thresholds instead of top-k: mergekit keeps exactly k = max(1, int(density·n)) entries by argsort; the same
per-tensor threshold (`magnitude_threshold`, `outlier_thresholds`) reproduces that whenever the k-th and (k+1)-th
magnitudes differ, and keeps all tied entries otherwise (argsort's tie order is unspecified in mergekit too).
DARE: mergekit draws torch.bernoulli masks, which no chunked engine can reproduce; here the mask is the counter-based
Philox stream of shardmerge.kernels.philox keyed per (seed, tensor, expert) at the element's flat offset, so it is independent
of chunking, block size and device. Survivor scale s_k: default 1 / density_k (the DARE paper's rule); pass
`scales` from `dare_l1_partials` + `l1_rescale` for mergekit's L1-norm-matching rule (its default `rescale: true`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.kernels import philox as _ph
from shardmerge.kernels._util import check_float_dtype, check_same_shape, import_triton, use_triton

MODES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
_TRIM_LO = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})
_TRIM_HI = frozenset({"breadcrumbs", "breadcrumbs_ties"})
_DARE = frozenset({"dare_linear", "dare_ties"})
_CONSENSUS = frozenset({"ties", "dare_ties", "breadcrumbs_ties"})

# Elements per Triton program. 1024 with 4 warps is the usual choice for a memory-bound elementwise kernel; it has
# NOT been tuned on hardware yet: `python -m shardmerge.jobs.bench kernels` on a CUDA
# machine measures it against a device copy.
BLOCK = 1024


@dataclass(frozen=True)
class _Resolved:
    """Validated per-expert parameters (float32-representable floats, Python ints) shared by both paths."""

    mode: str
    weights: tuple[float, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    keys: tuple[int, ...]
    thr24: tuple[int, ...]
    scales: tuple[float, ...]
    normalize: bool
    lam: float
    elem_offset: int
    out_dtype: torch.dtype

    @property
    def consensus(self) -> bool:
        return self.mode in _CONSENSUS


def _f32(v: float) -> float:
    """Round to float32, as torch does when a Python float meets a float32 tensor."""
    return float(torch.tensor(float(v), dtype=torch.float32))


def _per_expert(name: str, values, k: int, mode: str, needed: bool) -> tuple | None:
    if values is None:
        if needed:
            raise ValueError(f"interpolate: mode {mode!r} needs {name} (one value per input); got None")
        return None
    if not needed:
        raise ValueError(f"interpolate: {name} does not apply to mode {mode!r}; pass None")
    values = tuple(values)
    if len(values) != k:
        raise ValueError(f"interpolate: {name} has {len(values)} values; expected {k} (one per input)")
    return values


def _check_tensors(tensors, base, mode) -> None:
    check_same_shape("interpolate", tensors)
    for i, t in enumerate(tensors):
        check_float_dtype("interpolate", t, f"inputs[{i}]")
        if t.dtype != tensors[0].dtype:
            raise ValueError(
                f"interpolate: inputs[{i}] has dtype {t.dtype}; expected {tensors[0].dtype} like inputs[0]"
            )
    if (mode == "linear") != (base is None):
        raise ValueError(f"interpolate: mode {mode!r} {'takes no' if mode == 'linear' else 'needs a'} base tensor")
    if base is not None:
        check_same_shape("interpolate", [tensors[0], base], "inputs[0] and base")
        check_float_dtype("interpolate", base, "base")


def _resolve(
    tensors,
    weights,
    mode,
    base,
    normalize,
    lam,
    thresholds,
    upper_thresholds,
    dare_keys,
    densities,
    scales,
    elem_offset,
    out_dtype,
) -> _Resolved:
    """Validate every argument once (ValueError naming the bad one) and normalise it for both paths."""
    if mode not in MODES:
        raise ValueError(f"interpolate: unknown mode {mode!r}; expected one of {MODES}")
    tensors = list(tensors)
    _check_tensors(tensors, base, mode)
    k = len(tensors)
    weights = _per_expert("weights", weights, k, mode, True)
    lo = _per_expert("thresholds", thresholds, k, mode, mode in _TRIM_LO) or (0.0,) * k
    hi = _per_expert("upper_thresholds", upper_thresholds, k, mode, mode in _TRIM_HI) or (math.inf,) * k
    keys = _per_expert("dare_keys", dare_keys, k, mode, mode in _DARE) or (0,) * k
    dens = _per_expert("densities", densities, k, mode, mode in _DARE)
    thr24 = tuple(_ph.threshold24(d) for d in dens) if dens else (1 << 24,) * k
    for key in keys:
        _ph.key_words(key)
    if scales is None:  # DARE paper rule: 1 / density (density 0 drops everything; its scale is moot)
        scales = tuple(1.0 / float(d) if d else 1.0 for d in dens) if dens else (1.0,) * k
    elif len(tuple(scales)) != k or mode in ("linear", "task_arithmetic"):
        raise ValueError(f"interpolate: scales must be None or {k} values for a sparsifying mode, got {scales!r}")
    for name, vals in (("weights", weights), ("scales", scales), ("lam", (lam,))):
        if not all(math.isfinite(float(v)) for v in vals):
            raise ValueError(f"interpolate: {name} must be finite, got {vals!r}")
    if any(math.isnan(float(v)) or float(v) < 0 for v in lo + hi):
        raise ValueError(f"interpolate: magnitude thresholds must be >= 0, got lo={lo!r} hi={hi!r}")
    if mode == "linear" and float(lam) != 1.0:
        raise ValueError(f"interpolate: lam applies to task-vector modes only; mode 'linear' got lam={lam!r}")
    if not isinstance(elem_offset, int) or elem_offset < 0:
        raise ValueError(f"interpolate: elem_offset must be an int >= 0, got {elem_offset!r}")
    out_dtype = out_dtype or (base.dtype if base is not None else tensors[0].dtype)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"interpolate: out_dtype {out_dtype} unsupported; expected float32/float16/bfloat16")
    f = lambda vs: tuple(_f32(v) for v in vs)
    return _Resolved(
        mode,
        f(weights),
        f(lo),
        f(hi),
        tuple(int(x) for x in keys),
        thr24,
        f(scales),
        bool(normalize),
        _f32(lam),
        elem_offset,
        out_dtype,
    )


def _linear_divisor(cfg: _Resolved, mode_name: str) -> float:
    """Σ w_k in float32 (mergekit's `weight.sum()`); a zero sum cannot normalise a linear merge."""
    total = float(torch.tensor(cfg.weights, dtype=torch.float32).sum())
    if cfg.mode == "linear":
        if cfg.normalize and total == 0.0:
            raise ValueError(f"{mode_name}: normalize=True needs weights with a non-zero sum, got {cfg.weights}")
        return total
    return 1.0 if abs(total) < 1e-8 else total


# ------------------------------------------------------------------------------------------------ torch reference


def _sparsified_delta(cfg: _Resolved, k: int, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = x.float() - b
    keep = None
    if cfg.mode in _TRIM_LO:
        a = d.abs()
        keep = a >= cfg.lo[k]
        if cfg.mode in _TRIM_HI:
            keep &= a < cfg.hi[k]
    elif cfg.mode in _DARE and cfg.thr24[k] < (1 << 24):
        offsets = torch.arange(cfg.elem_offset, cfg.elem_offset + d.numel(), device=d.device).reshape(d.shape)
        keep = (_ph.philox_reference(cfg.keys[k], offsets) >> 8) < cfg.thr24[k]
    if keep is not None:
        d = d * keep
    if cfg.scales[k] != 1.0:
        d = d * cfg.scales[k]
    return d


def _reference_task(cfg: _Resolved, tensors, base) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group, op for op, on one chunk."""
    b = base.float()
    deltas = b.new_empty((len(tensors), *b.shape))
    for k, x in enumerate(tensors):
        deltas[k] = _sparsified_delta(cfg, k, x, b)
    w = torch.tensor(cfg.weights, dtype=torch.float32, device=b.device).reshape(-1, *([1] * b.dim()))
    deltas.mul_(w)
    if cfg.consensus:
        majority = (deltas.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = _linear_divisor(cfg, "interpolate_reference")
    if cfg.normalize:
        mixed /= divisor
    if cfg.lam != 1.0:
        mixed *= cfg.lam
    return (b + mixed).to(cfg.out_dtype)


def _reference_linear(cfg: _Resolved, tensors) -> torch.Tensor:
    """mergekit's linear_merge on one chunk: float32 multiply-then-add in input order (two roundings, as the
    method and the kernel do; CPU addcmul_ rounds once), then divide by Σ w."""
    divisor = _linear_divisor(cfg, "interpolate_reference")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for x, w in zip(tensors, cfg.weights):
        acc.add_(x.float() * torch.tensor(w, dtype=torch.float32, device=acc.device))
    if cfg.normalize:
        acc.div_(divisor)
    return acc.to(cfg.out_dtype)


def interpolate_reference(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    mode: str = "linear",
    base: torch.Tensor | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    thresholds: Sequence[float] | None = None,
    upper_thresholds: Sequence[float] | None = None,
    dare_keys: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    elem_offset: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-torch K-way interpolation (the CPU path); arguments as in `interpolate`."""
    cfg = _resolve(
        tensors,
        weights,
        mode,
        base,
        normalize,
        lam,
        thresholds,
        upper_thresholds,
        dare_keys,
        densities,
        scales,
        elem_offset,
        out_dtype,
    )
    if cfg.mode == "linear":
        return _reference_linear(cfg, list(tensors))
    return _reference_task(cfg, list(tensors), base)


# --------------------------------------------------------------------------------- whole-tensor statistics helpers


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """TIES trim threshold lo for one expert's whole task vector: mergekit's `magnitude` keeps |τ| >= lo.

    density >= 1 keeps everything (0.0); density <= 0 or an empty tensor keeps nothing (inf); otherwise lo is the
    k-th largest |τ| in float32 with k = max(1, int(density · numel)), mergekit's count.
    """
    density = float(density)
    if math.isnan(density):
        raise ValueError("magnitude_threshold: density is NaN; expected a number in [0, 1]")
    if density >= 1:
        return 0.0
    if density <= 0 or tau.numel() == 0:
        return math.inf
    k = max(1, int(density * tau.numel()))
    return float(torch.topk(tau.detach().reshape(-1).float().abs(), k, sorted=False).values.min())


def outlier_thresholds(tau: torch.Tensor, density: float, gamma: float) -> tuple[float, float]:
    """Breadcrumbs bounds (lo, hi) for one expert: mergekit's `magnitude_outliers` keeps lo <= |τ| < hi.

    Drops the int(gamma · n) largest magnitudes, then the smallest ones, keeping int(density · n) entries.
    """
    density, gamma = float(density), float(gamma)
    if math.isnan(density) or math.isnan(gamma) or gamma < 0:
        raise ValueError(f"outlier_thresholds: density {density} / gamma {gamma} must be numbers, gamma >= 0")
    if density >= 1:
        return 0.0, math.inf
    n = tau.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    if target <= 0:
        return math.inf, math.inf
    ordered = torch.sort(tau.detach().reshape(-1).float().abs()).values
    hi = float(ordered[bottom + target]) if bottom + target < n else math.inf
    return float(ordered[bottom]), hi


def dare_l1_partials(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    dare_keys: Sequence[int],
    densities: Sequence[float],
    elem_offset: int = 0,
) -> torch.Tensor:
    """Per-expert (Σ|τ_k|, Σ|τ_k · keep_k|) over one chunk, float64, shape (K, 2).

    Summed over all chunks of a tensor they give mergekit's L1 rescale (`l1_rescale`) with the DARE mask that
    `interpolate` will apply, so a `prepare` pass can compute the scales chunk by chunk.
    """
    if len(tensors) != len(dare_keys) or len(tensors) != len(densities):
        raise ValueError(
            f"dare_l1_partials: {len(tensors)} tensors but {len(dare_keys)} keys / "
            f"{len(densities)} densities; expected one each"
        )
    out = torch.zeros((len(tensors), 2), dtype=torch.float64)
    for k, (x, key, dens) in enumerate(zip(tensors, dare_keys, densities)):
        tau = (x.float() - base.float()).abs()
        offsets = torch.arange(elem_offset, elem_offset + tau.numel(), device=tau.device).reshape(tau.shape)
        keep = _ph.dare_keep_mask(key, offsets, dens) if _ph.threshold24(dens) < (1 << 24) else None
        out[k, 0] = tau.sum(dtype=torch.float64).cpu()
        out[k, 1] = out[k, 0] if keep is None else (tau * keep).sum(dtype=torch.float64).cpu()
    return out


def l1_rescale(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's `rescaled_masked_tensor` factor for RescaleNorm.l1: before / after, or 1 if either is < eps."""
    if before < eps or after < eps:
        return 1.0
    return float(before) / float(after)


# ------------------------------------------------------------------------------------------------------- Triton


# Bound by _kernels() on first launch: `tl` and the @triton.jit functions _round_bf16, _sparsify, _interp_kernel.
tl = _round_bf16 = _sparsify = _interp_kernel = None


@functools.lru_cache(maxsize=1)
def _kernels():
    """Define the Triton kernels on first use (see shardmerge.kernels._util for why this is deferred).

    They are bound as module globals: Triton resolves the names a kernel uses (tl, helper kernels) through the
    module's globals, not through closures.
    """
    global tl
    triton, tl = import_triton()
    _define_helpers(triton)
    _define_interp_kernel(triton)
    return triton, tl, _interp_kernel


def _define_helpers(triton) -> None:
    global _round_bf16, _sparsify

    @triton.jit
    def _round_bf16(x):
        # float32 -> bfloat16 rounded to nearest even with integer ops, NaN -> 0x7FC0, exactly as torch does; the
        # native cast rounds the same way on GPUs, but the CPU interpreter truncates, so both use this.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _sparsify(
        t,
        k,
        offs,
        pi_ptr,
        pf_ptr,
        K: tl.constexpr,
        TRIM_LO: tl.constexpr,
        TRIM_HI: tl.constexpr,
        DARE: tl.constexpr,
        RESCALE: tl.constexpr,
    ):
        # pf = [w | lo | hi | scale] (K floats each), pi = [pointers | keys | thr24] (K int64 each)
        if TRIM_LO:
            a = tl.abs(t)
            keep = a >= tl.load(pf_ptr + K + k)
            if TRIM_HI:
                keep = keep & (a < tl.load(pf_ptr + 2 * K + k))
            t = tl.where(keep, t, 0.0)
        if DARE:
            r = tl.randint(tl.load(pi_ptr + K + k), offs)
            t = tl.where((r >> 8).to(tl.int64) < tl.load(pi_ptr + 2 * K + k), t, 0.0)
        if RESCALE:
            t = t * tl.load(pf_ptr + 3 * K + k)
        return t


def _define_interp_kernel(triton) -> None:
    global _interp_kernel

    @triton.jit
    def _interp_kernel(
        pi_ptr,
        pf_ptr,
        base_ptr,
        out_ptr,
        n,
        elem_offset,
        divisor,
        lam,
        K: tl.constexpr,
        IN_DTYPE: tl.constexpr,
        HAS_BASE: tl.constexpr,
        TRIM_LO: tl.constexpr,
        TRIM_HI: tl.constexpr,
        DARE: tl.constexpr,
        RESCALE: tl.constexpr,
        CONSENSUS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        APPLY_LAM: tl.constexpr,
        OUT_BF16: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < n
        b = tl.zeros([BLOCK], tl.float32)
        if HAS_BASE:
            b = tl.load(base_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)  # linear: Σ w x;  task modes: Σ d in input order (the election sum)
        pos = tl.zeros([BLOCK], tl.float32)  # consensus: Σ of positive d, and of their weights ...
        neg = tl.zeros([BLOCK], tl.float32)  # ... and the same for negative d
        wpos = tl.zeros([BLOCK], tl.float32)
        wneg = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(K):
            addr = tl.load(pi_ptr + k)
            if ALIGNED:
                addr = tl.multiple_of(addr, 16)
            x = tl.load(addr.to(tl.pointer_type(IN_DTYPE)) + idx, mask=valid, other=0.0).to(tl.float32)
            w = tl.load(pf_ptr + k)
            if HAS_BASE:
                d = _sparsify(x - b, k, idx + elem_offset, pi_ptr, pf_ptr, K, TRIM_LO, TRIM_HI, DARE, RESCALE) * w
                acc += d
                if CONSENSUS:
                    pos += tl.where(d > 0, d, 0.0)
                    neg += tl.where(d < 0, d, 0.0)
                    wpos += tl.where(d > 0, w, 0.0)
                    wneg += tl.where(d < 0, w, 0.0)
            else:
                acc += x * w
        if CONSENSUS:
            # sign(d_k) == m selects exactly the positive (m = +1) or the negative (m = -1) entries
            up = acc >= 0
            acc = tl.where(up, pos, neg)
            div = tl.where(up, wpos, wneg)
            div = tl.where(div == 0.0, 1.0, div)
        else:
            div = divisor
        if NORMALIZE:
            acc = tl.div_rn(acc, div)  # IEEE round-to-nearest: plain '/' compiles to approximate div on NVIDIA
        if APPLY_LAM:
            acc = acc * lam
        if HAS_BASE:
            acc = b + acc
        if OUT_BF16:
            tl.store(out_ptr + idx, _round_bf16(acc), mask=valid)
        else:
            tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=valid)


def _launch(cfg: _Resolved, tensors, base, block: int, num_warps: int) -> torch.Tensor:
    triton, tl, kernel = _kernels()
    xs = [t.contiguous() for t in tensors]  # row chunks already are; a strided view costs one copy here
    b = base.contiguous() if base is not None else None
    dev = xs[0].device
    out = torch.empty(xs[0].shape, dtype=cfg.out_dtype, device=dev)
    n, k = out.numel(), len(xs)
    if n == 0:
        return out
    ptrs = [x.data_ptr() for x in xs]
    pi = torch.tensor(ptrs + [_ph.key_as_int64(x) for x in cfg.keys] + list(cfg.thr24), dtype=torch.int64)
    pf = torch.tensor(cfg.weights + cfg.lo + cfg.hi + cfg.scales, dtype=torch.float32)
    pi, pf = pi.to(dev), pf.to(dev)
    tl_in = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[xs[0].dtype]
    kernel[(triton.cdiv(n, block),)](
        pi,
        pf,
        b if b is not None else out,
        out,
        n,
        cfg.elem_offset,
        _linear_divisor(cfg, "interpolate_triton"),
        cfg.lam,
        K=k,
        IN_DTYPE=tl_in,
        HAS_BASE=b is not None,
        TRIM_LO=cfg.mode in _TRIM_LO,
        TRIM_HI=cfg.mode in _TRIM_HI,
        DARE=cfg.mode in _DARE,
        RESCALE=any(s != 1.0 for s in cfg.scales),
        CONSENSUS=cfg.consensus,
        NORMALIZE=cfg.normalize,
        APPLY_LAM=cfg.lam != 1.0,
        OUT_BF16=cfg.out_dtype == torch.bfloat16,
        ALIGNED=all(p % 16 == 0 for p in ptrs),
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,  # no FMA contraction: each product and sum rounds as in the torch reference
    )
    return out


def interpolate_triton(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    mode: str = "linear",
    base: torch.Tensor | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    thresholds: Sequence[float] | None = None,
    upper_thresholds: Sequence[float] | None = None,
    dare_keys: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    elem_offset: int = 0,
    out_dtype: torch.dtype | None = None,
    block: int = BLOCK,
    num_warps: int = 4,
) -> torch.Tensor:
    """The fused Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); arguments as `interpolate`."""
    cfg = _resolve(
        tensors,
        weights,
        mode,
        base,
        normalize,
        lam,
        thresholds,
        upper_thresholds,
        dare_keys,
        densities,
        scales,
        elem_offset,
        out_dtype,
    )
    if block < 16 or block & (block - 1):
        raise ValueError(f"interpolate_triton: block must be a power of two >= 16, got {block}")
    return _launch(cfg, list(tensors), base, block, num_warps)


def interpolate(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    mode: str = "linear",
    base: torch.Tensor | None = None,
    normalize: bool = False,
    lam: float = 1.0,
    thresholds: Sequence[float] | None = None,
    upper_thresholds: Sequence[float] | None = None,
    dare_keys: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    elem_offset: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge K same-shape chunks in one pass: Triton for CUDA tensors, the torch reference otherwise.

    tensors: the K expert chunks (one dtype: float32/float16/bfloat16); weights: w_k, one per chunk.
    mode: one of MODES (see the module docstring); base: θ_0's chunk, required by every mode but 'linear'.
    normalize: divide by the (consensus) weight sum; lam: λ for the task modes.
    thresholds / upper_thresholds: per-expert magnitude bounds lo_k / hi_k (ties, breadcrumbs*).
    dare_keys / densities: per-expert `philox.stream_key` and keep density (dare_*).
    scales: per-expert survivor scale s_k (default: 1 / density for DARE, 1 otherwise).
    elem_offset: flat index of the chunk's first element in the whole tensor (DARE offsets).
    out_dtype: result dtype (default: the base's, else the inputs').
    """
    args = dict(
        mode=mode,
        base=base,
        normalize=normalize,
        lam=lam,
        thresholds=thresholds,
        upper_thresholds=upper_thresholds,
        dare_keys=dare_keys,
        densities=densities,
        scales=scales,
        elem_offset=elem_offset,
        out_dtype=out_dtype,
    )
    if use_triton(list(tensors) + ([base] if base is not None else [])):
        return interpolate_triton(tensors, weights, **args)
    return interpolate_reference(tensors, weights, **args)
