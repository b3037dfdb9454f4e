"""Model inputs on object storage or the hub (s3://, gs://, az://, abfs://, hf://org/name[@revision]), read by range.

Only the small files (config.json, the index, tokenizer/processor files) are fetched whole, into a local cache
directory that serves as the checkpoint's root, so everything that reads a model's config or copies its tokenizer
works unchanged. Safetensors files are never downloaded: their headers are read with two ranged GETs and parsed by
the same strict parser as local files, and each row chunk is one ranged GET (retried with backoff on throttling,
shardmerge.engine.io.stores.objects). An index entry naming a file outside the model's prefix (an absolute key,
`..`) is refused, as a local index entry escaping its directory is.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
from dataclasses import dataclass
from pathlib import Path

from shardmerge.engine.io.stores.objects import StoreError, client_for, is_url, join_key

SMALL_FILE_LIMIT = 64 << 20  # a config/tokenizer file above this is not a config file


@dataclass
class RemoteFile:
    url: str
    client: object
    key: str
    size: int
    etag: str

    def read(self, begin: int, end: int) -> bytes:
        return self.client.get_range(self.key, begin, end)


_FILES: dict[str, RemoteFile] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the cached object sizes/ETags and clients (new credentials or endpoint in this process)."""
    with _LOCK:
        _FILES.clear()


def _split_file(url: str):
    """(client, key) of a file URL: the last path component is the file, the rest its model prefix."""
    client, prefix = client_for(url)
    return client, prefix


def remote_file(url: str) -> RemoteFile:
    """The object at `url` (size and ETag from one HEAD, cached per process)."""
    with _LOCK:
        f = _FILES.get(url)
    if f is not None:
        return f
    client, key = _split_file(url)
    info = client.head(key)
    if info is None:
        raise ValueError(f"{url}: does not exist")
    f = RemoteFile(url, client, key, info.size, info.etag)
    with _LOCK:
        _FILES[url] = f
    return f


def cache_dir(url: str) -> Path:
    """Local directory holding the small files of the model at `url` (SHARDMERGE_CACHE, else ~/.cache)."""
    base = os.environ.get("SHARDMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "shardmerge")
    return Path(base) / "remote" / hashlib.sha256(url.encode()).hexdigest()[:24]


def confine_key(url: str, prefix: str, rel, index_url: str) -> str:
    """The key of index entry `rel` inside the model prefix; anything escaping it is refused."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{index_url}: weight_map value {rel!r} is not a file name")
    if rel.startswith("/") or "\\" in rel or "://" in rel:
        raise ValueError(f"{index_url}: file name {rel!r} is an absolute path; only files inside {url} are allowed")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"{index_url}: file {rel!r} resolves outside the model location {url}")
    return join_key(prefix, norm)


def _listing(client, prefix: str) -> dict[str, int]:
    base = prefix + "/" if prefix else ""
    return {k[len(base) :]: s for k, s in client.list(base)}


def mirror_small_files(url: str) -> tuple[Path, dict[str, int], object, str]:
    """Fetch the model's small files into its cache dir; returns (dir, {name: size} of the prefix, client, prefix)."""
    from shardmerge.engine.io.writer import COPIED_FILES

    url = url.rstrip("/")
    client, prefix = client_for(url)
    try:
        names = _listing(client, prefix)
    except StoreError as exc:
        raise ValueError(f"model {url!r}: {exc}") from None
    if not names:
        raise ValueError(f"model {url!r}: no files under this prefix (wrong bucket or path?)")
    root = cache_dir(url)
    root.mkdir(parents=True, exist_ok=True)
    small = {"config.json", "model.safetensors.index.json", "adapter_config.json", *COPIED_FILES}
    for name in sorted(small & set(names)):
        if names[name] > SMALL_FILE_LIMIT:
            raise ValueError(f"{url}/{name}: {names[name]} bytes, too large for a config or tokenizer file")
        data = client.get(join_key(prefix, name))
        if data is None:
            continue
        tmp = root / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, root / name)
    for stale in root.iterdir():  # a file removed from the prefix since the last open is not served from cache
        if stale.name not in names:
            stale.unlink()
    return root, names, client, prefix


def reachable_problem(url: str) -> str | None:
    """None when this process can list the model at `url`; else what went wrong (worker start-up check)."""
    if not is_url(url):
        return None
    try:
        client, prefix = client_for(url)
        if not _listing(client, prefix):
            return "no files under this prefix"
    except (StoreError, ValueError) as exc:
        return str(exc)
    return None
