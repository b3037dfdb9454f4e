"""Object-store backend of the shard store (s3://bucket/prefix; S3-compatible stores through AWS_ENDPOINT_URL).

Why units stage on local disk and shards are assembled by the publisher: S3 multipart parts must be at least
5 MiB (all but the last), while a work unit's byte range in a shard can be any size (a norm vector is a few KiB),
and the shard's sha256 needs one sequential pass over its bytes anyway. So each unit writes its bytes of a shard,
in unit order, to a local temp file (bounded by the unit's bytes in that shard, freed after upload) and uploads it
as one object `.shardmerge/parts/<shard>/unit-<id>.bin` (a multipart upload itself when large), then a small JSON
beside it naming the shard byte ranges it holds — its presence is the unit's commit. Publishing a shard streams
header + ranges in offset order through sha256 into one multipart upload of the final key (parts of
`PART_BYTES`), completes it only after every byte was hashed, and then drops the unit objects: the shard is
invisible under its final name until complete, and its sha256 is known when it appears. Memory of the publisher
is one part buffer plus one read block.

The journal is one object per record under `.shardmerge/journal/` (S3 has no append); only the driver writes it.
Object stores give no lock released on the holder's death, so one driver per output prefix is the user's to
ensure (a second driver would write the same bytes, but the journals would interleave).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid

import shardmerge
from shardmerge.engine.io.stores.base import ShardStore, ShardWriter
from shardmerge.engine.io.stores.objects import PART_BYTES, S3Client, StoreError, join_key, split_url

STATE = ".shardmerge"
_BLOCK = 8 << 20  # ranged-read block while publishing and re-hashing


def stage_dir() -> str:
    """Local directory where units stage their bytes before upload (SHARDMERGE_STAGE_DIR, else the temp dir)."""
    d = os.environ.get("SHARDMERGE_STAGE_DIR") or os.path.join(tempfile.gettempdir(), "shardmerge-stage")
    os.makedirs(d, exist_ok=True)
    return d


class _StagedWriter(ShardWriter):
    """A unit's bytes of one shard, appended in unit order to a local temp file; `commit` uploads it."""

    def __init__(self, store: ObjectStore, shard, unit_id: int):
        self.store, self.shard, self.unit_id = store, shard, unit_id
        self.path = ""  # nothing of the output's own to remove on failure (the temp file is ours)
        self._tmp = os.path.join(stage_dir(), f"{shard.filename}.unit-{unit_id}.{uuid.uuid4().hex}")
        self._f = open(self._tmp, "wb")
        self.pieces: list[list[int]] = []  # [shard offset, length], contiguous writes joined

    def write(self, data: memoryview, offset: int, label: str) -> None:
        from shardmerge.engine.io.shard_files import WriteFailed

        try:
            self._f.write(data)
        except OSError as exc:
            raise WriteFailed(
                f"{label}: staging on local disk failed ({exc.strerror}); is {stage_dir()} full?"
            ) from exc
        if self.pieces and self.pieces[-1][0] + self.pieces[-1][1] == offset:
            self.pieces[-1][1] += len(data)
        else:
            self.pieces.append([offset, len(data)])

    def commit(self) -> None:
        self._f.close()
        base = self.store._part_base(self.shard.filename, self.unit_id)
        self.store.client.upload_file(self.store.key(base + ".bin"), self._tmp)
        size = sum(n for _, n in self.pieces)
        meta = {"unit": self.unit_id, "pieces": self.pieces, "size": size}
        self.store.client.put(self.store.key(base + ".json"), json.dumps(meta).encode())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class ObjectStore(ShardStore):
    local = False

    def __init__(self, url: str):
        scheme, bucket, prefix = split_url(url)
        if scheme != "s3":
            raise ValueError(
                f"--out {url}: writing to {scheme}:// is not supported yet; use s3:// (any S3-compatible store, "
                "via AWS_ENDPOINT_URL) or a directory"
            )
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self.prefix = prefix
        self.client = S3Client(bucket)
        self._seq: int | None = None

    def __reduce__(self):
        return (ObjectStore, (self.url,))

    def key(self, name: str) -> str:
        return join_key(self.prefix, name)

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _part_base(self, shard_name: str, unit_id: int) -> str:
        return f"{STATE}/parts/{shard_name}/unit-{unit_id:06d}"

    # -- small files
    def read_bytes(self, name: str) -> bytes | None:
        return self.client.get(self.key(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        self.client.put(self.key(name), data)  # a PUT is atomic: readers see the old or the new object

    def size(self, name: str) -> int | None:
        info = self.client.head(self.key(name))
        return None if info is None else info.size

    def _keys(self, name: str = "") -> list[tuple[str, int]]:
        """(name relative to the root, size) of every object under `name/` (everything when name is '')."""
        base = self.key(name).rstrip("/") + "/" if (name or self.prefix) else ""
        cut = len(self.key("")) if self.prefix else 0
        return [(k[cut:], s) for k, s in self.client.list(base)]

    def listdir(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k, _ in self._keys()})

    def remove(self, name: str) -> None:
        keys = [self.key(k) for k, _ in self._keys(name)]
        if self.client.head(self.key(name)) is not None:
            keys.append(self.key(name))
        self.client.delete(keys)

    def read_range(self, name: str, begin: int, end: int) -> bytes:
        return self.client.get_range(self.key(name), begin, end)

    def sha256(self, name: str) -> str:
        size = self.size(name)
        if size is None:
            raise StoreError(f"{self.where(name)}: does not exist")
        h = hashlib.sha256()
        for off in range(0, size, _BLOCK):
            h.update(self.read_range(name, off, min(size, off + _BLOCK)))
        return h.hexdigest()

    # -- shards
    def create_shard(self, shard) -> None:
        pass  # the header is written when the shard is assembled; nothing to prepare

    def shard_writer(self, shard, unit_id: int) -> ShardWriter:
        return _StagedWriter(self, shard, unit_id)

    def _parts(self, shard) -> dict[int, dict]:
        """unit id -> its committed part record (pieces, size) for `shard`."""
        found = {}
        for name, _ in self._keys(f"{STATE}/parts/{shard.filename}"):
            if name.endswith(".json"):
                raw = self.read_bytes(name)
                try:
                    rec = json.loads(raw) if raw else None
                except ValueError:
                    rec = None
                if isinstance(rec, dict) and isinstance(rec.get("unit"), int):
                    found[rec["unit"]] = rec
        return found

    def has_partial(self, shard) -> bool:
        return bool(self._keys(f"{STATE}/parts/{shard.filename}"))

    def unit_digest(self, unit, shard) -> str | None:
        want = [(t.offset, t.nbytes) for t in unit.tensors if t.shard == shard.index]
        base = self._part_base(shard.filename, unit.id)
        raw = self.read_bytes(base + ".json")
        if raw is not None:
            try:
                rec = json.loads(raw)
            except ValueError:
                return None
            if _joined(want) != [tuple(p) for p in rec.get("pieces", [])]:
                return None
            size = self.size(base + ".bin")
            if size != sum(n for _, n in want):
                return None
            h = hashlib.sha256()
            for off in range(0, size, _BLOCK):
                h.update(self.read_range(base + ".bin", off, min(size, off + _BLOCK)))
            return h.hexdigest()
        if self.size(shard.filename) == shard.size:  # published, not journaled: re-hash the unit's ranges there
            h = hashlib.sha256()
            for off, n in want:
                for b in range(off, off + n, _BLOCK):
                    h.update(self.read_range(shard.filename, b, min(off + n, b + _BLOCK)))
            return h.hexdigest()
        return None

    def check_partial(self, shard) -> None:
        lo = len(shard.header)
        for uid, rec in self._parts(shard).items():
            if any(not (lo <= o and o + n <= shard.size) for o, n in rec.get("pieces", [])):
                self.remove(self._part_base(shard.filename, uid) + ".json")
                self.remove(self._part_base(shard.filename, uid) + ".bin")

    def publish(self, shard) -> tuple[str, int]:
        """Assemble header + the units' ranges (gaps, on a resume of a published shard, from its current object)
        into one multipart upload; complete it once hashed; drop the unit objects."""
        parts = self._parts(shard)
        final_size = self.size(shard.filename)
        if not parts:
            if final_size == shard.size:
                return self.sha256(shard.filename), shard.size
            raise RuntimeError(
                f"{self.where(shard.filename)}: no unit data staged for shard {shard.filename} and the shard "
                "is not published; the output prefix was modified during the merge"
            )
        sources = []  # (shard offset, length, source name, offset in source)
        for uid, rec in sorted(parts.items()):
            pos = 0
            for off, n in rec["pieces"]:
                sources.append((off, n, self._part_base(shard.filename, uid) + ".bin", pos))
                pos += n
        sources.sort()
        filled, at = [], len(shard.header)
        for off, n, src, pos in sources:
            if off > at:
                if final_size != shard.size:
                    raise RuntimeError(
                        f"{self.where(shard.filename)}: bytes {at}..{off} of shard {shard.filename} were staged "
                        "by no unit; the merge state is incomplete (run with --resume)"
                    )
                filled.append((at, off - at, shard.filename, at))
            if off + n > at:
                skip = at - off if at > off else 0
                filled.append((off + skip, n - skip, src, pos + skip))
                at = off + n
        if at < shard.size:
            if final_size != shard.size:
                raise RuntimeError(
                    f"{self.where(shard.filename)}: bytes {at}..{shard.size} of shard {shard.filename} were "
                    "staged by no unit; the merge state is incomplete (run with --resume)"
                )
            filled.append((at, shard.size - at, shard.filename, at))
        key = self.key(shard.filename)
        upload = self.client.create_multipart(key)
        try:
            h = hashlib.sha256(shard.header)
            buf, done, number = bytearray(shard.header), [], 1
            for _, n, src, pos in filled:
                for b in range(pos, pos + n, _BLOCK):
                    block = self.read_range(src, b, min(pos + n, b + _BLOCK))
                    h.update(block)
                    buf += block
                    if len(buf) >= PART_BYTES:
                        done.append(self.client.upload_part(key, upload, number, bytes(buf)))
                        number += 1
                        buf.clear()
            if buf or not done:
                done.append(self.client.upload_part(key, upload, number, bytes(buf)))
            digest = h.hexdigest()
            self.client.complete_multipart(key, upload, done)
        except BaseException:
            self.client.abort_multipart(key, upload)
            raise
        self.remove(f"{STATE}/parts/{shard.filename}")
        return digest, shard.size

    def unpublish(self, shard) -> None:
        # with its unit objects still there the shard is re-assembled from them; without, its units are re-checked
        # against the published object itself (unit_digest) and publish fills from it
        if self.has_partial(shard):
            self.remove(shard.filename)

    def recover(self) -> None:
        self.client.abort_stale_uploads(self.key(""))

    def clear_temp(self) -> None:
        self.remove(f"{STATE}/parts")
        self.client.abort_stale_uploads(self.key(""))

    # -- driver state
    def _journal_names(self) -> list[str]:
        return sorted(n for n, _ in self._keys(f"{STATE}/journal") if n.endswith(".json"))

    def journal_records(self) -> list[dict]:
        out = []
        for name in self._journal_names():
            raw = self.read_bytes(name)
            try:
                out.append(json.loads(raw))
            except (TypeError, ValueError):
                break
        return out

    def journal_start(self, first: dict) -> None:
        self.remove(f"{STATE}/journal")
        self._seq = 0
        self.journal_append({"plan_hash": first["plan_hash"], "engine": shardmerge.__version__}, sort=False)

    def journal_append(self, record: dict, sort: bool = True) -> None:
        if self._seq is None:
            names = self._journal_names()
            self._seq = int(names[-1].rsplit("/", 1)[-1].split(".")[0]) + 1 if names else 0
        self.write_atomic(f"{STATE}/journal/{self._seq:09d}.json", json.dumps(record, sort_keys=sort).encode())
        self._seq += 1

    def journal_exists(self) -> bool:
        return bool(self._journal_names())

    def state_exists(self) -> bool:
        return bool(self._keys(STATE))

    def lock(self):
        return None  # see the module docstring: no lock that dies with its holder on an object store

    def unlock(self, handle) -> None:
        pass

    def prepare(self) -> None:
        self.client.check_bucket()

    def reachable_problem(self) -> str | None:
        try:
            self.client.check_bucket()
        except StoreError as exc:
            return str(exc)
        return None


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, n in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [tuple(p) for p in out]
