"""Shard files on a filesystem, in safetensors' exact format, written in place and published atomically.

The safetensors library cannot write incrementally (it serialises a whole dict of in-memory tensors), so shards are
written here by hand in its exact format: 8-byte little-endian header length, JSON header padded with spaces to a
multiple of 8, then the raw tensor bytes at the offsets the header names. The plan fixes every offset, so each work
unit `pwrite`s its tensors into `<out>/.shardmerge/tmp/<shard>.partial` independently, chunk by chunk. A shard
becomes visible under its final name only after every unit that writes into it has fsync'ed and the shard's sha256
is taken (temp file + fsync + atomic rename). The journal of finished units lives beside them in the state dir.
These are the filesystem store's primitives (engine/io/stores/fs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import shardmerge

STATE_DIR = ".shardmerge"
JOURNAL = "journal.jsonl"
_HASH_BLOCK = 8 << 20  # 8 MiB reads: hashing throughput is flat above ~1 MiB blocks


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def partial_path(out: Path, filename: str) -> Path:
    return state_dir(out) / "tmp" / (filename + ".partial")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteFailed(RuntimeError):
    """A write into the output failed (disk full, I/O error). `path` is the temp file that can no longer be
    trusted; the driver removes it, so a full disk gets its space back and `--resume` redoes that shard's units."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def atomic_write(path: Path, data: bytes) -> None:
    """Write a small file via temp + fsync + rename so readers never see a torn file; on failure (disk full) the
    temp file is removed and the error names the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"{path}: write failed ({exc.strerror or exc}); is the disk full?") from exc
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def create_partial(out: Path, shard) -> None:
    """Create a shard's temp file with its header, sized to its final length (data filled in by the units)."""
    path = partial_path(out, shard.filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise WriteFailed(
            f"{path}: creating the temp file of shard {shard.filename} failed "
            f"({exc.strerror or exc}); is the disk full?"
        ) from exc


def pwrite_all(fd: int, data: memoryview, offset: int, where: str, path: str = "") -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked); `path` names the temp file for cleanup."""
    while len(data):
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise WriteFailed(
                f"{where}: write failed at offset {offset} ({exc.strerror}); is the disk full?", path
            ) from exc
        data = data[n:]
        offset += n


def sha256_file(path: Path, begin: int = 0, end: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(begin)
        left = (end if end is not None else os.fstat(f.fileno()).st_size) - begin
        while left > 0:
            block = f.read(min(_HASH_BLOCK, left))
            if not block:
                raise RuntimeError(f"{path}: file ended {left} bytes early while hashing")
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def finalize_shard(out: Path, shard) -> tuple[str, int]:
    """fsync, hash and atomically publish one completed shard; returns (sha256, size)."""
    src = partial_path(out, shard.filename)
    size = src.stat().st_size
    if size != shard.size:
        raise RuntimeError(f"{src}: size {size} differs from the planned {shard.size} bytes")
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = sha256_file(src)
    dst = Path(out) / shard.filename
    os.replace(src, dst)
    _fsync_dir(Path(out))
    return digest, size


class Journal:
    """Append-only record of finished units and shards, the driver's only state; fsync'ed per line."""

    def __init__(self, out: Path):
        self.path = state_dir(out) / JOURNAL

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything before it is valid
        return out

    def start(self, plan_hash: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(json.dumps({"plan_hash": plan_hash, "engine": shardmerge.__version__}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
