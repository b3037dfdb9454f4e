"""Filesystem backend of the shard store: a local or shared directory (the behaviour and bytes of every earlier
release: temp file per shard under `.shardmerge/tmp`, pwrite, fsync, sha256, atomic rename; journal fsync'ed per
line; an flock as the driver lock)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from shardmerge.engine.io import shard_files as w
from shardmerge.engine.io.stores.base import ShardStore, ShardWriter

LOCK_FILE = "driver.lock"


class _FileWriter(ShardWriter):
    def __init__(self, path: Path):
        self.path = str(path)
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, data: memoryview, offset: int, label: str) -> None:
        w.pwrite_all(self.fd, data, offset, label, self.path)

    def commit(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class FsStore(ShardStore):
    local = True

    def __init__(self, root):
        self.root = Path(root)
        self.url = str(self.root)

    def __reduce__(self):
        return (FsStore, (str(self.root),))

    def _p(self, name: str) -> Path:
        return self.root / name

    def read_bytes(self, name: str) -> bytes | None:
        p = self._p(name)
        return p.read_bytes() if p.is_file() else None

    def write_atomic(self, name: str, data: bytes) -> None:
        p = self._p(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        w.atomic_write(p, data)  # looked up at call time (tests replace it to simulate a full disk)

    def size(self, name: str) -> int | None:
        p = self._p(name)
        return p.stat().st_size if p.is_file() else None

    def listdir(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def remove(self, name: str) -> None:
        p = self._p(name)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            p.unlink()

    def read_range(self, name: str, begin: int, end: int) -> bytes:
        with open(self._p(name), "rb") as f:
            f.seek(begin)
            return f.read(end - begin)

    def sha256(self, name: str) -> str:
        return w.sha256_file(self._p(name))

    # -- shards
    def create_shard(self, shard) -> None:
        if not w.partial_path(self.root, shard.filename).exists():
            w.create_partial(self.root, shard)

    def shard_writer(self, shard, unit_id: int) -> ShardWriter:
        return _FileWriter(w.partial_path(self.root, shard.filename))

    def has_partial(self, shard) -> bool:
        return w.partial_path(self.root, shard.filename).exists()

    def unit_digest(self, unit, shard) -> str | None:
        h = hashlib.sha256()
        path = w.partial_path(self.root, shard.filename)
        if not path.exists():
            return None
        for t in unit.tensors:
            if t.shard != shard.index:
                continue
            with open(path, "rb") as f:
                f.seek(t.offset)
                left = t.nbytes
                while left:
                    block = f.read(min(left, 8 << 20))
                    if not block:
                        return None
                    h.update(block)
                    left -= len(block)
        return h.hexdigest()

    def check_partial(self, shard) -> None:
        p = w.partial_path(self.root, shard.filename)
        if not p.exists():
            return
        with open(p, "rb") as f:
            head = f.read(len(shard.header))
        if p.stat().st_size != shard.size or head != shard.header:
            p.unlink()

    def publish(self, shard) -> tuple[str, int]:
        if not w.partial_path(self.root, shard.filename).exists():
            final = self.root / shard.filename
            if final.exists() and final.stat().st_size == shard.size:
                return w.sha256_file(final), shard.size
            raise RuntimeError(
                f"{w.partial_path(self.root, shard.filename)}: temp file of shard {shard.filename} is missing "
                f"and {final} is not complete; the output directory was modified during the merge"
            )
        return w.finalize_shard(self.root, shard)

    def unpublish(self, shard) -> None:
        final = self.root / shard.filename
        if final.exists():
            w.partial_path(self.root, shard.filename).parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, w.partial_path(self.root, shard.filename))

    def clear_temp(self) -> None:
        shutil.rmtree(w.state_dir(self.root) / "tmp", ignore_errors=True)

    # -- driver state
    def journal_records(self) -> list[dict]:
        return w.Journal(self.root).records()

    def journal_start(self, first: dict) -> None:
        w.Journal(self.root).start(first["plan_hash"])

    def journal_append(self, record: dict) -> None:
        w.Journal(self.root).append(record)

    def journal_exists(self) -> bool:
        return w.Journal(self.root).path.exists()

    def state_exists(self) -> bool:
        d = w.state_dir(self.root)
        return d.is_dir() and not d.is_symlink()

    def lock(self) -> int:
        """The driver lock (flock: released by the kernel if this process dies)."""
        d = w.state_dir(self.root)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"another shardmerge driver is writing into {self.root} ({d / LOCK_FILE} is "
                "locked); wait for it to finish or stop it, then run again with --resume"
            ) from None
        return fd

    def unlock(self, handle) -> None:
        if handle is not None:
            os.close(handle)

    def prepare(self) -> None:
        out = self.root
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"output directory {out} cannot be created ({exc.strerror or exc}); choose a writable --out"
            ) from None
        if not os.access(out, os.W_OK):
            raise ValueError(
                f"output directory {out} is not writable (read-only filesystem or permissions); choose a writable --out"
            )

    def reachable_problem(self) -> str | None:
        d = w.state_dir(self.root)
        if not os.path.isdir(d):
            return f"cannot see {d}"
        return None
