"""Prompts and answer extraction for `--score generate`, following lmms-eval's task definitions so that m(L) can be
compared with published lmms-eval numbers.

The task is recognised from the benchmark's name (file stem or dataset folder, see `readers.benchmark_name`),
lower-cased with `-`/`_`/spaces removed: it starts with mmstar, seedbench2plus, seedbench, pope or realworldqa.
Other benchmarks use the probe's own prompt and a rule by question kind (the first letter for multiple choice, the
first word for yes/no, normalised exact match for open answers).

Rules (lmms-eval's `doc_to_text` and `process_results` / filters of the default model configuration):
- MMStar: the question (its options are written in it) + "\\nAnswer with the option's letter from the given choices
  directly"; a response is right when, lower-cased and stripped, its first character is the gold letter, or it
  starts with "(" / "option " / "the answer is " followed by the gold letter.
- SEED-Bench and SEED-Bench-2-Plus: question + "\\nA. ..\\nB. ..\\nC. ..\\nD. .." + "\\nAnswer with the option's letter
  from the given choices directly."; the stripped response's first character is compared with the gold letter
  (case-sensitive for SEED-Bench, case-insensitive for SEED-Bench-2-Plus).
- POPE: question + "\\nAnswer the question using a single word or phrase."; the whole response, lower-cased and
  stripped, must equal "yes" / "no".
- RealWorldQA: the question as is (it carries its own options and instruction); number words zero..ten become
  digits (whole response); punctuation is removed and, when an option text "X. text" of the question occurs in the
  response, the response becomes that option's letter; then lower-cased, stripped, trailing "." removed, compared
  with the lower-cased gold.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from shardmerge.engine.probe import prompting
from shardmerge.engine.probe.readers import LETTERS, Sample

MC_SUFFIX = "Answer with the option's letter from the given choices directly"
SHORT = "Answer the question using a single word or phrase."
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_OPTION_IN_QUESTION = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


@dataclass(frozen=True)
class Task:
    name: str
    prompt: Callable[[Sample], str]
    extract: Callable[[str, Sample], str]  # the response -> the prediction compared with the gold
    correct: Callable[[str, Sample], bool]  # (prediction, sample) -> right?


def _lettered(sample: Sample) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(sample.options))


def _mmstar_prompt(s: Sample) -> str:
    return f"{s.question.strip()}\n{MC_SUFFIX}"


def _mmstar_extract(text: str, s: Sample) -> str:
    pred = text.lower().strip().replace("\n", " ")
    gold = s.answer.lower().strip()
    for lead in ("(", "option ", "the answer is "):
        if pred.startswith(lead) and pred[len(lead) : len(lead) + 1] == gold:
            return gold.upper()
    return pred[:1].upper()


def _seed_prompt(s: Sample) -> str:
    return f"{s.question}\n{_lettered(s)}\n{MC_SUFFIX}."


def _first_char(text: str, s: Sample) -> str:
    pred = text.strip()
    return pred[:1] if len(pred) > 1 else pred


def _pope_prompt(s: Sample) -> str:
    return f"{s.question.strip()}\n{SHORT}"


def _pope_extract(text: str, s: Sample) -> str:
    return text.lower().strip()


def _rwqa_extract(text: str, s: Sample) -> str:
    resp = _NUMBER_WORDS.get(text.lower(), text)
    cleaned = re.sub(r"[^\w\s]", "", resp).strip()
    choices = {m[1].strip(): LETTERS[i] for i, m in enumerate(_OPTION_IN_QUESTION.findall(s.question))}
    for choice in sorted(choices, key=lambda c: cleaned.find(c) if c in cleaned else len(cleaned) + 1):
        if choice and choice in cleaned:
            cleaned = choices[choice]
            break
    return cleaned.lower().strip().rstrip(".")


def _default_prompt(s: Sample) -> str:
    return prompting.prompt_text(s)


def _default_extract(text: str, s: Sample) -> str:
    kind = prompting.question_kind(s)
    if kind == "choice":
        m = re.match(r"\W*([A-Za-z])\b", text.strip())
        return m.group(1).upper() if m else ""
    if kind == "yesno":
        words = re.findall(r"[a-z]+", text.lower())
        return words[0] if words else ""
    return text


def _default_correct(pred: str, s: Sample) -> bool:
    kind = prompting.question_kind(s)
    if kind == "choice":
        return pred == s.answer
    if kind == "yesno":
        return pred == s.answer.strip().lower()
    return normalize_answer(pred) == normalize_answer(s.answer)


TASKS = {
    "mmstar": Task("mmstar", _mmstar_prompt, _mmstar_extract, lambda p, s: p == s.answer.strip().upper()),
    "seedbench2plus": Task(
        "seedbench2plus", _seed_prompt, _first_char, lambda p, s: p.lower().strip() == s.answer.lower().strip()
    ),
    "seedbench": Task("seedbench", _seed_prompt, _first_char, lambda p, s: p == s.answer),
    "pope": Task("pope", _pope_prompt, _pope_extract, lambda p, s: p == s.answer.lower().strip()),
    "realworldqa": Task(
        "realworldqa", lambda s: s.question.strip(), _rwqa_extract, lambda p, s: p == s.answer.lower().strip()
    ),
}
DEFAULT = Task("default", _default_prompt, _default_extract, _default_correct)


def task_for(benchmark: str) -> Task:
    """The lmms-eval task whose prompt and extraction a benchmark uses (by name), else the default rules."""
    key = re.sub(r"[-_\s]", "", benchmark.lower())
    for name, task in TASKS.items():  # seedbench2plus is tried before seedbench
        if key.startswith(name):
            return task
    return DEFAULT


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual VQA exact-match normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())
