"""The merge-worker role: one per GPU (or per CPU slot); pulls work units from the driver and writes shards.

Heavy state (device, thread count, CUDA context, kernel warm-up) is built once in __init__. The actor is created
with max_restarts=0: a dead worker is replaced by the driver, which re-queues its in-flight units (idempotent: a
unit rewrites the same bytes at the same offsets).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

from engine.unit import UnitResult, run_unit
from engine.writer import finalize_shard


class FaultInjector:
    """Test hook: `crash:<token file>:<k>` makes the first worker to reach its k-th unit exit hard (os._exit),
    once per token file, as a crashing process or a lost node would."""

    def __init__(self, spec: Optional[str]):
        self.token: Optional[Path] = None
        self.k = 0
        if spec:
            kind, token, k = spec.split(":")
            if kind != "crash":
                raise ValueError(f"fault spec {spec!r}: expected crash:<token file>:<k>")
            self.token, self.k = Path(token), int(k)

    def before_unit(self, count: int) -> None:
        if self.token is not None and count + 1 >= self.k:
            try:
                fd = os.open(self.token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(17)


class MergeWorker:
    def __init__(self, out: str, shards, *, chunk_bytes: int, device: str, threads: int,
                 allow_nonfinite: bool = False, fault: Optional[str] = None):
        import torch

        torch.set_num_threads(max(1, threads))
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"worker on {socket.gethostname()}: --device cuda but no CUDA device is visible")
            torch.cuda.init()
        self.out, self.shards, self.chunk_bytes = out, shards, chunk_bytes
        self.device, self.allow_nonfinite = device, allow_nonfinite
        self.fault = FaultInjector(fault)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.count = 0

    def ready(self) -> str:
        return self.name

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, unit, skip_shards: frozenset = frozenset()) -> UnitResult:
        self.fault.before_unit(self.count)
        self.count += 1
        return run_unit(unit, self.shards, self.out, chunk_bytes=self.chunk_bytes, device=self.device,
                        allow_nonfinite=self.allow_nonfinite, worker=self.name, skip_shards=skip_shards)

    def finalize(self, shard) -> tuple[str, str, int]:
        sha, size = finalize_shard(Path(self.out), shard)
        return shard.filename, sha, size

    def shutdown(self) -> None:
        from engine.checkpoint import close_cached_files

        close_cached_files()
