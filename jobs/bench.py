"""`shardmerge bench NAME …` / `python -m shardmerge.jobs.bench NAME …`: benchmarks that print ratios measured side by side in
one run. Each lives in jobs/bench_<name>.py with `main(argv)`; results and commands are recorded in BENCHMARKS.md.

  vs-mergekit  shardmerge vs mergekit-yaml on the same recipes (wall, fixed start-up, sustained, memory)
  floor        sustained merge time / (read all inputs + write+fsync outputs)
  memory-72b   peak private memory per worker merging Qwen2.5-VL-72B-shaped layers
  scaling      1 vs 2 (vs N) workers on a CPU-bound method
  probe        full cut-layer sweep cost / one unmasked pass
  kernels      Triton kernels: GB/s, ratio to device copy, speedup over eager torch
  svd          SVD merge methods vs a per-matrix torch.linalg.svd loop
  pivot        PivotMerge vs the baselines on projector experts trained here (held-out retrieval, log-likelihood)
  object-store read throughput from a local S3 server vs local disk; reader memory vs its chunk buffer
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "vs-mergekit": "shardmerge.jobs.bench_mergekit",
    "floor": "shardmerge.jobs.bench_floor",
    "memory-72b": "shardmerge.jobs.bench_memory72b",
    "scaling": "shardmerge.jobs.bench_scaling",
    "probe": "shardmerge.jobs.bench_probe",
    "kernels": "shardmerge.jobs.bench_kernels",
    "svd": "shardmerge.jobs.bench_svd",
    "pivot": "shardmerge.jobs.bench_pivot",
    "object-store": "shardmerge.jobs.bench_object_store",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark {argv[0]!r}; choose one of: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        return 0
    return importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
