"""`object-store` benchmark: read throughput of model files from a local S3-compatible server vs the same files on
local disk, through the engine's own row-chunk reads, and the peak memory of a reading process against its chunk
buffer. Also times the two S3 clients that were candidates for ranged reads (boto3, pyarrow.fs) on the same bytes.

    python -m shardmerge.jobs.bench object-store [--size-mb 256] [--chunk-mb 16] [--repeat 3] [--json FILE]

The server is moto behind shardmerge.jobs.s3_local's proxy, on 127.0.0.1: it measures the engine's per-request
overhead and the client stack, not a network (a real store adds latency per request, which larger chunks hide).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_READER = r"""
import json, sys, time
import psutil
from shardmerge.engine.io.checkpoint import parse_safetensors_header, read_rows
path, chunk = sys.argv[1], int(sys.argv[2])
metas = parse_safetensors_header(path)
proc = psutil.Process()
rss0 = peak = proc.memory_info().rss  # resident now (not the import peak): growth is what reading adds
t0, n = time.perf_counter(), 0
for m in metas.values():
    step = max(1, chunk // max(1, m.row_numel * m.itemsize))
    for r in range(0, m.rows, step):
        x = read_rows(m, r, min(m.rows, r + step))
        n += x.numel() * x.element_size()
        peak = max(peak, proc.memory_info().rss)
        del x
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "bytes": n, "rss_before": rss0, "rss_peak": peak}))
"""


def make_file(path: Path, size_mb: int) -> int:
    import torch
    from safetensors.torch import save_file

    rows = 4096
    cols = max(1, (size_mb << 20) // (4 * rows * 4))
    g = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(rows, cols, generator=g) for i in range(4)}, str(path))
    return path.stat().st_size


def read_child(path: str, chunk: int, env: dict) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _READER, path, str(chunk)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def client_compare(s3, bucket: str, key: str, size: int, chunk: int) -> dict:
    """Seconds to read the object in `chunk` ranges with boto3 and with pyarrow.fs.S3FileSystem."""
    c = s3.client()
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        c.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{min(size, off + chunk) - 1}")["Body"].read()
    boto = time.perf_counter() - t0
    out = {"boto3_s": boto}
    try:
        from pyarrow import fs

        pfs = fs.S3FileSystem(
            access_key=s3.key_id,
            secret_key=s3.secret,
            endpoint_override=s3.endpoint,
            scheme="http",
            region=s3.region,
        )
        f = pfs.open_input_file(f"{bucket}/{key}")
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            f.read_at(min(chunk, size - off), off)
        out["pyarrow_s"] = time.perf_counter() - t0
    except Exception as exc:  # a missing or failing backend is reported, not fatal
        out["pyarrow_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardmerge bench object-store", description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=256)
    p.add_argument("--chunk-mb", type=float, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from shardmerge.jobs.s3_local import LocalS3

    chunk = max(1, int(args.chunk_mb * 2**20))
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp, LocalS3() as s3:
        path = Path(tmp) / "model.safetensors"
        size = make_file(path, args.size_mb)
        c = s3.client()
        c.create_bucket(Bucket="bench")
        c.upload_file(str(path), "bench", "m/model.safetensors")
        env = dict(os.environ, **s3.env())
        path.read_bytes()  # page cache: the local side reads from memory, as a re-read model would
        rows = []
        for i in range(args.repeat):  # alternating, so load changes hit both sides alike
            local = read_child(str(path), chunk, env)
            remote = read_child("s3://bench/m/model.safetensors", chunk, env)
            clients = client_compare(s3, "bench", "m/model.safetensors", size, chunk)
            rows.append({"local": local, "s3": remote, **clients})
            print(
                f"run {i + 1}: local {size / local['seconds'] / 2**20:.0f} MiB/s, s3 {size / remote['seconds'] / 2**20:.0f}"
                f" MiB/s (ratio {remote['seconds'] / local['seconds']:.1f}x); s3 reader peak RSS growth "
                f"{(remote['rss_peak'] - remote['rss_before']) / 2**20:.0f} MiB for a {chunk / 2**20:.0f} MiB chunk "
                f"of a {size / 2**20:.0f} MiB file; clients on {chunk / 2**20:.0f} MiB ranges: boto3 "
                f"{size / clients['boto3_s'] / 2**20:.0f} MiB/s"
                + (f", pyarrow.fs {size / clients['pyarrow_s'] / 2**20:.0f} MiB/s" if "pyarrow_s" in clients else ""),
                flush=True,
            )
    result = {"size_bytes": size, "chunk_bytes": chunk, "runs": rows, "loadavg": os.getloadavg()[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
