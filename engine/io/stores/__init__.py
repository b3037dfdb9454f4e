"""Where a merge's output lives: `open_store(out)` gives the shard store of a directory or an s3:// URL."""

from __future__ import annotations

from shardmerge.engine.io.stores.base import ShardStore, ShardWriter
from shardmerge.engine.io.stores.objects import is_url


def open_store(out) -> ShardStore:
    """The store of `out`: a ShardStore as is, an object-store URL, or a directory path (resolved)."""
    if isinstance(out, ShardStore):
        return out
    if is_url(out):
        from shardmerge.engine.io.stores.object_store import ObjectStore

        return ObjectStore(str(out))
    from pathlib import Path

    from shardmerge.engine.io.stores.fs import FsStore

    return FsStore(Path(out))


__all__ = ["ShardStore", "ShardWriter", "is_url", "open_store"]
