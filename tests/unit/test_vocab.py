"""Tokenizers and vocabularies: `tokenizer_source` / `tokenizer:` against mergekit 0.1.5 in-process, named chat
templates, and the vocabulary-size planning error. Tiny models with word-level tokenizers, built locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardmerge.engine.tiny_models import build_llm
from shardmerge.jobs.merge import run_merge

ADDED = {"b": ["<think>", "<tool>"], "c": ["<tool>", "<img>"]}


def _with_added(src: Path, out: Path, tokens: list[str], seed: int) -> Path:
    """A fine-tune of `src` whose tokenizer gained `tokens` (special added tokens) and whose embeddings and head
    grew by as many seeded rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_llm(out, base=src, perturb_seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    tok.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[-len(tokens) :] = torch.randn(len(tokens), w.shape[1], generator=gen)
    model.save_pretrained(out, max_shard_size="50KB")
    return out


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    a = build_llm(root / "a", seed=3)
    return {"a": a, "b": _with_added(a, root / "b", ADDED["b"], 1), "c": _with_added(a, root / "c", ADDED["c"], 2)}


def _tensors(d: Path) -> dict:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def _mergekit(recipe: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    mk_run(
        MergeConfiguration.model_validate(yaml.safe_load(recipe)),
        str(out),
        options=MergeOptions(copy_tokenizer=True, lazy_unpickle=True, quiet=True),
    )


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _by_token(tensors: dict, tok, order: list[str]) -> dict:
    """Vocabulary tensors with rows put in `order` of tokens: mergekit orders a union's new tokens by a Python
    set's iteration (it varies with PYTHONHASHSEED), so rows are compared token by token."""
    ids = torch.tensor(tok.convert_tokens_to_ids(order))
    return {n: (t[ids] if n in VOCAB_TENSORS else t) for n, t in tensors.items()}


def _close(ours: dict, theirs: dict, what: str) -> None:
    assert set(ours) == set(theirs), what
    for name, t in theirs.items():
        o = ours[name].float()
        assert o.shape == t.shape, f"{what}: {name}: {tuple(o.shape)} vs {tuple(t.shape)}"
        err = (o - t.float()).abs().max() / t.float().abs().max().clamp_min(1e-12)
        assert err <= 1e-3, f"{what}: {name}: relative max error {err:.2e}"


TA = """merge_method: task_arithmetic
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {c}
    parameters: {{weight: 0.5}}
dtype: float32
"""


def test_union_tokenizer_matches_mergekit_and_round_trips(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = TA.format(**vocab_models) + "tokenizer_source: union\n"
    (tmp_path / "r.yaml").write_text(text)
    _mergekit(text, tmp_path / "mk")
    run_merge(tmp_path / "r.yaml", tmp_path / "sm", workers=0, shard_size="30KB", chunk_mb=0.001, progress=False)
    ours, theirs = _tensors(tmp_path / "sm"), _tensors(tmp_path / "mk")
    tok, mk_tok = AutoTokenizer.from_pretrained(tmp_path / "sm"), AutoTokenizer.from_pretrained(tmp_path / "mk")
    assert set(tok.get_vocab()) == set(mk_tok.get_vocab())
    order = sorted(tok.get_vocab())
    _close(_by_token(ours, tok, order), _by_token(theirs, mk_tok, order), "union")
    assert [tok.convert_ids_to_tokens(i) for i in range(128, 131)] == ["<think>", "<tool>", "<img>"]  # recipe order
    assert ours["model.embed_tokens.weight"].shape[0] == len(tok) == 128 + 3
    for m in ("a", "b", "c"):  # every token of every input encodes to itself and decodes back
        src = AutoTokenizer.from_pretrained(vocab_models[m])
        for t in src.get_vocab():
            ids = tok.convert_tokens_to_ids([t])
            assert ids[0] != tok.unk_token_id or t == tok.unk_token, (m, t)
            assert tok.convert_ids_to_tokens(ids) == [t]
        assert tok.decode(
            tok.encode(" ".join(ADDED.get(m, [])) + " w5 w77", add_special_tokens=False)
        ).split() == ADDED.get(m, []) + ["w5", "w77"]
    # <think> only in b: every input takes b's row, so the merge gives b's row exactly
    think = tok.convert_tokens_to_ids("<think>")
    b_emb = _tensors(vocab_models["b"])["model.embed_tokens.weight"]
    b_tok = AutoTokenizer.from_pretrained(vocab_models["b"])
    assert torch.equal(ours["model.embed_tokens.weight"][think], b_emb[b_tok.convert_tokens_to_ids("<think>")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sm")
    assert model.config.vocab_size == len(tok)
    out = model.generate(torch.tensor([[1, think, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_different_vocab_sizes_without_tokenizer_setting_is_a_planning_error(vocab_models, tmp_path):
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import parse_recipe

    recipe = parse_recipe(__import__("yaml").safe_load(TA.format(**vocab_models)), source="r.yaml")
    with pytest.raises(
        ValueError,
        match=r"r.yaml: the models have different vocabulary sizes: .*b \(130\).*"
        r"a \(128\).*tokenizer_source: union",
    ):
        build_plan(recipe, source="r.yaml")


def test_tokenizer_section_force_zero_pad_and_byte_identity(vocab_models, tmp_path):
    """`tokens:` (a forced model source, kind: zero, a new token) and pad_to_multiple_of against mergekit; the
    gathered merge is byte-identical across chunk sizes and worker counts."""
    from transformers import AutoTokenizer

    text = TA.format(**vocab_models) + (
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
        f"    <tool>:\n      source: {vocab_models['c']}\n      force: true\n"
        "    <img>:\n      source: {kind: zero}\n"
        f"    <new>:\n      source: {{kind: model_token, model: {vocab_models['b']}, token: w9}}\n"
    )
    (tmp_path / "r.yaml").write_text(text)
    _mergekit(text, tmp_path / "mk")
    outs = []
    for i, (chunk, workers) in enumerate([(0.001, 0), (64, 0), (0.002, 2)]):
        run_merge(
            tmp_path / "r.yaml", tmp_path / f"sm{i}", workers=workers, shard_size="30KB", chunk_mb=chunk, progress=False
        )
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"sm{i}").glob("*.safetensors"))})
    assert outs[0] == outs[1] == outs[2]
    ours, theirs = _tensors(tmp_path / "sm0"), _tensors(tmp_path / "mk")
    tok, mk_tok = AutoTokenizer.from_pretrained(tmp_path / "sm0"), AutoTokenizer.from_pretrained(tmp_path / "mk")
    assert set(tok.get_vocab()) == set(mk_tok.get_vocab()) and len(tok) == 132
    order = sorted(tok.get_vocab())
    assert ours["model.embed_tokens.weight"].shape[0] == theirs["model.embed_tokens.weight"].shape[0] == 136
    pad_o = {n: ours[n][132:] for n in VOCAB_TENSORS}
    pad_t = {n: theirs[n][132:] for n in VOCAB_TENSORS}
    _close(
        _by_token(ours, tok, order) | {f"{n}.pad": pad_o[n] for n in VOCAB_TENSORS},
        _by_token(theirs, mk_tok, order) | {f"{n}.pad": pad_t[n] for n in VOCAB_TENSORS},
        "tokens",
    )
    emb = ours["model.embed_tokens.weight"]
    b_emb = _tensors(vocab_models["b"])["model.embed_tokens.weight"]
    assert torch.equal(emb[tok.convert_tokens_to_ids("<new>")], b_emb[9])  # every input took b's row of w9
    c_emb = _tensors(vocab_models["c"])["model.embed_tokens.weight"]
    c_tok = AutoTokenizer.from_pretrained(vocab_models["c"])
    assert torch.equal(emb[tok.convert_tokens_to_ids("<tool>")], c_emb[c_tok.convert_tokens_to_ids("<tool>")])
    import json

    assert json.loads((tmp_path / "sm0" / "config.json").read_text())["vocab_size"] == 136


CONV = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": " hello "},
    {"role": "user", "content": "bye"},
]


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama3", "mistral", "auto"])
def test_named_chat_templates_render_like_mergekit(name, vocab_models, tmp_path):
    import importlib.resources

    from mergekit._data import chat_templates
    from transformers import AutoTokenizer

    text = TA.format(**vocab_models) + f"tokenizer_source: union\nchat_template: {name}\n"
    (tmp_path / "r.yaml").write_text(text)
    run_merge(tmp_path / "r.yaml", tmp_path / "sm", workers=0, shard_size="30KB", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "sm")
    if name == "auto":  # every input ships the tiny tokenizer's template
        want = AutoTokenizer.from_pretrained(vocab_models["a"]).chat_template.strip()
        assert tok.chat_template == want
        return
    ref = importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()
    for gen in (True, False):
        got = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=gen)
        assert got == tok.apply_chat_template(CONV, chat_template=ref, tokenize=False, add_generation_prompt=gen)
        assert name not in got or name == "chatml" and "im_start" in got


def test_unknown_chat_template_name_is_a_recipe_error(vocab_models):
    from shardmerge.engine.recipe.schema import parse_recipe

    with pytest.raises(ValueError, match=r"r.yaml: chat_template: 'chatmll' is not a template name \(auto, alpaca"):
        parse_recipe(
            {
                "merge_method": "linear",
                "models": [{"model": str(vocab_models["a"]), "parameters": {"weight": 1}}],
                "chat_template": "chatmll",
            },
            source="r.yaml",
        )
