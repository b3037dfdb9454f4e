"""Re-check a finished output (a directory or an s3:// prefix): manifest ↔ shard files (size, sha256) ↔ shard
headers ↔ index ↔ plan counts.

Returns every problem found, first one first; `shardmerge verify` exits non-zero naming the first.
"""

from __future__ import annotations

import json
from pathlib import Path

from shardmerge.engine.io.checkpoint import parse_header_from
from shardmerge.engine.io.shard_files import STATE_DIR
from shardmerge.engine.io.stores import is_url, open_store
from shardmerge.engine.io.writer import INDEX, MANIFEST


class _Shown(str):
    """A location in messages: `out / name` works for a directory and for an object-store URL alike."""

    def __truediv__(self, name: str) -> _Shown:
        return _Shown(f"{self.rstrip('/')}/{name}")


def _load_json(store, out, name: str, what: str, problems: list[str]):
    raw = store.read_bytes(name)
    if raw is None:
        problems.append(f"{out / name}: {what} is missing")
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{out / name}: {what} is not valid JSON ({exc})")
        return None


def verify_dir(out: Path | str, *, hashes: bool = True) -> list[str]:
    """Every problem of the output at `out` (a directory or an s3:// URL), first one first."""
    if is_url(out):
        store = open_store(str(out))
        try:
            store.prepare()
        except RuntimeError as exc:
            return [str(exc)]
        out = _Shown(store.url)
    else:
        out = Path(out)
        if not out.is_dir():
            return [f"{out}: not a directory"]
        store = open_store(out)
    problems: list[str] = []
    if store.state_exists():
        problems.append(f"{out / STATE_DIR}: an unfinished merge's state is present (run merge with --resume)")
    manifest = _load_json(store, out, MANIFEST, "manifest (the merge did not finish)", problems)
    index = _load_json(store, out, INDEX, "index", problems)
    if manifest is None or index is None:
        return problems
    headers: dict[str, dict] = {}
    for entry in manifest.get("shards", []):
        path = out / entry["file"]
        size = store.size(entry["file"])
        if size is None:
            problems.append(f"{path}: shard listed in the manifest is missing")
            continue
        if size != entry["size"]:
            problems.append(f"{path}: size {size} differs from the manifest's {entry['size']}")
            continue
        if hashes and store.sha256(entry["file"]) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (the file was modified or corrupted)")
            continue
        try:
            name = entry["file"]
            headers[name] = parse_header_from(str(path), size, lambda b, e, n=name: store.read_range(n, b, e))
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if len(headers[entry["file"]]) != entry.get("tensors", len(headers[entry["file"]])):
            problems.append(f"{path}: holds {len(headers[entry['file']])} tensors, manifest says {entry['tensors']}")
    problems += _check_index(out, index, manifest, headers)
    return problems


def _check_index(out: Path, index: dict, manifest: dict, headers: dict[str, dict]) -> list[str]:
    problems = []
    weight_map = index.get("weight_map") or {}
    listed = {e["file"] for e in manifest.get("shards", [])}
    for name, fname in weight_map.items():
        if fname not in listed:
            problems.append(f"{out / INDEX}: tensor {name!r} points to {fname!r}, which the manifest does not list")
        elif fname in headers and name not in headers[fname]:
            problems.append(f"{out / INDEX}: tensor {name!r} is mapped to {fname}, but that shard does not hold it")
    for fname, metas in headers.items():
        for name in metas:
            if weight_map.get(name) != fname:
                problems.append(f"{out / fname}: tensor {name!r} is not mapped to this shard in {INDEX}")
    total = sum(m.nbytes for metas in headers.values() for m in metas.values())
    declared = (index.get("metadata") or {}).get("total_size")
    if len(headers) == len(listed) and declared != total:
        problems.append(f"{out / INDEX}: metadata.total_size {declared} differs from the shards' {total} bytes")
    if manifest.get("total_size") not in (None, total) and len(headers) == len(listed):
        problems.append(f"{out / MANIFEST}: total_size {manifest.get('total_size')} differs from the shards' {total}")
    return problems
