"""The output vocabulary: `tokenizer_source: base | union | <model>` and the `tokenizer:` section, as mergekit
0.1.5 defines them.

The output tokenizer is the base's (`base`), a named model's, or the union of every input's vocabulary with their
added tokens (`union`), plus the `tokens:` the recipe names. Every input's embeddings and LM head are then seen in
the output's row order (shardmerge.engine.io.gather.GatheredMeta: a row gather per chunk). A token an input lacks gets, in every
input, mergekit's fallback: the row of the only input that has it; the base's row when the base has it; else the
mean of the inputs that have it; zeros when none has it; or what `tokens:` says (`source: <model>`,
`{kind: zero}`, `{kind: model_token, model, token | token_id}`; `force: true` applies it even to inputs that have
the token). `pad_to_multiple_of` pads with the mean of each input's rows. A tokenizer is built on the driver at
planning with transformers (no remote code) and written into the output; config.json's vocab_size follows it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from shardmerge.engine.io.checkpoint import Checkpoint
from shardmerge.engine.io.gather import PAD, gathered


@dataclass(frozen=True)
class VocabPlan:
    vocab: dict  # token -> output id
    rows: int  # output rows (vocabulary, padded)
    perms: dict  # model ref -> list of input row per output id (-1: the input lacks the token)
    files: tuple  # (file name, text) of the output tokenizer; () = copy the source's files
    identity: bool  # every input already in the output order: no gather needed
    vocabs: dict  # model ref -> its own tokenizer's token -> id (for `kind: model_token` with `token:`)


def vocab_tensor_names(ckpt: Checkpoint, group_key) -> list[str]:
    """Embedding and LM-head weights (rows = vocabulary) of a checkpoint."""
    return [n for n in ckpt.tensors if group_key(n)[1] in ("embed", "lm_head") and n.endswith("weight")]


def vocab_rows(ckpt: Checkpoint, group_key) -> int | None:
    names = vocab_tensor_names(ckpt, group_key)
    return ckpt.tensors[names[0]].shape[0] if names else None


def check_same_vocab(ckpts: dict, group_key, where: str) -> None:
    """Without a tokenizer setting every input must have the same vocabulary size."""
    sizes = {r: vocab_rows(c, group_key) for r, c in ckpts.items()}
    if len({s for s in sizes.values() if s is not None}) > 1:
        listed = ", ".join(f"{r} ({s})" for r, s in sizes.items())
        raise ValueError(
            f"{where}: the models have different vocabulary sizes: {listed}; set `tokenizer_source: "
            "union` (or base, or a model) so that their embeddings are aligned token by token"
        )


def _load_tokenizer(root: Path, ref: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), trust_remote_code=False, use_fast=True)
    except Exception as exc:  # no tokenizer files, or ones transformers cannot read
        raise ValueError(
            f"model {ref}: cannot load its tokenizer from {root} ({type(exc).__name__}: {exc}); a "
            "tokenizer setting needs every input's tokenizer"
        ) from None


def _union(base_tok, toks: dict, rows: dict):
    """mergekit's union: the base tokenizer plus every other input's tokens (ids below its vocabulary size) not in
    it, then every input's added tokens (the first input's settings win)."""
    out_vocab, added = {}, {}
    for ref, tok in toks.items():
        dec = tok.added_tokens_decoder
        added_text = {i.content for i in dec.values()}
        for t, i in tok.get_vocab().items():
            if i < rows[ref] and t not in added_text:
                out_vocab.setdefault(t, len(out_vocab))
        for i, info in dec.items():
            if i < rows[ref]:
                added.setdefault(info.content, info)
    res = _reload(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


def _reload(tok):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False, use_fast=True)


def _files(tok) -> tuple:
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return tuple(sorted((p.name, p.read_text()) for p in Path(d).iterdir() if p.is_file()))


def build_vocab(
    kind: str,
    ckpts: dict,
    order: list[str],
    base: str,
    source_ckpt: Checkpoint | None,
    add_tokens: list[str],
    group_key,
    where: str,
) -> VocabPlan:
    """The output vocabulary and each input's permutation. `kind`: base | union | model (`source_ckpt`)."""
    rows = {r: vocab_rows(ckpts[r], group_key) or 0 for r in order}
    toks = {r: _load_tokenizer(ckpts[r].root, r) for r in [base] + [r for r in order if r != base]}
    for r, tok in toks.items():
        over = sorted((t for t, i in tok.get_vocab().items() if i >= rows[r]), key=lambda t: tok.get_vocab()[t])
        if r == base and kind != "union" and over:
            raise ValueError(
                f"{where}: model {r}: its tokenizer has {len(over)} token(s) (e.g. {over[:3]}) with ids "
                f"past its {rows[r]} embedding rows; such a base tokenizer cannot be the output's"
            )
    if kind == "union":
        out = _union(toks[base], toks, rows)
    elif kind == "base":
        out = toks[base]
    else:
        out = _load_tokenizer(source_ckpt.root, source_ckpt.ref)
    changed = kind == "union"
    existing = set(out.get_vocab())
    for t in add_tokens:
        if t not in existing:
            if not changed:
                out, changed = _reload(out), True
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{where}: the output tokenizer's ids are not 0..{len(vocab) - 1} without gaps")
    perms = {}
    for r in order:
        mv = toks[r].get_vocab()
        perm = [-1] * len(vocab)
        for t, i in vocab.items():
            j = mv.get(t, -1)
            perm[i] = j if j < rows[r] else -1
        perms[r] = perm
    identity = all(p == list(range(len(vocab))) and rows[r] == len(vocab) for r, p in perms.items())
    return VocabPlan(
        vocab, len(vocab), perms, _files(out) if changed else (), identity, {r: t.get_vocab() for r, t in toks.items()}
    )


def padded(n: int, multiple: int | None) -> int:
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def _token_fill(
    token: str, cfg, models: list[str], perms: dict, tid: int, toks_vocab: dict, metas: dict, where: str
) -> tuple:
    """The fill of `token` that a `tokens:` entry asks for: ((donor index, row),) or () for zeros."""
    src = cfg.source
    if src is None:
        raise ValueError(
            f"{where}: tokenizer.tokens.{token}: give a source (a model, {{kind: zero}} or "
            "{kind: model_token, ...}) for a token some model lacks or that is forced"
        )
    if not isinstance(src, str) and src.kind == "zero":
        return ()
    model = src if isinstance(src, str) else src.model
    if model not in models:
        raise ValueError(
            f"{where}: tokenizer.tokens.{token}: source model {model!r} is not one of this merge's "
            f"inputs ({', '.join(models)})"
        )
    k = models.index(model)
    if isinstance(src, str):
        row = perms[model][tid]
        if row < 0:
            raise ValueError(f"{where}: tokenizer.tokens.{token}: model {model} has no token {token!r}")
        return ((k, row),)
    row = src.token_id if src.token_id is not None else toks_vocab[model].get(src.token, -1)
    if not 0 <= row < metas[model].rows:
        raise ValueError(
            f"{where}: tokenizer.tokens.{token}: model {model} has no token "
            f"{src.token if src.token_id is None else src.token_id!r} (rows 0..{metas[model].rows - 1})"
        )
    return ((k, row),)


def gather_inputs(
    vp: VocabPlan,
    models: list[str],
    metas: dict,
    base: str | None,
    tokens: dict,
    pad_multiple: int | None,
    toks_vocab: dict,
    where: str,
) -> dict:
    """Each input's GatheredMeta of one vocabulary tensor (`metas`: model -> its TensorMeta), with mergekit's
    fallback rows for tokens some input lacks and for forced tokens."""
    fills, fill_code = [], {}
    for t, tid in vp.vocab.items():
        cfg = tokens.get(t)
        present = [m for m in models if vp.perms[m][tid] >= 0]
        if len(present) == len(models) and not (cfg and cfg.force):
            continue
        if cfg is not None:
            fill = _token_fill(t, cfg, models, vp.perms, tid, toks_vocab, metas, where)
        elif len(present) == 1 or (base in present):
            donor = present[0] if len(present) == 1 else base
            fill = ((models.index(donor), vp.perms[donor][tid]),)
        else:  # none (zeros) or several without the base: their mean
            fill = tuple((models.index(m), vp.perms[m][tid]) for m in present)
        fill_code[t] = len(fills)
        fills.append(fill)
    rows = padded(vp.rows, pad_multiple)
    donors = tuple(metas[m] for m in models)
    out = {}
    for m in models:
        row_map = []
        for t, tid in sorted(vp.vocab.items(), key=lambda kv: kv[1]):
            cfg = tokens.get(t)
            own = vp.perms[m][tid]
            row_map.append(own if own >= 0 and not (cfg and cfg.force) else -1 - fill_code[t])
        row_map += [PAD] * (rows - vp.rows)
        out[m] = gathered(metas[m], row_map, tuple(fills), donors, vp.rows)
    return out


def plan_vocabulary(
    recipe, kind: str | None, ckpts: dict, reference: str, source_ckpt: Checkpoint | None, group_key, where: str
) -> tuple[VocabPlan | None, frozenset]:
    """The vocabulary plan of a recipe (None when the inputs are read as they are) and the vocabulary tensors'
    names; without a tokenizer setting (`kind` None) the inputs must share a vocabulary size."""
    if kind is None:
        check_same_vocab(ckpts, group_key, where)
        return None, frozenset()
    tok = recipe.tokenizer
    vp = build_vocab(
        kind if source_ckpt is None else "model",
        ckpts,
        list(ckpts),
        reference,
        source_ckpt,
        list(tok.tokens) if tok else [],
        group_key,
        where,
    )
    if vp.identity and not (tok and (tok.pad_to_multiple_of or any(e.force for e in tok.tokens.values()))):
        return None, frozenset()  # every input already in the output's order: plain reads, the plan as without it
    return vp, frozenset(vocab_tensor_names(ckpts[reference], group_key))


def tokenizer_outputs(recipe, planner, source: str) -> tuple[tuple, tuple]:
    """Files the output gets instead of the tokenizer source's (a built tokenizer, a resolved chat template) and
    the config.json keys they change (the vocabulary size)."""
    from shardmerge.engine.io.chat_templates import resolve_chat_template

    files: dict[str, str] = {}
    updates = ()
    vp = getattr(planner, "vocab", None)
    if vp is not None:
        files.update(vp.files)
        tok = recipe.tokenizer
        rows = padded(vp.rows, tok.pad_to_multiple_of if tok else None)
        cfg = planner.ckpts[planner.reference].config
        key = "vocab_size" if "vocab_size" in cfg or "text_config" not in cfg else "text_config.vocab_size"
        updates = ((key, rows),)
    roots = [str(c.root) for c in planner.ckpts.values()]
    text = resolve_chat_template(recipe.chat_template, roots, source)
    if text is not None:
        files["chat_template.jinja"] = text
    return tuple(sorted(files.items())), updates
