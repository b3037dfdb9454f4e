"""Row conventions of the published benchmark files: which column holds what, and how values are spelled.

One row dict (a Parquet row or a TSV line) becomes the fields of a `Sample`. The conventions covered, by column:

- question: `question` (most), `Question` (MMVP). MMMU's `<image 1>` tags are removed (one image per prompt).
- options: a list in `options`/`choices` (ScienceQA, ours), a Python-list string in `options` (MMMU:
  "['a', 'b']"), "(a) x (b) y" in `Options` (MMVP), letter columns `A`..`J` (MMBench, VLMEvalKit TSVs),
  `choice_A`.. (SEED-Bench-2-Plus) or `choice_a`.. (SEED-Bench), or written inside the question with a letter
  answer (MMStar "A: x, B: y", RealWorldQA "A. x").
- answer: `answer`, `Correct Answer` (MMVP, "(a)"), `gpt_answer` (LLaVA-Bench); a letter, an integer option index
  (ScienceQA) or the option text.
- group (the unit the bootstrap resamples): `group` (ours), `imageId` (GQA), `image_source` (POPE), `image_id`
  (LLaVA-Bench), `data_id` (SEED), MMBench's `index` mod 1e6 (its CircularEval copies are index + k * 1e6),
  MMVP's question pairs, MME's `question_id` (the image's path, shared by its yes and no question); else the row id.
- missing values: null, float NaN, and the strings "", "nan", "NaN", "None" (pandas-written files store missing
  MMBench options and hints as "nan").

A letter answer without any options is a bad row, never an open question with gold "C".
"""

from __future__ import annotations

import ast
import re
from typing import Any

LETTERS = "ABCDEFGHIJ"
MISSING = ("", "nan", "NaN", "None")
CIRCULAR = 1_000_000  # MMBench CircularEval: copy k of question i has index i + k * CIRCULAR
_LETTER_COLUMNS = ("{}", "choice_{}", "choice_{lower}")
_GROUP_COLUMNS = ("group", "imageId", "image_source", "image_id", "data_id")


class BadRow(Exception):
    """A row that cannot become a Sample; the message says why (reported, never raised to the caller)."""


def text(value: Any) -> str:
    """A cell as stripped text; every missing-value spelling becomes ""."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:
        return ""
    out = str(value).strip()
    return "" if out in MISSING else out


def question(rec: dict) -> str:
    out = text(rec.get("question", rec.get("Question")))
    out = re.sub(r"\s*<image \d+>\s*", " ", out).strip() if "<image " in out else out
    if not out:
        raise BadRow("missing question")
    return out


def options(rec: dict) -> tuple[str, ...]:
    """Option texts from whichever column convention the row uses (empty: none, or inside the question)."""
    for key in ("options", "choices"):
        value = rec.get(key)
        if isinstance(value, str) and value.strip().startswith("["):
            value = _literal_list(key, value)
        if isinstance(value, (list, tuple)):
            return tuple(text(v) for v in value)
    if "Options" in rec:
        return _paren_options(text(rec.get("Options")))
    for pattern in _LETTER_COLUMNS:
        cols = [pattern.format(letter, lower=letter.lower()) for letter in LETTERS]
        if cols[0] in rec:
            return _letter_columns(rec, cols)
    return ()


def _literal_list(key: str, value: str) -> list:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise BadRow(f"{key} {value[:60]!r} is not a list") from None
    if not isinstance(parsed, list):
        raise BadRow(f"{key} {value[:60]!r} is not a list")
    return parsed


def _paren_options(value: str) -> tuple[str, ...]:
    """MMVP: "(a) Open (b) Closed" -> ("Open", "Closed")."""
    parts = re.split(r"\(([a-j])\)\s*", value)
    if len(parts) < 3 or parts[0].strip():
        raise BadRow(f"Options {value[:60]!r} are not written as '(a) ... (b) ...'")
    letters, texts = parts[1::2], [p.strip() for p in parts[2::2]]
    if "".join(letters) != "abcdefghij"[: len(letters)]:
        raise BadRow(f"Options {value[:60]!r} are not lettered (a), (b), ... in order")
    return tuple(texts)


def _letter_columns(rec: dict, cols: list[str]) -> tuple[str, ...]:
    values = [text(rec.get(c)) for c in cols]
    n = next((i for i, v in enumerate(values) if not v), len(values))
    later = [cols[i] for i in range(n, len(values)) if values[i]]
    if later:
        raise BadRow(f"option {cols[n]} is missing but {later[0]} is given")
    return tuple(values[:n])


def embedded_choices(question_text: str) -> int:
    """How many option letters A, B, ... are written inside the question (MMStar "A: ...", RealWorldQA "A. ...")."""
    n = 0
    for letter in LETTERS:
        if not re.search(rf"(?:^|[\s(]){letter}[.:)]\s", question_text):
            break
        n += 1
    return n if n >= 2 else 0


def raw_answer(rec: dict) -> Any:
    for key in ("answer", "Correct Answer", "gpt_answer"):
        if key in rec:
            return rec.get(key)
    return None


def answer(raw: Any, opts: tuple[str, ...], n_choices: int) -> str:
    """The gold answer: a letter for multiple choice (from letter, index or option text), else the text."""
    value = text(raw)
    if not value:
        raise BadRow("missing answer")
    if not n_choices:
        if len(value) == 1 and value in LETTERS:
            raise BadRow(f"answer {value!r} is an option letter but the row has no options")
        return value
    letters = LETTERS[:n_choices]
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < n_choices:
            return letters[raw]
        raise BadRow(f"answer index {raw} is outside the {n_choices} options")
    paren = re.fullmatch(r"\(([a-jA-J])\)", value)
    if paren:
        value = paren.group(1)
    if len(value) == 1 and value.upper() in letters:
        return value.upper()
    matches = [i for i, opt in enumerate(opts) if opt.lower() == value.lower()]
    if len(matches) == 1:
        return letters[matches[0]]
    if value.isdigit() and int(value) < n_choices:
        return letters[int(value)]
    raise BadRow(f"answer {value!r} is neither an option letter ({letters}), an index nor an option text")


def group(rec: dict, rid: str) -> str:
    """The resampling unit of the row (see the module docstring)."""
    for key in _GROUP_COLUMNS:
        value = text(rec.get(key))
        if value:
            return value
    index = rec.get("index")
    if index is not None and ("hint" in rec or "A" in rec) and text(index).lstrip("-").isdigit():
        return str(int(text(index)) % CIRCULAR)
    if "Correct Answer" in rec and text(rec.get("Index")).isdigit():
        return f"pair{(int(text(rec.get('Index'))) - 1) // 2}"  # MMVP: questions 1-2, 3-4, ... share a pair
    qid = text(rec.get("question_id"))
    if "/" in qid or re.search(r"\.(png|jpe?g|bmp|webp)$", qid, re.I):
        return qid  # MME: the image path, shared by its two questions
    return rid


def bbox(rec: dict) -> tuple:
    """A region box `bbox` (x0, y0, x1, y1 in the image's pixels): a list of four numbers or its string form;
    missing: (). Used by the attention focus (attention inside the box, pointing game)."""
    value = rec.get("bbox")
    if isinstance(value, str):
        if not text(value):
            return ()
        value = _literal_list("bbox", value) if value.strip().startswith("[") else value.split(",")
    if value is None or (isinstance(value, float) and value != value):
        return ()
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise BadRow(f"bbox {value!r} is not four numbers x0, y0, x1, y1") from None
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise BadRow(f"bbox {list(box)} is not four numbers x0 < x1, y0 < y1")
    return box
