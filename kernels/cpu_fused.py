"""Fused single-pass CPU kernels for the linear-family hot loops (linear, task_arithmetic), with numba.

Why: the eager CPU path converts every bf16 input chunk to a fresh float32 tensor, then runs one torch op per step
(multiply, add, divide, finite checks, cast back), each a full pass over memory, and allocates a new buffer for
most of them. Here the K raw input chunks (bf16 bits or float32, as stored) are read with one positioned read each
into buffers reused across chunks and tensors, and one compiled loop over blocks of 4096 elements decodes them,
accumulates in float32, checks finiteness and encodes the output dtype (round to nearest even, as torch's cast).

Bits: every element goes through the same float32 operations in the same order as the eager code
(shardmerge.engine.methods.linear / task_arithmetic: products, then sums in input order, then the division, lambda
and base), compiled without fast-math or contraction into fused multiply-adds, so the output bytes are identical
to the eager path's (tests/kernels/test_cpu_fused.py pins it against the eager path for every dtype pair, K, and
parameter branch). Being elementwise, any chunking and worker count gives the same bytes.

Non-finite values: the kernel reports whether any input or output element is NaN/Inf; such a chunk is merged
again by the eager path, which raises its usual error (or, with --allow-nonfinite, produces its usual result).

Optional: numba is an optional dependency (`pip install shardmerge[fast]`). Without it, or with
SHARDMERGE_CPU_KERNELS=torch, every chunk takes the eager torch path, as before. Kernels are compiled on first use
and cached on disk by numba (`cache=True`), so later processes load them instead of compiling. Single-threaded:
a worker already runs one merge per reserved core set; numba's `parallel=True` variant was slower where measured
(BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

_IN_KINDS = {"BF16": np.uint16, "F32": np.float32}  # stored dtype -> how the kernel sees the raw bytes
_OUT_KINDS = {"BF16": (torch.bfloat16, np.uint16), "F32": (torch.float32, np.float32)}
ENV = "SHARDMERGE_CPU_KERNELS"  # "torch": never use the fused kernels
_OUT_RING = 2  # output buffers in rotation (see _Buffers.output)
# Smaller tensors keep the eager path: loading numba and its cached kernels is a fixed cost per process
# (BENCHMARKS.md) that a merge made only of small tensors would not earn back.
MIN_NUMEL = 1 << 20

_kernels = None  # the compiled module (shardmerge.kernels._cpu_fused_nb) once loaded; False: unavailable


def available() -> bool:
    """Whether the fused kernels can run here: numba importable and not turned off by SHARDMERGE_CPU_KERNELS."""
    if os.environ.get(ENV, "").lower() == "torch":
        return False
    return _load_kernels() is not None


def _load_kernels():
    global _kernels
    if _kernels is None:
        if importlib.util.find_spec("numba") is None:
            _kernels = False
        else:
            from shardmerge.kernels import _cpu_fused_nb

            _kernels = _cpu_fused_nb
    return _kernels or None


# ----------------------------------------------------------------------------------------------- reused buffers
class _Buffers:
    """Grow-only buffers of one process, reused by every chunk of every tensor (no allocation, no page faults in
    the steady state). Inputs: one (rows x capacity) array per raw dtype. Outputs: a ring of _OUT_RING arrays per
    output dtype, because a yielded chunk is still being written and hashed in the background while the next is
    computed: the unit's writer holds at most one chunk in flight (shardmerge.engine.run.unit._Sink.put waits for
    the previous one; tests/kernels/test_cpu_fused.py pins that), so two buffers suffice. Memory: the K (+ base)
    raw input chunks and two output chunks, within the per-tensor estimate of shardmerge.engine.run.memory (K (+
    base) float32 chunks, the float32 result and its output-dtype copy)."""

    def __init__(self) -> None:
        self.inputs: dict[tuple, np.ndarray] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.turn = 0

    def input(self, kind: type, rows: int, numel: int) -> np.ndarray:
        buf = self.inputs.get(kind)
        if buf is None or buf.shape[0] < rows or buf.shape[1] < numel:
            old = (0, 0) if buf is None else buf.shape
            self.inputs[kind] = buf = np.empty((max(rows, old[0]), max(numel, old[1])), dtype=kind)
        return buf

    def output(self, code: str, numel: int) -> torch.Tensor:
        ring = self.outputs.setdefault(code, [])
        self.turn = (self.turn + 1) % _OUT_RING
        while len(ring) <= self.turn:
            ring.append(torch.empty(0, dtype=_OUT_KINDS[code][0]))
        if ring[self.turn].numel() < numel:
            ring[self.turn] = torch.empty(numel, dtype=_OUT_KINDS[code][0])
        return ring[self.turn][:numel]

    def release(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


BUFFERS = _Buffers()


def _read_into(meta, row_start: int, row_stop: int, dst: np.ndarray) -> None:
    """Rows [row_start, row_stop) of a stored tensor, raw bytes, into dst (contiguous) with one positioned read."""
    from shardmerge.engine.io.checkpoint import _open_fd

    nbytes = (row_stop - row_start) * meta.row_numel * meta.itemsize
    view = memoryview(dst).cast("B")
    got = os.preadv(_open_fd(meta.file), [view], meta.begin + row_start * meta.row_numel * meta.itemsize)
    if got != nbytes:
        raise RuntimeError(
            f"{meta.file}: tensor {meta.name!r}: short read ({got} of {nbytes} bytes); the file changed or is truncated"
        )


# ----------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class FusedPlan:
    """How one output tensor is merged by a fused kernel: the raw inputs (base last, when used), the kernel and
    its float32 scalars."""

    kernel: str  # "linear" | "task_arithmetic"
    metas: tuple  # TensorMeta of the inputs, then the base for task_arithmetic
    in_code: str
    out_code: str
    weights: np.ndarray  # float32, one per non-base input
    divisor: np.float32  # linear: the weights' float32 sum; task_arithmetic: the divisor (0 -> 1)
    normalize: bool
    lam: np.float32
    use_lam: bool


def _plain(meta) -> bool:
    """A tensor stored as plain safetensors bytes (not formed in the read path, not a legacy .bin)."""
    return meta is not None and getattr(meta, "read_rows", None) is None and not meta.file.endswith(".bin")


def plan_for(t, device: str) -> FusedPlan | None:
    """The fused plan of output tensor `t` (shardmerge.engine.plan.build.OutputTensor), or None when the eager path
    must merge it: another method or device, mixed or other dtypes, inputs formed in the read path, tensors below
    MIN_NUMEL elements, or parameters the method itself would reject (it then raises its own error)."""
    if device != "cpu" or t.op not in ("linear", "task_arithmetic"):
        return None
    if not t.shape or 0 in t.shape or t.dtype not in _OUT_KINDS or math.prod(t.shape) < MIN_NUMEL:
        return None
    metas = tuple(t.inputs) + ((t.base,) if t.op == "task_arithmetic" else ())
    if not metas or not all(_plain(m) for m in metas):
        return None
    if t.op == "linear" and t.base is not None:
        return None
    codes = {m.dtype for m in metas}
    if len(codes) != 1 or next(iter(codes)) not in _IN_KINDS or any(m.shape != tuple(t.shape) for m in metas):
        return None
    if not available():  # last: the first call imports numba
        return None
    from shardmerge.engine.methods.base import TensorInfo
    from shardmerge.engine.methods.common import check_fraction, per_model

    params = dict(t.params)
    info = TensorInfo(t.name, t.shape, t.layer, t.num_layers)
    try:
        w = per_model("weight", params["weight"], len(t.inputs), info)
        if t.op == "task_arithmetic":
            check_fraction("density", per_model("density", params["density"], len(t.inputs), info), info)
    except (KeyError, ValueError):
        return None
    wt = torch.tensor(w, dtype=torch.float32)  # the eager code's own float32 weights and their float32 sum
    total = float(wt.sum())
    if t.op == "linear":
        normalize = bool(params["normalize"])
        if normalize and total == 0.0:
            return None
        return FusedPlan("linear", metas, codes.pop(), t.dtype, wt.numpy(), np.float32(total), normalize,
                         np.float32(1.0), False)  # fmt: skip
    lam = float(params["lambda"])
    divisor = 1.0 if abs(total) < 1e-8 else total
    return FusedPlan("task_arithmetic", metas, codes.pop(), t.dtype, wt.numpy(), np.float32(divisor),
                     bool(params["normalize"]), np.float32(lam), lam != 1)  # fmt: skip


# ----------------------------------------------------------------------------------------------- running
def run(plan: FusedPlan, chunks, eager: Callable) -> Iterator[torch.Tensor]:
    """Yield the output tensor's chunks (output dtype, CPU) as the eager path would; `eager(chunk)` merges one
    chunk the eager way (used when the kernel saw a NaN/Inf). A yielded tensor is a view of a reused buffer: it
    stays valid until _OUT_RING - 1 further chunks have been produced."""
    nb = _load_kernels()
    kernel = nb.linear if plan.kernel == "linear" else nb.task_arithmetic
    kind = _IN_KINDS[plan.in_code]
    row_numel = plan.metas[0].row_numel
    shape_tail = plan.metas[0].shape[1:]
    for c in chunks:
        n = (c.row_stop - c.row_start) * row_numel
        ins = BUFFERS.input(kind, len(plan.metas), n)
        for k, m in enumerate(plan.metas):
            _read_into(m, c.row_start, c.row_stop, ins[k, :n])
        out = BUFFERS.output(plan.out_code, n)
        dst = out.numpy() if plan.out_code == "F32" else out.view(torch.int16).numpy().view(np.uint16)
        if plan.kernel == "linear":
            bad = kernel(ins, n, plan.weights, plan.divisor, plan.normalize, dst)
        else:
            bad = kernel(ins, n, plan.weights, plan.divisor, plan.normalize, plan.lam, plan.use_lam, dst)
        if bad:
            yield eager(c)
        else:
            yield out.view((c.row_stop - c.row_start, *shape_tail))
