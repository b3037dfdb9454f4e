"""Benchmark readers: our Parquet schema, Hugging Face datasets Parquet, VLMEvalKit TSV.

Every reader yields `Sample`s and a list of bad rows (row number + reason): a malformed row is counted and reported,
never a crash and never silently dropped. Work is split into `Shard`s (a Parquet row group or a TSV row slice) that
a probe actor reads by itself, so image bytes never travel through the driver.

Formats (detected by extension and columns):
- ours (.parquet): id, image (bytes) or image_path (relative to the file), question, options (list, optional),
  answer, category (optional).
- hf (.parquet): `image` struct {bytes, path} (MMStar / POPE / ScienceQA exports); options from `options`/`choices`
  lists or A/B/C/D columns; answer as letter, option index or text; id from id/question_id/index/pid.
- tsv (.tsv): VLMEvalKit: index, image (base64; a short number refers to another row's image, as in MMBench),
  question, hint, A/B/C/D..., answer, category.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

LETTERS = "ABCDEFGHIJ"
FORMATS = ("auto", "ours", "hf", "tsv")
_ID_COLUMNS = ("id", "question_id", "index", "pid", "idx")


@dataclass(frozen=True)
class Sample:
    """One benchmark question. `answer` is a letter for multiple choice, else the reference text."""

    benchmark: str
    row: int  # row number in the source file: the stable sort key of the output
    id: str
    image: bytes
    question: str
    options: tuple[str, ...] = ()  # option texts; empty when the options are written inside the question
    answer: str = ""
    category: str = ""
    hint: str = ""
    n_choices: int = 0  # number of option letters A.. (0: yes/no or open question)


@dataclass(frozen=True)
class Shard:
    """A unit of probe work: rows [start, stop) of one benchmark file."""

    benchmark: str
    path: str
    fmt: str  # ours | hf | tsv
    start: int
    stop: int
    index: int  # position in the global shard list


@dataclass
class ReadResult:
    samples: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # dicts: benchmark, row, id, reason


def bench_files(bench: str | Path) -> list[Path]:
    """A benchmark file, or every .parquet/.tsv file of a directory (sorted); error when there is none."""
    bench = Path(bench)
    if bench.is_file():
        return [bench]
    if bench.is_dir():
        files = sorted(p for p in bench.iterdir() if p.suffix in (".parquet", ".tsv") and p.is_file())
        if files:
            return files
        raise ValueError(f"benchmark directory {bench} holds no .parquet or .tsv files")
    raise ValueError(f"benchmark {bench} does not exist (expected a .parquet/.tsv file or a directory of them)")


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown benchmark format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if path.suffix == ".tsv":
        return "tsv"
    if path.suffix != ".parquet":
        raise ValueError(f"{path}: cannot tell the benchmark format from the extension (expected .parquet or .tsv)")
    import pyarrow.parquet as pq

    image_type = pq.read_schema(path).field("image").type if "image" in pq.read_schema(path).names else None
    return "hf" if image_type is not None and str(image_type).startswith("struct") else "ours"


def plan_shards(benches: Iterable[str | Path], fmt: str = "auto", rows_per_shard: int = 64,
                limit: Optional[int] = None) -> list[Shard]:
    """Split benchmark files into shards: Parquet row groups (cut to rows_per_shard), TSV row slices."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    shards: list[Shard] = []
    for path in [f for b in benches for f in bench_files(b)]:
        kind = detect_format(path, fmt)
        n = _num_rows(path, kind)
        if limit is not None:
            n = min(n, limit)
        bounds = _group_bounds(path, kind, n)
        for lo, hi in bounds:
            for start in range(lo, hi, rows_per_shard):
                stop = min(hi, start + rows_per_shard)
                shards.append(Shard(path.stem, str(path), kind, start, stop, len(shards)))
    names = {}
    for s in shards:
        other = names.setdefault(s.benchmark, s.path)
        if other != s.path:
            raise ValueError(f"two benchmark files share the name {s.benchmark!r}: {other} and {s.path}; rename one")
    return shards


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


def read_shard(shard: Shard) -> ReadResult:
    """The samples of one shard and its bad rows."""
    path = Path(shard.path)
    if shard.fmt == "tsv":
        rows = _tsv_rows(path)
        by_index = {str(r.get("index", i)): r for i, r in enumerate(rows)}
        records = [(i, rows[i]) for i in range(shard.start, shard.stop)]
        return _convert(shard, records, lambda rec: _tsv_image(rec, by_index))
    records = list(zip(range(shard.start, shard.stop), _parquet_rows(path, shard.start, shard.stop)))
    image = (lambda rec: _struct_image(rec, path)) if shard.fmt == "hf" else (lambda rec: _our_image(rec, path))
    return _convert(shard, records, image)


def _parquet_rows(path: Path, start: int, stop: int) -> list[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    rows, offset = [], 0
    for g in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if offset + size > start and offset < stop:
            table = pf.read_row_group(g).slice(max(start - offset, 0), min(stop, offset + size) - max(start, offset))
            rows.extend(table.to_pylist())
        offset += size
    return rows


def _tsv_rows(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _convert(shard: Shard, records, image_of) -> ReadResult:
    out = ReadResult()
    for row, rec in records:
        rid = _row_id(rec, row)
        try:
            out.samples.append(_sample(shard.benchmark, row, rid, rec, image_of(rec)))
        except BadRow as exc:
            out.bad.append(dict(benchmark=shard.benchmark, row=row, id=rid, reason=str(exc)))
    return out


class BadRow(Exception):
    """A row that cannot become a Sample; the message says why (reported, never raised to the caller)."""


def _row_id(rec: dict, row: int) -> str:
    for key in _ID_COLUMNS:
        value = rec.get(key)
        if value is not None and str(value) != "":
            return str(value)
    return str(row)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return ""
    return str(value).strip()


def _options(rec: dict) -> tuple[str, ...]:
    for key in ("options", "choices"):
        value = rec.get(key)
        if isinstance(value, (list, tuple)) and len(value) > 0:
            return tuple(_text(v) for v in value)
    letters = []
    for letter in LETTERS:
        value = _text(rec.get(letter))
        if not value:
            break
        letters.append(value)
    return tuple(letters)


def _embedded_choices(question: str) -> int:
    """How many option letters A, B, ... are written inside the question (MMStar style "A: ... B: ...")."""
    n = 0
    for letter in LETTERS:
        if not re.search(rf"(?:^|[\s(]){letter}[.:)]\s", question):
            break
        n += 1
    return n if n >= 2 else 0


def _answer(raw: str, options: tuple[str, ...], n_choices: int) -> str:
    """The gold answer: a letter for multiple choice (from letter, index or option text), else the text."""
    if not raw:
        raise BadRow("missing answer")
    if not n_choices:
        return raw
    letters = LETTERS[:n_choices]
    if len(raw) == 1 and raw.upper() in letters:
        return raw.upper()
    if raw.isdigit() and int(raw) < n_choices:
        return letters[int(raw)]
    matches = [i for i, opt in enumerate(options) if opt.lower() == raw.lower()]
    if len(matches) == 1:
        return letters[matches[0]]
    raise BadRow(f"answer {raw!r} is neither an option letter ({letters}), an index nor an option text")


def _sample(bench: str, row: int, rid: str, rec: dict, image: bytes) -> Sample:
    question = _text(rec.get("question"))
    if not question:
        raise BadRow("missing question")
    options = _options(rec)
    if len(options) == 1 or len(options) > len(LETTERS):
        raise BadRow(f"{len(options)} options; expected none or 2..{len(LETTERS)}")
    raw = _text(rec.get("answer"))
    n_choices = len(options)
    if not n_choices and len(raw) == 1 and raw.upper() in LETTERS:
        n_choices = _embedded_choices(question)
    _check_image(image)
    return Sample(benchmark=bench, row=row, id=rid, image=image, question=question, options=options,
                  answer=_answer(raw, options, n_choices), category=_text(rec.get("category")),
                  hint=_text(rec.get("hint")), n_choices=n_choices)


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


def _struct_image(rec: dict, path: Path) -> bytes:
    value = rec.get("image")
    if not isinstance(value, dict):
        raise BadRow("image is not a {bytes, path} struct")
    if value.get("bytes"):
        return bytes(value["bytes"])
    return _read_path(value.get("path"), path)


def _read_path(rel: Optional[str], bench: Path) -> bytes:
    if not rel:
        raise BadRow("missing image (no bytes and no path)")
    candidate = Path(rel) if Path(rel).is_absolute() else bench.parent / rel
    if not candidate.is_file():
        raise BadRow(f"image file {candidate} not found")
    return candidate.read_bytes()


def _tsv_image(rec: dict, by_index: dict) -> bytes:
    value = _text(rec.get("image"))
    if value and len(value) < 32 and value in by_index and by_index[value] is not rec:
        value = _text(by_index[value].get("image"))  # MMBench stores repeated images as a reference
    if not value:
        raise BadRow("missing image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRow("image is not valid base64") from None
