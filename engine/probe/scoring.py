"""Per-sample, per-cut metrics of the probe.

Closed questions (multiple choice, yes/no): the next-token log-probabilities of the answer labels' first tokens at
the answer position, from one forward per cut (or one fast sweep). Open questions: short greedy generation under the
mask and normalised exact match; the gold answer's log-probability by teacher forcing.

score="generate": every question is answered by greedy generation under the mask, with lmms-eval's prompt and
answer extraction for the benchmark (`extraction`); `correct` and `pred` come from the generated answer, the
log-probability and KL columns are still computed at the answer position of the same prompt.

Metrics per (sample, cut):
  correct       prediction == gold (closed: arg-max over the labels; open: normalised exact match)
  gold_logprob  log p(gold) over the full vocabulary (closed: gold label's first token; open: sum over the gold
                answer's tokens, i.e. log P(answer))
  kl            KL(unmasked || masked) of the answer distribution: over the labels (renormalised) for closed
                questions, over the vocabulary at the answer position for open ones
  kl_vocab      KL(unmasked || masked) of the full next-token distribution at the answer position
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.probe import attention, core, extraction, generation, paths, prompting
from shardmerge.engine.probe.extraction import normalize_answer
from shardmerge.engine.probe.readers import Sample

PATHS = ("fast", "exact")
SCORES = ("labels", "generate")


@dataclass(frozen=True)
class ScoreSettings:
    """How each sample is probed."""

    cuts: tuple[int, ...] | None = None  # None: every cut 0..L
    path: str = "fast"  # fast | exact
    max_new_tokens: int = 8
    score: str = "labels"  # labels: label log-probs (closed questions); generate: lmms-eval-style generation
    masking: str = "clean"  # clean | reference-qwen25 | reference-qwen3 (attention.MODES)

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"probe path must be one of {PATHS}, got {self.path!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.masking not in attention.MODES:
            raise ValueError(f"masking must be one of {attention.MODES}, got {self.masking!r}")
        if self.masking != "clean" and self.path == "fast":
            raise ValueError(
                f"masking {self.masking!r} changes the text before the image or lets text see later tokens, which "
                "the fast path's prefix sharing assumes never happens; use the exact path (--path exact)"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def cut_list(self, num_layers: int) -> list[int]:
        """The cuts to run; 0 and L are always included (they normalise the curve)."""
        cuts = set(range(num_layers + 1) if self.cuts is None else self.cuts)
        bad = sorted(c for c in cuts if not 0 <= c <= num_layers)
        if bad:
            raise ValueError(f"cut layers {bad} outside 0..{num_layers} (the model has L = {num_layers} layers)")
        return sorted(cuts | {0, num_layers})


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(ref) || softmax(logits)) in float64."""
    p_log = torch.log_softmax(ref_logits.double(), dim=-1)
    q_log = torch.log_softmax(logits.double(), dim=-1)
    return float((p_log.exp() * (p_log - q_log)).sum().clamp_min(0.0))


def closed_metrics(logits: torch.Tensor, ref: torch.Tensor, label_ids: Sequence[int], gold: int) -> dict:
    """Metrics of one closed question at one cut from the (V,) answer-position logits and the unmasked ones."""
    ids = torch.as_tensor(list(label_ids), device=logits.device)
    logp = torch.log_softmax(logits.double(), dim=-1)
    pred = int(logp[ids].argmax())
    return dict(
        pred_index=pred,
        correct=pred == gold,
        gold_logprob=float(logp[ids[gold]]),
        kl=kl(ref[ids], logits[ids]),
        kl_vocab=kl(ref, logits),
    )


def gold_sequence_logprob(text_logits: torch.Tensor, gold_ids: Sequence[int]) -> float:
    """log P(gold) from the logits at the last len(gold)+1 text positions of prompt+gold (teacher forcing)."""
    g = len(gold_ids)
    rows = torch.log_softmax(text_logits[-(g + 1) : -1].double(), dim=-1)
    ids = torch.as_tensor(list(gold_ids), device=rows.device)
    return float(rows[torch.arange(g, device=rows.device), ids].sum())


def _closed_logits(model, parts, inputs, cuts, settings: ScoreSettings) -> dict:
    if settings.path == "fast":
        return paths.fast_logits(model, parts, inputs, cuts, positions="last")
    return {c: paths.exact_logits(model, inputs, c, last=1, mode=settings.masking)[-1] for c in cuts}


def _forced_logits(model, parts, inputs, cuts, settings: ScoreSettings, rows: int) -> dict:
    """Logits at the last `rows` positions (answer position + teacher-forced gold tokens) per cut."""
    if settings.path == "fast":
        return paths.fast_logits(model, parts, inputs, cuts, positions=rows)
    return {c: paths.exact_logits(model, inputs, c, last=rows, mode=settings.masking) for c in cuts}


def _generate(model, prompter, inputs, cut: int, settings: ScoreSettings) -> str:
    new = generation.greedy_generate(
        model, inputs, cut, max_new_tokens=settings.max_new_tokens, eos_ids=prompter.eos_ids(), mode=settings.masking
    )
    return prompter.tokenizer.decode(new, skip_special_tokens=True)


def score_sample(
    model, parts: core.LMParts, prompter: prompting.Prompter, sample: Sample, settings: ScoreSettings
) -> list[dict]:
    """One row per cut for one sample (see the module docstring for the columns)."""
    L = parts.num_layers
    cuts = settings.cut_list(L)
    kind = prompting.question_kind(sample)
    task = extraction.task_for(sample.benchmark) if settings.score == "generate" else None
    text = task.prompt(sample) if task is not None else None
    inputs = core.to_device(prompter.encode(sample, text=text), model.device)
    base = dict(
        benchmark=sample.benchmark,
        row=sample.row,
        id=sample.id,
        group=sample.group or sample.id,
        category=sample.category,
        kind=kind,
        num_layers=L,
        seq_len=inputs.seq_len,
        n_image_tokens=int(inputs.image_mask.sum()),
    )
    rows = []
    if kind != "open":
        label_ids = prompter.label_ids(sample)
        labs = prompting.labels(sample)
        gold = labs.index(prompting.gold_label(sample))
        logits = _closed_logits(model, parts, inputs, cuts, settings)
        for c in cuts:
            m = closed_metrics(logits[c], logits[L], label_ids, gold)
            pred = labs[m.pop("pred_index")]
            if task is not None:
                pred = task.extract(_generate(model, prompter, inputs, c, settings), sample)
                m["correct"] = task.correct(pred, sample)
            rows.append(dict(base, cut=c, pred=pred, gold=labs[gold], **m))
        return rows
    gold_ids = prompter.continuation_ids(sample, sample.answer)
    forced = _forced_logits(model, parts, core.append_tokens(inputs, gold_ids), cuts, settings, len(gold_ids) + 1)
    answer_row = -(len(gold_ids) + 1)
    for c in cuts:
        answer = _generate(model, prompter, inputs, c, settings)
        pred = task.extract(answer, sample) if task is not None else answer
        right = (
            task.correct(pred, sample)
            if task is not None
            else normalize_answer(pred) == normalize_answer(sample.answer)
        )
        vocab_kl = kl(forced[L][answer_row], forced[c][answer_row])
        rows.append(
            dict(
                base,
                cut=c,
                pred=pred,
                gold=sample.answer,
                correct=right,
                gold_logprob=gold_sequence_logprob(forced[c], gold_ids),
                kl=vocab_kl,
                kl_vocab=vocab_kl,
            )
        )
    return rows
