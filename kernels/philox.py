"""Counter-based RNG for DARE: Philox4x32-10 exactly as `triton.language.randint` computes it.

Why counter-based: a DARE keep/drop decision must depend only on (seed, tensor name, expert, element index), never
on the worker count, the chunking, the block size or the device. Philox maps (key, counter) -> random bits with no
state, so any worker can produce the bits of any element directly.

The stream: key = `stream_key(seed, tensor_name, expert)` (64 bits from blake2b, never Python's `hash()`, which is
salted per process). Its low 32 bits are Philox key word k0, its high 32 bits k1. The flat element index `offset`
(int64, may exceed 2**32) gives counter words c0 = offset & 0xFFFFFFFF, c1 = offset >> 32, c2 = c3 = 0. The random
word r is Philox output word 0 after 10 rounds - what `tl.randint(key, offset)` returns for an int64 `offset`.

The DARE rule: keep element iff (r >> 8) < threshold24(density), threshold24(d) = floor(d * 2**24 + 1/2). The keep
probability is exactly threshold24(d) / 2**24; integer comparison makes Triton and torch agree bit for bit.
density 1 keeps everything, density 0 drops everything.

Files: `_philox_kernel` (Triton, writes tl.randint) + `philox_triton()` + `philox_reference()` (torch int64
arithmetic masked to 32 bits, bit-identical) + `philox()` dispatcher, and `dare_keep_mask()`.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from shardmerge.kernels._util import import_triton

# Philox4x32 constants, as in triton/language/random.py (uint32 branch).
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# The reference works on blocks of this many offsets. Measured single-threaded on 2M offsets:
# 2**12 -> 0.47 s, 2**14 -> 0.24 s, 2**16 -> 0.33 s, 2**18 -> 0.6 s (cache-resident temporaries win). Blocks above
# torch's 32768-element grain size are also split across intra-op threads, which on a busy machine was 30x slower.
_REF_BLOCK = 1 << 14


def stream_key(seed: int, tensor_name: str, expert: int) -> int:
    """The 64-bit Philox key of one DARE stream: blake2b-64 of f"{seed}\\0{tensor_name}\\0{expert}", little endian.

    Stable across processes, machines and Python versions, so every worker draws the same mask.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"stream_key: seed must be an int, got {seed!r}")
    if not isinstance(tensor_name, str):
        raise ValueError(f"stream_key: tensor_name must be a str, got {tensor_name!r}")
    if not isinstance(expert, int) or isinstance(expert, bool) or expert < 0:
        raise ValueError(f"stream_key: expert must be an int >= 0, got {expert!r}")
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def key_words(key: int) -> tuple[int, int]:
    """Split a 64-bit key into Philox key words (k0 = low 32 bits, k1 = high 32 bits), as tl.philox does."""
    if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= _MASK64:
        raise ValueError(f"philox key must be an int in [0, 2**64), got {key!r}")
    return key & _MASK32, key >> 32


def key_as_int64(key: int) -> int:
    """The key's 64 bits as a signed int64 value (for storing keys in an int64 tensor a kernel loads)."""
    key_words(key)
    return key - (1 << 64) if key >= (1 << 63) else key


def threshold24(density: float) -> int:
    """Integer keep threshold for 24-bit uniforms: floor(density * 2**24 + 1/2), in [0, 2**24]."""
    d = float(density)
    if not 0.0 <= d <= 1.0 or math.isnan(d):
        raise ValueError(f"DARE density must be in [0, 1], got {density!r}")
    return int(math.floor(d * (1 << 24) + 0.5))


def _check_offsets(offsets: torch.Tensor) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets)
        raise ValueError(f"philox: offsets must be an int64 tensor, got {got}")
    if offsets.numel() and int(offsets.min()) < 0:
        raise ValueError(f"philox: offsets must be >= 0, got minimum {int(offsets.min())}")


def _philox_block(k0: int, k1: int, offsets: torch.Tensor) -> torch.Tensor:
    """Ten Philox rounds on one block of int64 offsets; every word is a uint32 value held in int64.

    Products of a 32-bit constant and a 32-bit word need 64 bits: the int64 multiply wraps past 2**63 (two's
    complement, as torch's CPU and CUDA integer kernels do), and the arithmetic shift + mask still yields the exact
    high word; the tests compare against Triton bit for bit, products above 2**63 included. In-place ops keep the
    temporaries at four arrays.
    """
    c0 = offsets & _MASK32
    c1 = offsets >> 32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(N_ROUNDS):
        p_b = c2.mul_(PHILOX_ROUND_B)  # old c2 is not needed past this point
        p_a = c0.mul_(PHILOX_ROUND_A)
        c0 = (p_b >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (p_a >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = p_b.bitwise_and_(_MASK32)
        c3 = p_a.bitwise_and_(_MASK32)
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0


def philox_reference(key: int, offsets: torch.LongTensor) -> torch.Tensor:
    """Philox4x32-10 output word 0 for each offset (uint32 values held in int64), bit-identical to tl.randint."""
    k0, k1 = key_words(key)
    _check_offsets(offsets)
    flat = offsets.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _REF_BLOCK):
        stop = start + _REF_BLOCK
        out[start:stop] = _philox_block(k0, k1, flat[start:stop])
    return out.reshape(offsets.shape)


# Bound by _kernels() on first launch.
tl = _philox_kernel = None


@functools.lru_cache(maxsize=1)
def _kernels():
    """Define the Triton kernel on first use (see shardmerge.kernels._util for why this is deferred).

    Bound as a module global: Triton resolves the names a kernel uses through the module's globals, not closures.
    """
    global tl, _philox_kernel
    triton, tl = import_triton()

    @triton.jit
    def _philox_kernel(key, offsets_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < n
        offs = tl.load(offsets_ptr + idx, mask=valid, other=0)
        r = tl.randint(key, offs)
        tl.store(out_ptr + idx, r.to(tl.int64), mask=valid)

    return triton, _philox_kernel


def philox_triton(key: int, offsets: torch.LongTensor, block: int = 1024) -> torch.Tensor:
    """tl.randint(key, offsets) computed by a Triton kernel (uint32 values in int64), same device as offsets."""
    key_words(key)
    _check_offsets(offsets)
    triton, kernel = _kernels()
    flat = offsets.reshape(-1).contiguous()
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        kernel[(triton.cdiv(n, block),)](key, flat, out, n, BLOCK=block)
    return out.reshape(offsets.shape)


def philox(key: int, offsets: torch.LongTensor) -> torch.Tensor:
    """Dispatcher: the Triton kernel for CUDA offsets, the torch reference otherwise."""
    if offsets.is_cuda:
        return philox_triton(key, offsets)
    return philox_reference(key, offsets)


def dare_keep_mask(key: int, offsets: torch.LongTensor, density: float) -> torch.BoolTensor:
    """DARE keep mask: True where (philox(key, offset) >> 8) < threshold24(density)."""
    thr = threshold24(density)
    if thr >= 1 << 24:  # r >> 8 < 2**24 always: skip the RNG, same answer
        _check_offsets(offsets)
        return torch.ones(offsets.shape, dtype=torch.bool, device=offsets.device)
    return (philox(key, offsets) >> 8) < thr


__all__ = [
    "N_ROUNDS",
    "dare_keep_mask",
    "key_as_int64",
    "key_words",
    "philox",
    "philox_reference",
    "philox_triton",
    "stream_key",
    "threshold24",
]
