"""Shared pieces of the merge benchmarks: checkpoint generation, timing of child processes, memory measurement,
the I/O floor, and the machine description printed beside every result.

Memory is measured from outside, by sampling /proc/<pid>/status of the benchmarked process and all of its
descendants (Ray's raylet, GCS and worker processes included) every `interval` seconds:
- peak private memory = the highest RssAnon seen (anonymous resident pages: the process's own working memory;
  file-backed pages of mmap'ed inputs are page cache, shared and reclaimable, and are not counted);
- max RSS = VmHWM (the kernel's own peak RSS of the address space, file-backed pages included).
ru_maxrss is not used: a child created by fork+exec reports the parent's peak when that was higher.
RssAnon has no kernel peak counter, so its peak is sampled: a spike shorter than the interval can be missed.

Checkpoints are random-valued and written by a streaming safetensors writer (no whole tensor is ever built, so
generating 2.5 GB tensors costs no more memory than a 64 MiB block). To generate gigabytes quickly on two cores,
each row block is a slice, at a seeded offset, of one seeded pool of N(0, 1) values; experts add a second slice
scaled by `noise` to the base's block, so they share a base like fine-tunes do.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

POOL_NUMEL = 1 << 24  # 16M values (32 MiB bf16): the random pool every block is cut from
BLOCK_NUMEL = 1 << 22  # elements generated and written per write() call
_ST_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# ----------------------------------------------------------------------------------------------- checkpoints
def llama_shapes(
    *, hidden: int, intermediate: int, vocab: int, layers: int, heads: int, kv_heads: int
) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama checkpoint as transformers writes it (untied head)."""
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    return shapes


def llama_config(size_gb: float, itemsize: int = 2) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A Llama config whose checkpoint holds about `size_gb` GB (10^9 bytes): hidden 1024 / intermediate 4096 /
    vocab 32000 (28 layers = 0.54 B params = 1.07 GB in bf16) from 0.5 GB up; hidden 512 below that."""
    if size_gb <= 0:
        raise ValueError(f"--size-gb must be positive, got {size_gb}")
    hidden, vocab = (1024, 32000) if size_gb >= 0.5 else (512, 16000)
    inter, heads = 4 * hidden, hidden // 64
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * itemsize
    fixed = (2 * vocab * hidden + hidden) * itemsize
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    return cfg, llama_shapes(hidden=hidden, intermediate=inter, vocab=vocab, layers=layers, heads=heads, kv_heads=heads)


class _Pool:
    """Seeded N(0, scale^2) values; `block(key, n)` is n of them starting at an offset derived from `key`."""

    def __init__(self, seed: int, dtype: torch.dtype, scale: float):
        g = torch.Generator().manual_seed(seed)
        self.values = (torch.randn(POOL_NUMEL + BLOCK_NUMEL, generator=g) * scale).to(dtype)

    def block(self, key: tuple, n: int) -> torch.Tensor:
        if n > BLOCK_NUMEL:
            raise ValueError(f"block of {n} elements is larger than BLOCK_NUMEL={BLOCK_NUMEL}")
        start = hash_key(key) % POOL_NUMEL
        return self.values[start : start + n]


def hash_key(key: tuple) -> int:
    """A stable (process-independent) non-negative hash of a tuple of strs/ints (Python's hash() is salted)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in shapes:
        nbytes = math.prod(shapes[name]) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_tensor(
    f, pool: _Pool, noise_pool: _Pool | None, name: str, shape: tuple[int, ...], model: int, dtype: torch.dtype
) -> None:
    """Matrices: the pool's values (std 0.02) plus the expert's noise; 1-D tensors (norms): 1 + 5 x (std 0.1)."""
    numel = math.prod(shape)
    for b, start in enumerate(range(0, numel, BLOCK_NUMEL)):
        n = min(BLOCK_NUMEL, numel - start)
        x = pool.block((name, b), n)
        if noise_pool is not None:
            x = x + noise_pool.block((model, name, b), n)
        if len(shape) == 1:
            x = (1 + 5 * x.float()).to(dtype)
        f.write(memoryview(x.contiguous().view(torch.uint8).numpy()))


def write_checkpoint(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    config: dict,
    *,
    model: int = 0,
    noise: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 * 10**9,
    seed: int = 0,
) -> Path:
    """Write a sharded safetensors checkpoint (+ index + config.json) block by block. model 0 with noise 0 is the
    base; an expert (model >= 1, noise > 0) is base + noise * (its own random values), tensor by tensor.
    Weights have std 0.02 (1-D tensors: 1 + 0.1 x) like an initialised transformer."""
    out.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    pool = _Pool(seed, dtype, 0.02)
    noise_pool = _Pool(seed + 1 + model, dtype, 0.02 * noise) if noise > 0 else None
    shards = _plan_shards(shapes, itemsize, shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * itemsize
            header[name] = {
                "dtype": _ST_CODES[dtype],
                "shape": list(shapes[name]),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                _write_tensor(f, pool, noise_pool, name, shapes[name], model, dtype)
        total += offset
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- memory sampling
def _status(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "VmHWM", "VmRSS"):
            out[key] = int(rest.split()[0]) * 1024
    return out if "RssAnon" in out else None


def _minflt(pid: int) -> int:
    """Minor page faults of a process so far (field 10 of /proc/PID/stat), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def _role(pid: int, root: int) -> str:
    """driver (the benchmarked process), merge-worker (a Ray MergeWorker actor), or ray (Ray's own processes)."""
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    return "merge-worker" if "MergeWorker" in cmd else "ray"


@dataclass
class ProcPeak:
    role: str
    private_peak: int = 0  # max sampled RssAnon
    hwm: int = 0  # last VmHWM seen (the kernel's peak RSS; monotone)
    minflt: int = 0  # last minor page-fault count seen (/proc/PID/stat; monotone)


@dataclass
class TreeSampler:
    """Samples RssAnon/VmHWM of a process and its descendants in a background thread until stop()."""

    root: int
    interval: float = 0.05
    procs: dict[int, ProcPeak] = field(default_factory=dict)
    total_private_peak: int = 0
    samples: int = 0

    def start(self) -> TreeSampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                pids = [self.root] + [c.pid for c in psutil.Process(self.root).children(recursive=True)]
            except psutil.Error:
                pids = [self.root]
            total = 0
            for pid in pids:
                st = _status(pid)
                if st is None:
                    continue
                p = self.procs.get(pid)
                if p is None or p.role == "ray":  # a Ray worker process takes its actor name after start-up
                    role = _role(pid, self.root)
                    p = self.procs[pid] = ProcPeak(role, p.private_peak if p else 0, p.hwm if p else 0,
                                                   p.minflt if p else 0)  # fmt: skip
                p.private_peak = max(p.private_peak, st["RssAnon"])
                p.minflt = max(p.minflt, _minflt(pid))
                p.hwm = max(p.hwm, st.get("VmHWM", 0))
                total += st["RssAnon"]
            self.total_private_peak = max(self.total_private_peak, total)
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.summary()

    def summary(self) -> dict:
        """Peaks by role: driver, each merge worker, Ray's other processes, and the whole tree's private total."""
        workers = [p for p in self.procs.values() if p.role == "merge-worker"]
        driver = [p for p in self.procs.values() if p.role == "driver"]
        ray_other = [p for p in self.procs.values() if p.role == "ray"]
        return {
            "driver_private_peak": max((p.private_peak for p in driver), default=0),
            "driver_max_rss": max((p.hwm for p in driver), default=0),
            "worker_private_peaks": sorted((p.private_peak for p in workers), reverse=True),
            "worker_max_rss": max((p.hwm for p in workers), default=0),
            "worker_minflt": sum(p.minflt for p in workers),
            "ray_private_peak_sum": sum(p.private_peak for p in ray_other),
            "tree_private_peak": self.total_private_peak,
            "samples": self.samples,
        }


@dataclass
class ChildRun:
    wall_s: float
    rc: int
    stdout: str
    stderr: str
    mem: dict

    def last_json(self) -> dict:
        """The last stdout line that parses as a JSON object (a child's result line)."""
        for line in reversed(self.stdout.strip().splitlines()):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
        raise RuntimeError(f"child printed no JSON result line; stderr tail:\n{self.stderr[-2000:]}")


def run_child(
    cmd: Sequence[str], *, env: dict | None = None, timeout: float = 3600, interval: float = 0.05
) -> ChildRun:
    """Run a command, timing its wall clock and sampling its process tree's memory; raises on a non-zero exit."""
    full_env = dict(os.environ, **(env or {}))
    faults0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    sampler = TreeSampler(proc.pid, interval).start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        sampler.stop()
        raise RuntimeError(f"{cmd[0]}: timed out after {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    mem = sampler.stop()
    mem["process_minflt"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults0  # the whole child
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:300]}: exit code {proc.returncode}; stderr tail:\n{err[-3000:]}")
    return ChildRun(wall, proc.returncode, out, err, mem)


# ----------------------------------------------------------------------------------------------- I/O floor
def read_all(paths: Sequence[Path], block: int = 64 << 20) -> tuple[float, int]:
    """Seconds to read every byte of `paths` (positioned reads into one reused buffer) and the byte count."""
    buf = bytearray(block)
    t0, total = time.perf_counter(), 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            off = 0
            while True:
                got = os.preadv(fd, [buf], off)
                if not got:
                    break
                off += got
            total += off
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def write_fsync(directory: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Seconds to write `nbytes` (random-looking, so no filesystem shortcut) to a new file and fsync it."""
    data = os.urandom(min(block, max(nbytes, 1)))
    path = Path(directory) / "floor-write.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, data[: min(left, len(data))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


# ----------------------------------------------------------------------------------------------- reporting
def machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, versions."""
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_avg": tuple(round(x, 2) for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def print_machine() -> dict:
    m = machine()
    print(
        f"# machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB RAM; load avg {m['load_avg']}; "
        f"python {m['python']}, torch {m['torch']}; {m['date']}",
        flush=True,
    )
    return m


def python() -> str:
    return sys.executable


# ----------------------------------------------------------------------------------------------- shardmerge child
def shardmerge_cmd(
    recipe: Path, out: Path, *, workers: int | None, chunk_mb: float, threads: int | None = None
) -> list[str]:
    """The command that runs one shardmerge merge in a fresh interpreter and prints its phase timings as JSON."""
    return [
        sys.executable,
        "-m",
        "shardmerge.jobs.bench_common",
        "merge-child",
        str(recipe),
        str(out),
        "none" if workers is None else str(workers),
        str(chunk_mb),
        "none" if threads is None else str(threads),
    ]


def _merge_child(argv: list[str]) -> int:
    """Child side of shardmerge_cmd: start Ray (timed), merge without re-verification (mergekit does not verify
    either; the shard hashes are still computed while writing), shut Ray down (timed)."""
    t_main = time.perf_counter()
    recipe, out, workers, chunk_mb, threads = argv
    n_workers = None if workers == "none" else int(workers)
    import ray

    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.run.ray_session import connect

    t0 = time.perf_counter()
    started = connect(None, num_cpus=max(os.cpu_count() or 1, n_workers or 1)) if n_workers != 0 else False
    ray_up = time.perf_counter() - t0
    t1 = time.perf_counter()
    faults1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    plan = build_plan(load_recipe(recipe), shard_size="5GB", source=str(recipe))
    summary = execute(
        plan,
        out,
        workers=n_workers,
        chunk_bytes=max(1, int(float(chunk_mb) * 2**20)),
        progress=False,
        threads_per_worker=None if threads == "none" else int(threads),
    )
    merge_s = time.perf_counter() - t1
    merge_minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults1
    t2 = time.perf_counter()
    if started:
        ray.shutdown()
    down = time.perf_counter() - t2
    print(
        json.dumps(
            {
                "imports_s": t0 - t_main,
                "ray_up_s": ray_up,
                "pool_start_s": summary.get("pool_start_s") or 0.0,
                "merge_s": merge_s,
                "merge_minflt": merge_minflt,
                "ray_down_s": down,
                "workers": summary.get("workers"),
                "threads_per_worker": summary.get("threads_per_worker"),
                "bytes": summary["bytes"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "merge-child":
        sys.exit(_merge_child(sys.argv[2:]))
    print(
        "usage: python -m shardmerge.jobs.bench_common merge-child RECIPE OUT WORKERS|none CHUNK_MB THREADS|none",
        file=sys.stderr,
    )
    sys.exit(2)


def floor_seconds(dirs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Read all inputs (once to warm the page cache, once timed) and write+fsync out_bytes."""
    files = [f for d in dirs for f in sorted(d.glob("*.safetensors"))]
    read_all(files)
    read_s, in_bytes = read_all(files)
    write_s = write_fsync(scratch, out_bytes)
    return {
        "read_s": read_s,
        "in_bytes": in_bytes,
        "write_fsync_s": write_s,
        "out_bytes": out_bytes,
        "floor_s": read_s + write_s,
    }
