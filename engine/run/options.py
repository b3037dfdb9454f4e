"""How work units run: one frozen, picklable value built once by the driver and handed whole to the in-process loop,
the Ray pool, every merge worker and `run_unit`, instead of the same keyword arguments threaded through each layer.

It holds only what a unit needs to compute and write its tensors; where units run (worker count, cluster address,
memory reservation) is the executor's business. The batched-SVD budget arrives resolved: the driver decides once
(shardmerge.engine.run.memory.svd_batch_budget) and every worker uses that decision.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class RunOptions:
    """`chunk_bytes`: row-chunk size of one float32 input chunk (--chunk-mb); `device`: where tensors are merged;
    `allow_nonfinite`: merge inputs holding NaN/Inf (--allow-nonfinite); `threads`: torch threads of a merge worker
    (the in-process path leaves this process's setting alone); `svd_batch_bytes`: byte budget of one batched call
    of same-shape whole matrices, None when batching is off."""

    chunk_bytes: int = 64 << 20
    device: str = "cpu"
    allow_nonfinite: bool = False
    threads: int = 1
    svd_batch_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: expected cpu or cuda")
        if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1:
            raise ValueError(f"chunk size must be a positive number of bytes, got {self.chunk_bytes!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"--threads-per-worker must be a positive integer, got {self.threads!r}")
        b = self.svd_batch_bytes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"SVD batch budget must be a positive number of bytes or None, got {b!r}")

    @property
    def batching(self) -> bool:
        """Whether same-shape whole matrices of a unit share batched calls (a budget was given)."""
        return self.svd_batch_bytes is not None
