"""A model checkpoint on disk: its files, per-tensor metadata from safetensors headers, and row-chunked reads.

Nothing here reads tensor data except `read_rows`, which reads exactly the bytes of the requested rows, so no read
ever needs a whole tensor in memory. Headers are validated strictly (length, JSON, dtypes, offsets inside the file,
no overlaps) because a corrupt header would otherwise surface as garbage weights far downstream.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from shardmerge.engine.io.dtypes import DTYPES as DTYPES
from shardmerge.engine.io.dtypes import FLOAT_CODES as FLOAT_CODES
from shardmerge.engine.io.dtypes import NAME_TO_CODE as NAME_TO_CODE
from shardmerge.engine.io.dtypes import TORCH_TO_CODE as TORCH_TO_CODE
from shardmerge.engine.io.dtypes import TensorMeta as TensorMeta
from shardmerge.engine.io.paths import check_confined as check_confined
from shardmerge.engine.io.paths import confine

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIM = 2**63 - 1  # torch sizes are int64: a larger dimension (possible when another one is 0) cannot be read
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def parse_safetensors_header(path: Path | str) -> dict[str, TensorMeta]:
    """Validated per-tensor metadata of one safetensors file, read from its header only; `path` a local file or
    an object-store/hub URL (read with ranged GETs, shardmerge.engine.io.remote)."""
    if "://" in str(path):
        from shardmerge.engine.io.remote import remote_file

        f = remote_file(str(path))
        return parse_header_from(str(path), f.size, f.read)
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:

        def read(begin: int, end: int) -> bytes:
            fh.seek(begin)
            return fh.read(end - begin)

        return parse_header_from(path, size, read)


def parse_header_from(path, size: int, read) -> dict[str, TensorMeta]:
    """parse_safetensors_header for a file of `size` bytes whose bytes [begin, end) `read(begin, end)` returns
    (a local file, a ranged GET); `path` names it in messages and in the metadata."""
    raw = read(0, min(8, size))
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {size} bytes; the 8-byte header length is missing)")
    (hlen,) = struct.unpack("<Q", raw)
    if hlen > MAX_HEADER_BYTES or hlen + 8 > size:
        raise ValueError(
            f"{path}: safetensors header length {hlen} is impossible for a file of {size} bytes "
            f"(limit {MAX_HEADER_BYTES}); the file is truncated or not safetensors"
        )
    header_bytes = read(8, 8 + hlen)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    except RecursionError:  # e.g. `[[[[...]]]]` nested deeper than the JSON decoder's recursion limit
        raise ValueError(f"{path}: safetensors header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    data_start, data_size = 8 + hlen, size - 8 - hlen
    metas = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        metas[name] = _tensor_meta(path, name, entry, data_start, data_size)
    _check_overlaps(path, metas.values(), data_start, size)
    return metas


def _tensor_meta(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorMeta:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{path}: tensor {name!r}: header entry {entry!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r}: dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):  # not `true`
        raise ValueError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of integers in [0, {MAX_DIM}]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ValueError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
    b, e = offsets
    expected = math.prod(shape) * DTYPES[dtype][1]
    if not 0 <= b <= e or e - b != expected:
        raise ValueError(
            f"{path}: tensor {name!r}: data_offsets {offsets} span {e - b} bytes, expected {expected} "
            f"for shape {shape} {dtype}"
        )
    if e > data_size:
        raise ValueError(
            f"{path}: tensor {name!r}: data_offsets end {e} is past the end of the data ({data_size} bytes); "
            "the file is truncated"
        )
    return TensorMeta(name, str(path), dtype, tuple(shape), data_start + b, data_start + e)


def _check_overlaps(path: Path, metas: Iterable[TensorMeta], data_start: int, size: int) -> None:
    """No two non-empty tensors share bytes, and together they cover the data exactly: a hole between tensors or
    bytes after the last one hold data no tensor names (the safetensors library refuses both, as does
    transformers), so the file is damaged or not what its header says."""
    prev: TensorMeta | None = None
    covered, last = data_start, None
    for m in sorted(metas, key=lambda m: (m.begin, m.end)):
        if prev is not None and m.begin < prev.end and m.nbytes and prev.nbytes:
            raise ValueError(f"{path}: tensors {prev.name!r} and {m.name!r} overlap in the file")
        if m.begin > covered:
            after = f"after tensor {last.name!r}" if last is not None else "before the first tensor"
            raise ValueError(
                f"{path}: tensor {m.name!r}: {m.begin - covered} byte(s) {after} belong to no tensor "
                "(a hole in the data); the file is damaged or its header is wrong"
            )
        if m.end > covered:
            covered, last = m.end, m
        prev = m
    if covered < size:
        after = f"after the last tensor {last.name!r}" if last is not None else "and the header names no tensor"
        raise ValueError(
            f"{path}: {size - covered} trailing byte(s) {after}; the file is damaged or its header is wrong"
        )


class Checkpoint:
    """An opened model: its directory, config and every tensor's metadata (no tensor data is read)."""

    def __init__(self, ref: str, root: Path, tensors: dict[str, TensorMeta], notes: tuple[str, ...] = ()):
        self.ref = ref
        self.root = root
        self.tensors = tensors
        self.notes = notes  # accepted oddities worth a warning (e.g. a shard the index does not list)

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self.tensors)} tensors)"

    @functools.cached_property
    def config(self) -> dict:
        from shardmerge.engine.io.loaders import load_config, load_json_file

        link = self.root / "config.json"
        if not os.path.lexists(link):
            return {}
        if not link.exists():
            load_json_file(link, "config.json")  # raises: a broken symlink or a symlink loop
        path = confine(self.root, "config.json", str(self.root))  # a symlink may not pull in files from elsewhere
        return load_config(path)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"model {self.ref}: tensor {name!r} does not exist") from None

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.tensors.values())


def resolve_model_dir(ref: str) -> Path:
    """A local directory, or a hub id resolved through the local Hugging Face cache (HF_HUB_OFFLINE honoured); for
    an object-store or hub URL, the local cache dir of its small files (shardmerge.engine.io.remote)."""
    from shardmerge.engine.io.stores.objects import is_url

    if is_url(ref):
        from shardmerge.engine.io.remote import mirror_small_files

        return mirror_small_files(str(ref))[0]
    path = Path(ref).expanduser()
    if os.path.isdir(path):  # os.path: False for a name too long or unreadable, where Path raises OSError
        return path.resolve()
    if os.path.exists(path):
        raise ValueError(f"model {ref!r}: {path} is a file; expected a model directory or a hub id")
    if "+" in ref:
        raise ValueError(
            f"model {ref!r}: a base+adapter (LoRA) reference is read as a merge input of models: / "
            "base_model; here a model directory or hub id is needed"
        )
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ValueError(f"model {ref!r}: directory {path} does not exist")
    repo, _, revision = ref.partition("@")  # mergekit's org/model@revision (a branch, tag or commit)
    if "@" in revision or (_ and not (repo and revision)):
        raise ValueError(f"model {ref!r}: expected org/model or org/model@revision")
    return _from_hub_cache(ref, repo, revision or None)


def _from_hub_cache(ref: str, repo: str, revision: str | None) -> Path:
    """A hub model's snapshot from the local cache; a pinned revision is only ever looked up locally."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = revision is not None or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    cache = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )  # read at call time: huggingface_hub only reads these at import
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"],
            )
        )
    except LocalEntryNotFoundError:
        raise ValueError(
            f"model {ref!r}: not a local directory and not in the local Hugging Face cache"
            + (
                f" at revision {revision!r} (a pinned revision is resolved from the cache only; fetch it with "
                f"`huggingface-cli download {repo} --revision {revision}`)"
                if revision
                else " (HF_HUB_OFFLINE is set, so nothing is downloaded)"
                if offline
                else ""
            )
        ) from None
    except Exception as exc:  # network errors, unknown repo, gated repo
        raise ValueError(f"model {ref!r}: could not resolve hub id ({type(exc).__name__}: {exc})") from None


def open_remote_checkpoint(ref: str) -> Checkpoint:
    """A Checkpoint whose tensors live at `ref` (an object-store or hub URL) and whose root is the local cache
    dir of its small files; `location` is the URL (what workers check they can reach)."""
    from shardmerge.engine.io.loaders import load_index
    from shardmerge.engine.io.remote import confine_key, mirror_small_files

    url = str(ref).rstrip("/")
    root, names, client, prefix = mirror_small_files(url)
    index_url = f"{url}/{INDEX_NAME}"
    if INDEX_NAME in names:
        weight_map = load_index(root / INDEX_NAME)
        headers = {}
        for fname in sorted(set(weight_map.values()), key=str):
            key = confine_key(url, prefix, fname, index_url)
            rel = key[len(prefix) + 1 :] if prefix else key
            if rel not in names:
                first = next(n for n, f in weight_map.items() if f == fname)
                raise ValueError(
                    f"{index_url}: names shard {fname!r} (for tensor {first!r}), which does not exist in {url}"
                )
            headers[fname] = parse_safetensors_header(f"{url}/{rel}")
        _check_duplicates(Path(index_url), headers)
        tensors = {}
        for name, fname in weight_map.items():
            if name not in headers[fname]:
                raise ValueError(
                    f"{index_url}: tensor {name!r} is mapped to {fname}, but that shard does not contain it"
                )
            tensors[name] = headers[fname][name]
        for fname, metas in headers.items():
            extra = sorted(set(metas) - set(weight_map))
            if extra:
                raise ValueError(
                    f"{url}/{fname}: holds tensor(s) {extra[:5]} that {INDEX_NAME} does not list; the index and "
                    "the shards disagree"
                )
    else:
        singles = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
        pick = SINGLE_NAME if SINGLE_NAME in names else (singles[0] if len(singles) == 1 else None)
        if pick is None:
            raise ValueError(
                f"model {url!r}: has no {INDEX_NAME} or {SINGLE_NAME}"
                + (f" and {len(singles)} safetensors files" if singles else "")
                + "; is this a Hugging Face model prefix?"
            )
        tensors = parse_safetensors_header(f"{url}/{pick}")
    ckpt = Checkpoint(str(ref), root, tensors)
    ckpt.location = url
    return ckpt


def open_checkpoint(ref: str) -> Checkpoint:
    """Open a model dir, hub id or object-store/hub URL: sharded or single-file safetensors, or (legacy)
    pytorch_model*.bin (local only)."""
    from shardmerge.engine.io.stores.objects import is_url

    if is_url(ref):
        return open_remote_checkpoint(str(ref))
    root = resolve_model_dir(str(ref))
    index = root / INDEX_NAME
    if os.path.lexists(index):
        tensors = _from_index(root, index)
        return Checkpoint(str(ref), root, tensors, _unlisted_shards(root, index, tensors))
    if (root / SINGLE_NAME).exists():
        return Checkpoint(str(ref), root, parse_safetensors_header(confine(root, SINGLE_NAME, str(root))))
    singles = sorted(root.glob("*.safetensors"))
    if len(singles) == 1:
        return Checkpoint(str(ref), root, parse_safetensors_header(confine(root, singles[0].name, str(root))))
    from shardmerge.engine.io.legacy_bin import open_bin_tensors

    bins = open_bin_tensors(root)
    if bins:
        return Checkpoint(str(ref), root, bins)
    raise ValueError(
        f"model {ref!r}: {root} has no {INDEX_NAME}, {SINGLE_NAME} or pytorch_model*.bin; "
        "is this a Hugging Face model directory?"
    )


def _from_index(root: Path, index: Path) -> dict[str, TensorMeta]:
    from shardmerge.engine.io.loaders import load_index

    weight_map = load_index(index)
    headers: dict[str, dict[str, TensorMeta]] = {}
    for fname in sorted(set(weight_map.values())):
        if not isinstance(fname, str):
            raise ValueError(f"{index}: weight_map value {fname!r} is not a file name")
        path = confine(root, fname, str(index))
        if not path.exists():
            first = next(n for n, f in weight_map.items() if f == fname)
            raise ValueError(f"{index}: names shard {fname!r} (for tensor {first!r}), which does not exist in {root}")
        headers[fname] = parse_safetensors_header(path)
    _check_duplicates(index, headers)
    tensors = {}
    for name, fname in weight_map.items():
        if name not in headers[fname]:
            raise ValueError(f"{index}: tensor {name!r} is mapped to {fname}, but that shard does not contain it")
        tensors[name] = headers[fname][name]
    for fname, metas in headers.items():
        extra = sorted(set(metas) - set(weight_map))
        if extra:
            raise ValueError(
                f"{root / fname}: holds tensor(s) {extra[:5]} that {index.name} does not list; "
                "the index and the shards disagree"
            )
    return tensors


def _check_duplicates(index: Path, headers: dict[str, dict[str, TensorMeta]]) -> None:
    """A tensor held by two shards is ambiguous (which copy is the model?) even if the index picks one."""
    seen: dict[str, str] = {}
    for fname, metas in headers.items():
        for name in metas:
            if name in seen:
                raise ValueError(
                    f"{index.parent / fname}: tensor {name!r} is also in {index.parent / seen[name]}; "
                    "a tensor may live in one shard only (which copy is the model?)"
                )
            seen[name] = fname


def _unlisted_shards(root: Path, index: Path, tensors: dict[str, TensorMeta]) -> tuple[str, ...]:
    """Safetensors files in the model dir that the index does not name: ignored, as transformers ignores them
    (a leftover of an earlier save), but reported."""
    used = {Path(m.file).name for m in tensors.values()} | {Path(f).name for f in _index_files(index)}
    extra = sorted(p.name for p in root.glob("*.safetensors") if p.name not in used)
    if not extra:
        return ()
    return (
        f"{root}: {', '.join(extra[:5])} not listed in {index.name}; ignored (the index decides which shards "
        "form the model)",
    )


def _index_files(index: Path) -> set[str]:
    from shardmerge.engine.io.loaders import load_index

    return set(load_index(index).values())


def read_rows(meta: TensorMeta, row_start: int, row_stop: int) -> torch.Tensor:
    """Rows [row_start, row_stop) of a tensor, read from disk with one positioned read (no mmap, no whole tensor)."""
    if not 0 <= row_start <= row_stop <= meta.rows:
        raise ValueError(f"{meta.file}: tensor {meta.name!r}: rows [{row_start}, {row_stop}) out of 0..{meta.rows}")
    computed = getattr(meta, "read_rows", None)  # rows formed in the read path (shardmerge.engine.io.gather)
    if computed is not None:
        return computed(row_start, row_stop)
    if meta.file.endswith(".bin"):
        from shardmerge.engine.io.legacy_bin import read_bin_rows

        return read_bin_rows(meta, row_start, row_stop)
    torch_dtype, itemsize = DTYPES[meta.dtype]
    row_bytes = meta.row_numel * itemsize
    nbytes = (row_stop - row_start) * row_bytes
    if nbytes and "://" in meta.file:  # an object-store or hub file: one ranged GET
        from shardmerge.engine.io.remote import remote_file

        begin = meta.begin + row_start * row_bytes
        buf = bytearray(remote_file(meta.file).read(begin, begin + nbytes))
    else:
        buf = bytearray(nbytes)
    if nbytes and "://" not in meta.file:
        fd = _open_fd(meta.file)
        got = os.preadv(fd, [buf], meta.begin + row_start * row_bytes)
        if got != nbytes:
            raise RuntimeError(
                f"{meta.file}: tensor {meta.name!r}: short read ({got} of {nbytes} bytes); the file changed or is "
                "truncated"
            )
    shape = ((row_stop - row_start),) + meta.shape[1:] if meta.shape else ()
    if not nbytes:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)


_FDS: dict[tuple, int] = {}


def _open_fd(path: str) -> int:
    """Descriptors are cached per process (a merge reads the same shards thousands of times), keyed by the file's
    identity so a file replaced on disk is reopened rather than read stale."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
    fd = _FDS.get(key)
    if fd is None:
        fd = _FDS[key] = os.open(path, os.O_RDONLY)
    return fd


def close_cached_files() -> None:
    """Close every cached input descriptor (workers call this on shutdown)."""
    for fd in _FDS.values():
        os.close(fd)
    _FDS.clear()


def files_identity(ckpts) -> bytes:
    """`path:size:mtime_ns` of every file the checkpoints' tensors live in, sorted: what a plan hash (and a cached
    calibration's fingerprint) takes as the inputs' identity without reading their data."""
    files = {m.file for c in ckpts for m in c.tensors.values()}
    files |= {f for c in ckpts for f in getattr(c, "extra_files", ())}  # e.g. a LoRA adapter's config
    lines = []
    for f in sorted(files):
        if "://" in f:  # an object's size and ETag (its content's identity; no mtime to trust)
            from shardmerge.engine.io.remote import remote_file

            r = remote_file(f)
            lines.append(f"{f}:{r.size}:{r.etag}\n")
        else:
            st = os.stat(f)
            lines.append(f"{f}:{st.st_size}:{st.st_mtime_ns}\n")
    return "".join(lines).encode()
