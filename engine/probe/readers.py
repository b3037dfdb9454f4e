"""Benchmark readers: our Parquet schema, Hugging Face datasets Parquet (lmms-lab and other exports), VLMEvalKit TSV.

Every reader yields `Sample`s and a list of bad rows (row number + reason): a malformed row is counted and reported,
never a crash and never silently dropped. Work is split into `Shard`s (a Parquet row group or a TSV row slice) that
a probe actor reads by itself, so image bytes never travel through the driver. Column and value conventions of the
published files are in `shardmerge.engine.probe.schemas`.

Formats (detected by extension and columns):
- ours (.parquet with a binary `image` or an `image_path` column): id, image / image_path (relative to the file),
  question, options (list, optional), answer, category, group (optional).
- hf (any other .parquet): images as an `image` struct {bytes, path} (lmms-lab), a base64 string
  (HuggingFaceM4/MMBench), a list of structs (SEED-Bench), `image_1`..`image_7` (MMMU) or an `imageId` into an
  image table (GQA: a Parquet file with `id` and `image` and no `question`, in the same directory or a sibling
  `*images*` one).
- tsv (.tsv): VLMEvalKit: index, image (base64; a short number refers to another row's image, as in MMBench),
  question, hint, A/B/C/D..., answer, category; standard CSV quoting (VLMEvalKit writes every field quoted).

Files named like `test-00000-of-00003.parquet` (Hugging Face shards) are parts of one benchmark named after their
directory (`data/` is skipped: `POPE/data/test-...` is "POPE"); their rows are numbered across the parts.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardmerge.engine.probe import schemas
from shardmerge.engine.probe.schemas import LETTERS, BadRow

FORMATS = ("auto", "ours", "hf", "tsv")
_ID_COLUMNS = ("id", "question_id", "index", "pid", "idx", "Index")
_PART = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}$")
_MAX_IMAGES = 7  # MMMU's image_1..image_7


@dataclass(frozen=True)
class Sample:
    """One benchmark question. `answer` is a letter for multiple choice, else the reference text."""

    benchmark: str
    row: int  # row number in the benchmark (across its part files): the stable sort key of the output
    id: str
    image: bytes
    question: str
    options: tuple[str, ...] = ()  # option texts; empty when the options are written inside the question
    answer: str = ""
    category: str = ""
    hint: str = ""
    n_choices: int = 0  # number of option letters A.. (0: yes/no or open question)
    group: str = ""  # resampling unit of the bootstrap (question group / image); "" means the sample itself
    bbox: tuple = ()  # region box (x0, y0, x1, y1) in the image's pixels, for the attention focus; () if none


@dataclass(frozen=True)
class Shard:
    """A unit of probe work: rows [start, stop) of one benchmark file."""

    benchmark: str
    path: str
    fmt: str  # ours | hf | tsv
    start: int
    stop: int
    index: int  # position in the global shard list
    row_offset: int = 0  # rows of the benchmark's earlier part files
    image_tables: tuple = ()  # GQA-style image tables the rows refer to by imageId


@dataclass
class ReadResult:
    samples: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # dicts: benchmark, row, id, reason


def bench_files(bench: str | Path) -> list[Path]:
    """A benchmark file, or every .parquet/.tsv file of a directory (sorted; image tables excluded)."""
    bench = Path(bench)
    if bench.is_file():
        return [bench]
    if bench.is_dir():
        files = sorted(p for p in bench.iterdir() if p.suffix in (".parquet", ".tsv") and p.is_file())
        files = [p for p in files if not is_image_table(p)]
        if files:
            return files
        raise ValueError(f"benchmark directory {bench} holds no .parquet or .tsv files with questions")
    raise ValueError(f"benchmark {bench} does not exist (expected a .parquet/.tsv file or a directory of them)")


def _schema(path: Path):
    import pyarrow.parquet as pq

    return pq.read_schema(path)


def is_image_table(path: Path) -> bool:
    """A Parquet file of images only (GQA's testdev_balanced_images): `id` and `image`, no `question`."""
    if path.suffix != ".parquet":
        return False
    names = set(_schema(path).names)
    return {"id", "image"} <= names and not ({"question", "Question"} & names)


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown benchmark format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if path.suffix == ".tsv":
        return "tsv"
    if path.suffix != ".parquet":
        raise ValueError(f"{path}: cannot tell the benchmark format from the extension (expected .parquet or .tsv)")
    schema = _schema(path)
    if "image_path" in schema.names:
        return "ours"
    if "image" in schema.names and str(schema.field("image").type) in ("binary", "large_binary"):
        return "ours"
    return "hf"


def benchmark_name(path: Path) -> str:
    """The file stem, or for a Hugging Face part file (`test-00000-of-00003`) its dataset directory's name."""
    if not _PART.match(path.stem):
        return path.stem
    folder = path.parent
    if folder.name == "data" and folder.parent.name:
        folder = folder.parent
    return folder.name or _PART.match(path.stem).group("split")


def plan_shards(
    benches: Iterable[str | Path], fmt: str = "auto", rows_per_shard: int = 64, limit: int | None = None
) -> list[Shard]:
    """Split benchmark files into shards: Parquet row groups (cut to rows_per_shard), TSV row slices."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    shards: list[Shard] = []
    files: dict[str, list[Path]] = {}
    for path in [f for b in benches for f in bench_files(b)]:
        name = benchmark_name(path)
        same = files.setdefault(name, [])
        if same and not (_PART.match(path.stem) and same[0].parent == path.parent):
            raise ValueError(f"two benchmark files share the name {name!r}: {same[0]} and {path}; rename one")
        same.append(path)
    for name, paths in files.items():
        offset = 0
        for path in paths:
            kind = detect_format(path, fmt)
            n = _num_rows(path, kind)
            if limit is not None:
                n = max(0, min(n, limit - offset))
            tables = _image_tables(path) if kind == "hf" and "imageId" in _schema(path).names else ()
            for lo, hi in _group_bounds(path, kind, n):
                for start in range(lo, hi, rows_per_shard):
                    shards.append(
                        Shard(
                            name,
                            str(path),
                            kind,
                            start,
                            min(hi, start + rows_per_shard),
                            len(shards),
                            row_offset=offset,
                            image_tables=tables,
                        )
                    )
            offset += n
    return shards


def _image_tables(path: Path) -> tuple:
    """Image tables for a question file whose rows name an imageId: in its directory or a sibling directory whose
    name holds "images" (GQA: testdev_balanced_instructions/ beside testdev_balanced_images/)."""
    siblings = [d for d in sorted(path.parent.parent.iterdir()) if d.is_dir() and "images" in d.name.lower()]
    candidates = sorted(path.parent.glob("*.parquet")) + [p for d in siblings for p in sorted(d.glob("*.parquet"))]
    found = tuple(dict.fromkeys(str(p) for p in candidates if p != path and is_image_table(p)))
    if not found:
        raise ValueError(
            f"{path}: rows refer to images by imageId but no image table (a Parquet file with `id` and "
            f"`image` columns, e.g. GQA's testdev_balanced_images) is in {path.parent} or a sibling "
            "directory; download it next to the questions"
        )
    return found


def _num_rows(path: Path, kind: str) -> int:
    if kind == "tsv":
        return len(_tsv_rows(path))
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _group_bounds(path: Path, kind: str, n: int) -> list[tuple[int, int]]:
    """Row ranges of the Parquet row groups (so a shard never straddles two), or one range for TSV."""
    if kind == "tsv":
        return [(0, n)] if n else []
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    bounds, start = [], 0
    for g in range(meta.num_row_groups):
        stop = min(start + meta.row_group(g).num_rows, n)
        if stop > start:
            bounds.append((start, stop))
        start += meta.row_group(g).num_rows
    return bounds


def in_split(sample: Sample, holdout: float, seed: int, side: str) -> bool:
    """Seeded split by question group: a group goes to the held-out ("eval") side with probability `holdout`,
    so the copies of a question or the questions of an image never straddle the two sides."""
    import hashlib

    if side not in ("probe", "eval"):
        raise ValueError(f"split side must be 'probe' or 'eval', got {side!r}")
    key = f"{seed}/{sample.benchmark}/{sample.group or sample.id}".encode()
    held = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < holdout
    return held if side == "eval" else not held


def read_shard(shard: Shard) -> ReadResult:
    """The samples of one shard and its bad rows."""
    path = Path(shard.path)
    if shard.fmt == "tsv":
        rows = _tsv_rows(path)
        by_index = {str(r.get("index", i)): r for i, r in enumerate(rows)}
        records = [(i, rows[i]) for i in range(shard.start, shard.stop)]
        return _convert(shard, records, lambda rec: _tsv_image(rec, by_index))
    records = list(zip(range(shard.start, shard.stop), _parquet_rows(path, shard.start, shard.stop)))
    if shard.fmt == "ours":
        return _convert(shard, records, lambda rec: _our_image(rec, path))
    lookup = _lookup_images(shard, [rec for _, rec in records]) if shard.image_tables else {}
    return _convert(shard, records, lambda rec: _hf_image(rec, path, lookup))


def _parquet_rows(path: Path, start: int, stop: int, columns: list | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    rows, offset = [], 0
    for g in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if offset + size > start and offset < stop:
            table = pf.read_row_group(g, columns=columns)
            table = table.slice(max(start - offset, 0), min(stop, offset + size) - max(start, offset))
            rows.extend(table.to_pylist())
        offset += size
    return rows


def _lookup_images(shard: Shard, records: list[dict]) -> dict:
    """imageId -> image cell, read from the image tables for just this shard's ids."""
    import pyarrow.parquet as pq

    ids = sorted({schemas.text(r.get("imageId")) for r in records} - {""})
    found: dict = {}
    for table_path in shard.image_tables:
        table = pq.read_table(table_path, columns=["id", "image"], filters=[("id", "in", ids)])
        for rec in table.to_pylist():
            found.setdefault(str(rec["id"]), rec["image"])
    return found


def _tsv_rows(path: Path) -> list[dict]:
    """VLMEvalKit TSV with standard CSV quoting (quoted fields may hold tabs, quotes and newlines)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
    for i, row in enumerate(rows):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(
                f"{path}: the line of row {i} does not have the header's {len(reader.fieldnames or [])} "
                "fields (an unquoted tab, quote or newline in a field); write the file with CSV quoting, "
                "e.g. pandas to_csv(sep='\\t', quoting=csv.QUOTE_ALL) as VLMEvalKit does"
            )
    return rows


def _convert(shard: Shard, records, image_of) -> ReadResult:
    out = ReadResult()
    for row, rec in records:
        rid = _row_id(rec, row)
        number = shard.row_offset + row
        try:
            out.samples.append(_sample(shard.benchmark, number, rid, rec, image_of(rec)))
        except BadRow as exc:
            out.bad.append(dict(benchmark=shard.benchmark, row=number, id=rid, reason=str(exc)))
    return out


def _row_id(rec: dict, row: int) -> str:
    for key in _ID_COLUMNS:
        value = schemas.text(rec.get(key))
        if value:
            return value
    return str(row)


def _sample(bench: str, row: int, rid: str, rec: dict, image: bytes) -> Sample:
    question = schemas.question(rec)
    options = schemas.options(rec)
    if len(options) == 1 or len(options) > len(LETTERS):
        raise BadRow(f"{len(options)} options; expected none or 2..{len(LETTERS)}")
    raw = schemas.raw_answer(rec)
    n_choices = len(options)
    if not n_choices and len(schemas.text(raw)) == 1 and schemas.text(raw).upper() in LETTERS:
        n_choices = schemas.embedded_choices(question)
    if not n_choices and schemas.text(rec.get("question_type")) == "multiple-choice":
        raise BadRow("question_type is multiple-choice but the row has no options")
    gold = schemas.answer(raw, options, n_choices)
    _check_image(image)
    return Sample(
        benchmark=bench,
        row=row,
        id=rid,
        image=image,
        question=question,
        options=options,
        answer=gold,
        category=schemas.text(rec.get("category")),
        hint=schemas.text(rec.get("hint")),
        n_choices=n_choices,
        group=schemas.group(rec, rid),
        bbox=schemas.bbox(rec),
    )


def _check_image(data: bytes) -> None:
    from PIL import Image

    if not data:
        raise BadRow("missing image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:  # Pillow raises many types for broken files
        raise BadRow(f"image does not decode ({type(exc).__name__}: {exc})") from None


def _our_image(rec: dict, path: Path) -> bytes:
    data = rec.get("image")
    if isinstance(data, (bytes, bytearray)) and data:
        return bytes(data)
    return _read_path(rec.get("image_path"), path)


def _hf_image(rec: dict, path: Path, lookup: dict) -> bytes:
    """The one image of a row, whatever the encoding; several images are a bad row (one image per prompt)."""
    if "imageId" in rec:
        key = schemas.text(rec.get("imageId"))
        if key not in lookup:
            raise BadRow(f"imageId {key!r} is not in the image tables")
        return _cell_image(lookup[key], path, "image")
    if "image_1" in rec:
        cells = [(f"image_{i}", rec.get(f"image_{i}")) for i in range(1, _MAX_IMAGES + 1)]
        present = [(k, v) for k, v in cells if v is not None]
        if len(present) > 1:
            raise BadRow(
                f"{len(present)} images ({', '.join(k for k, _ in present)}); the probe shows one image per question"
            )
        if not present:
            raise BadRow("missing image (image_1 is null)")
        return _cell_image(present[0][1], path, present[0][0])
    value = rec.get("image")
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRow(
                f"{len(value)} images in the image list; the probe shows one image per question"
                if value
                else "missing image (empty image list)"
            )
        value = value[0]
    return _cell_image(value, path, "image")


def _cell_image(value: Any, path: Path, column: str) -> bytes:
    if value is None:
        raise BadRow(f"missing image: {column} is null where a {{bytes, path}} struct is expected")
    if isinstance(value, str):
        return _b64(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, dict):
        raise BadRow(f"{column} is not a {{bytes, path}} struct, bytes or a base64 string")
    if value.get("bytes"):
        return bytes(value["bytes"])
    return _read_path(value.get("path"), path)


def _read_path(rel: str | None, bench: Path) -> bytes:
    if not rel:
        raise BadRow("missing image (no bytes and no path)")
    candidate = Path(rel) if Path(rel).is_absolute() else bench.parent / rel
    if not candidate.is_file():
        raise BadRow(f"image file {candidate} not found")
    return candidate.read_bytes()


def _b64(value: str) -> bytes:
    if not value.strip():
        raise BadRow("missing image")
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRow("image is not valid base64") from None


def _tsv_image(rec: dict, by_index: dict) -> bytes:
    value = schemas.text(rec.get("image"))
    if value and len(value) < 32 and value in by_index and by_index[value] is not rec:
        value = schemas.text(by_index[value].get("image"))  # MMBench stores repeated images as a reference
    return _b64(value)
