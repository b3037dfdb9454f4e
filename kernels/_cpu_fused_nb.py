"""The numba loops behind shardmerge.kernels.cpu_fused (imported only when numba is installed).

Each kernel walks the chunk in blocks of BLOCK elements: decode each raw input block to float32 (bf16: the bits
shifted left by 16, exact), combine, encode the output (bf16: round to nearest even; NaN -> 0x7FC0, as torch).
Returns nonzero when an input or output element is NaN/Inf. Float32 throughout: every constant is a float32 and
numba's default (no fast-math) keeps each multiply and add separately rounded, as torch's eager ops are.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

BLOCK = 4096  # elements per inner block: the decoded inputs and the accumulator stay in L1/L2 cache

_EXP32 = np.uint32(0x7F800000)
_MANT32 = np.uint32(0x007FFFFF)


def _decode(src, k, i0, n, xu, xf):  # pragma: no cover - replaced by the overloads below inside numba
    raise NotImplementedError


@overload(_decode)
def _decode_impl(src, k, i0, n, xu, xf):
    if src.dtype == types.uint16:

        def impl(src, k, i0, n, xu, xf):
            bad = np.uint16(0)
            for j in range(n):
                b = src[k, i0 + j]
                bad |= np.uint16((b & np.uint16(0x7F80)) == np.uint16(0x7F80))
                xu[j] = np.uint32(b) << np.uint32(16)
            return bad != 0

        return impl
    if src.dtype == types.float32:

        def impl(src, k, i0, n, xu, xf):
            bad = np.uint32(0)
            for j in range(n):
                v = src[k, i0 + j]
                xf[j] = v
                bad |= np.uint32(not np.isfinite(v))
            return bad != 0

        return impl
    return None


def _encode(acc, au, dst, i0, n):  # pragma: no cover - replaced by the overloads below inside numba
    raise NotImplementedError


@overload(_encode)
def _encode_impl(acc, au, dst, i0, n):
    if dst.dtype == types.uint16:

        def impl(acc, au, dst, i0, n):
            bad = np.uint32(0)
            for j in range(n):
                u = au[j]
                e = (u & _EXP32) == _EXP32
                bad |= np.uint32(e)
                r = np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))
                dst[i0 + j] = np.uint16(0x7FC0) if (e and (u & _MANT32) != 0) else r
            return bad != 0

        return impl
    if dst.dtype == types.float32:

        def impl(acc, au, dst, i0, n):
            bad = np.uint32(0)
            for j in range(n):
                v = acc[j]
                bad |= np.uint32(not np.isfinite(v))
                dst[i0 + j] = v
            return bad != 0

        return impl
    return None


@njit(nogil=True, cache=True)
def linear(ins, n, w, total, normalize, dst):
    """dst = ((0 + x_1 w_1) + x_2 w_2 + ...) [/ total] over rows 0..K-1 of ins, K = len(w)."""
    K = w.shape[0]
    xu = np.empty(BLOCK, np.uint32)
    xf = xu.view(np.float32)
    acc = np.empty(BLOCK, np.float32)
    au = acc.view(np.uint32)
    bad = False
    for i0 in range(0, n, BLOCK):
        m = min(BLOCK, n - i0)
        acc[:m] = np.float32(0.0)
        for k in range(K):
            bad |= _decode(ins, k, i0, m, xu, xf)
            wk = w[k]
            for j in range(m):
                acc[j] = acc[j] + xf[j] * wk
        if normalize:
            for j in range(m):
                acc[j] = acc[j] / total
        bad |= _encode(acc, au, dst, i0, m)
    return bad


@njit(nogil=True, cache=True)
def task_arithmetic(ins, n, w, divisor, normalize, lam, use_lam, dst):
    """dst = ((x_1 - b) w_1 + (x_2 - b) w_2 + ...) [/ divisor] [* lam] + b, b = row K of ins, K = len(w)."""
    K = w.shape[0]
    xu = np.empty(BLOCK, np.uint32)
    xf = xu.view(np.float32)
    bu = np.empty(BLOCK, np.uint32)
    bf = bu.view(np.float32)
    acc = np.empty(BLOCK, np.float32)
    au = acc.view(np.uint32)
    bad = False
    for i0 in range(0, n, BLOCK):
        m = min(BLOCK, n - i0)
        bad |= _decode(ins, K, i0, m, bu, bf)
        for k in range(K):
            bad |= _decode(ins, k, i0, m, xu, xf)
            wk = w[k]
            if k == 0:
                for j in range(m):
                    acc[j] = (xf[j] - bf[j]) * wk
            else:
                for j in range(m):
                    acc[j] = acc[j] + (xf[j] - bf[j]) * wk
        if normalize:
            for j in range(m):
                acc[j] = acc[j] / divisor
        if use_lam:
            for j in range(m):
                acc[j] = acc[j] * lam
        for j in range(m):
            acc[j] = acc[j] + bf[j]
        bad |= _encode(acc, au, dst, i0, m)
    return bad
