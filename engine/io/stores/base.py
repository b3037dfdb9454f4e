"""The shard-store interface: where a merge's output lives, and the only code that writes it.

A store is addressed by names relative to the output root ("model-00001-of-00002.safetensors",
".shardmerge/journal.jsonl"). Two backends implement it: `FsStore` (a local or shared directory: temp file per
shard, pwrite of each unit's byte ranges, fsync, sha256, atomic rename) and `ObjectStore` (s3://bucket/prefix:
each unit's bytes staged on the worker's local disk and uploaded as one object; a shard assembled by one multipart
upload and visible under its final name only once complete, its sha256 known). Both keep the same protocol: shards
first, then index/config/tokenizer/card, the manifest last (it marks completion), the state dir removed at the end.
"""

from __future__ import annotations

import abc
import hashlib


class ShardWriter(abc.ABC):
    """One work unit's writes into one shard: `write` byte ranges in unit order, `commit` makes them durable."""

    path: str = ""  # what the driver removes when a write fails (disk full); "" for nothing

    @abc.abstractmethod
    def write(self, data: memoryview, offset: int, label: str) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class ShardStore(abc.ABC):
    """Output root of one merge (see the module docstring)."""

    url: str  # how the output is shown in messages and recorded
    local: bool  # a filesystem directory (driver lock, path-overlap checks with the inputs)

    # -- small files ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def read_bytes(self, name: str) -> bytes | None:
        """The whole file, or None when it does not exist."""

    @abc.abstractmethod
    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace `name` with `data`; readers see the old or the new content, never a torn file."""

    @abc.abstractmethod
    def size(self, name: str) -> int | None:
        """Size of a file, None when it does not exist."""

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    @abc.abstractmethod
    def listdir(self) -> list[str]:
        """Top-level names in the output root (files and, for the state dir, directories)."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Remove a file or a whole directory (everything under `name/`); nothing if absent."""

    @abc.abstractmethod
    def read_range(self, name: str, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of a file."""

    @abc.abstractmethod
    def sha256(self, name: str) -> str:
        """sha256 of a whole file, read in blocks."""

    # -- shards -----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_shard(self, shard) -> None:
        """Prepare a shard's temp state (its header and size known from the plan)."""

    @abc.abstractmethod
    def shard_writer(self, shard, unit_id: int) -> ShardWriter:
        """Where unit `unit_id` writes its byte ranges of `shard`."""

    @abc.abstractmethod
    def unit_digest(self, unit, shard) -> str | None:
        """sha256 of `unit`'s bytes in `shard`'s temp state, tensor by tensor; None if missing or short."""

    @abc.abstractmethod
    def check_partial(self, shard) -> None:
        """Drop a shard's temp state when it does not match the plan (size/header); its units re-run."""

    @abc.abstractmethod
    def has_partial(self, shard) -> bool: ...

    @abc.abstractmethod
    def publish(self, shard) -> tuple[str, int]:
        """Make a complete shard visible under its final name; returns (sha256, size). Idempotent: a shard that
        an earlier attempt already published is recognised."""

    @abc.abstractmethod
    def unpublish(self, shard) -> None:
        """Move a published but unjournaled shard back to temp state (resume re-checks its units)."""

    def is_published(self, name: str, sha: str, size: int) -> bool:
        """Whether `name` is published with exactly this size and sha256 (re-hashed, never trusted)."""
        return self.size(name) == size and self.sha256(name) == sha

    def recover(self) -> None:
        """On resume: drop what a killed writer left half-done and invisible (unfinished uploads)."""
        return None

    @abc.abstractmethod
    def clear_temp(self) -> None:
        """Forget every shard's temp state (a fresh run: no journal vouches for it)."""

    # -- driver state -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def journal_records(self) -> list[dict]: ...

    @abc.abstractmethod
    def journal_start(self, first: dict) -> None: ...

    @abc.abstractmethod
    def journal_append(self, record: dict) -> None: ...

    @abc.abstractmethod
    def journal_exists(self) -> bool: ...

    @abc.abstractmethod
    def state_exists(self) -> bool:
        """Whether the state dir (an unfinished run's) is present."""

    @abc.abstractmethod
    def lock(self) -> object:
        """Take the output's driver lock (one driver at a time); returns what `unlock` takes."""

    @abc.abstractmethod
    def unlock(self, handle) -> None: ...

    @abc.abstractmethod
    def prepare(self) -> None:
        """Create the output root if needed and refuse one that cannot be written (one clear error)."""

    @abc.abstractmethod
    def reachable_problem(self) -> str | None:
        """None when this process can reach the output; else what it cannot reach (worker start-up check)."""


def sha256_blocks(read, size: int, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    for off in range(0, size, block):
        h.update(read(off, min(size, off + block)))
    return h.hexdigest()
