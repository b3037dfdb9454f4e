"""Malformed and ambiguous inputs beyond tests/e2e/test_hardening.py's matrix: config.json and index files of the
wrong JSON types, non-UTF-8 files, symlink loops, ambiguous shards (a tensor twice, holes, trailing bytes, shards
the index does not list), configs that disagree with their tensors, and hostile recipes (alias bombs, recursive
aliases, deep nesting, integers no float holds, object tags). Each refusal is one ValueError naming the file and
the field or tensor, exit 2 from the CLI with one line, and no manifest; each accepted oddity is a warning note."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from shardmerge.engine.io.writer import MANIFEST
from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe
from shardmerge.jobs.merge import main as merge_main
from shardmerge.jobs.merge import run_merge

TA = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
)
DARE = (
    "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: W1, density: D1}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5, density: 0.5}}\nparameters: {{random_seed: SEED}}\n"
)
SHARD = "30KB"
BOMB = "  l0: &l0 lol\n" + "".join(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))


def _recipe(tmp: Path, fam: dict, text: str = TA, **swap) -> Path:
    path = tmp / "r.yaml"
    path.write_text(text.format(**{k: str(v) for k, v in {**fam, **swap}.items()}))
    return path


def _refused(recipe: Path, tmp: Path, names: list[str], capsys) -> None:
    out = tmp / "out"
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.002, progress=False)
    assert time.monotonic() - t0 < 30
    for name in names:
        assert name in str(info.value), (name, str(info.value))
    capsys.readouterr()
    assert merge_main([str(recipe), "--out", str(tmp / "out_cli"), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardmerge merge: error: ") and err.count("\n") == 1, err
    assert all(n in err for n in names) and "Traceback" not in err, err
    assert not list(tmp.rglob(MANIFEST))


def _bad(fam: dict, tmp: Path, key: str = "e2") -> Path:
    return Path(shutil.copytree(fam[key], tmp / "bad"))


def _edit_config(d: Path, edit) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(edit(cfg)))
    return d / "config.json"


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


# ------------------------------------------------------------------------------------------------ config.json
CONFIG_ROWS = {
    "config_is_a_list": (lambda c: [c], ["config.json must be a JSON object, got a list"]),
    "model_type_is_a_list": (lambda c: dict(c, model_type=["llama"]), ["'model_type' must be a string"]),
    "architectures_is_an_int": (lambda c: dict(c, architectures=7), ["'architectures' must be a list, got int 7"]),
    "architectures_holds_an_int": (lambda c: dict(c, architectures=[7]), ["'architectures' must be a list of str"]),
    "text_config_is_a_string": (lambda c: dict(c, text_config="x"), ["'text_config' must be an object"]),
    "num_hidden_layers_is_a_string": (
        lambda c: dict(c, num_hidden_layers="2"),
        ["'num_hidden_layers' must be an integer"],
    ),
    "config_says_fewer_layers": (
        lambda c: dict(c, num_hidden_layers=c["num_hidden_layers"] - 1),
        ["config says", "extra layers"],
    ),
}


@pytest.mark.parametrize("row", sorted(CONFIG_ROWS))
def test_config_json_of_the_wrong_shape(row, llm_family, tmp_path, capsys):
    edit, names = CONFIG_ROWS[row]
    bad = _bad(llm_family, tmp_path)  # an expert, not the reference model: every input's config is checked
    cfg = _edit_config(bad, edit)
    _refused(
        _recipe(tmp_path, llm_family, e2=bad),
        tmp_path,
        [str(bad), *names] if "layers" in row else [str(cfg), *names],
        capsys,
    )


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_file_that_is_not_utf8(name, llm_family, tmp_path, capsys):
    bad = _bad(llm_family, tmp_path)
    (bad / name).write_bytes(b'{"model_type": "ll\xe9ama"}')
    _refused(_recipe(tmp_path, llm_family, e2=bad), tmp_path, [str(bad / name), "not UTF-8", "0xe9"], capsys)


def test_index_of_the_wrong_shape(llm_family, tmp_path, capsys):
    bad = _bad(llm_family, tmp_path)
    (bad / "model.safetensors.index.json").write_text("[1, 2]")
    _refused(
        _recipe(tmp_path, llm_family, e2=bad),
        tmp_path,
        [str(bad / "model.safetensors.index.json"), "must be a JSON object"],
        capsys,
    )


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_symlink_loop_is_refused_not_skipped(name, llm_family, tmp_path, capsys):
    bad = _bad(llm_family, tmp_path, "base")  # the base: its tokenizer files are the ones copied
    (bad / name).unlink()
    (bad / name).symlink_to(bad / name)
    _refused(_recipe(tmp_path, llm_family, base=bad), tmp_path, [str(bad / name), "symlink loop"], capsys)


# ------------------------------------------------------------------------------------------------ shards
def test_tensor_in_two_shards(llm_family, tmp_path, capsys):
    bad = _bad(llm_family, tmp_path)
    first, second = _shards(bad)[:2]
    h1, d1 = _header(first)
    h2, d2 = _header(second)
    name = next(n for n in h1 if n != "__metadata__")
    b, e = h1[name]["data_offsets"]
    h2[name] = dict(h1[name], data_offsets=[len(d2), len(d2) + e - b])
    _write(second, h2, d2 + d1[b:e])
    _refused(_recipe(tmp_path, llm_family, e2=bad), tmp_path, [str(second), str(first), repr(name)], capsys)


@pytest.mark.parametrize("where", ["hole", "trailing"])
def test_bytes_no_tensor_names(where, llm_family, tmp_path, capsys):
    bad = _bad(llm_family, tmp_path)
    shard = _shards(bad)[0]
    header, data = _header(shard)
    if where == "trailing":
        _write(shard, header, data + b"\0" * 16)
        names = ["16 trailing byte(s) after the last tensor"]
    else:
        first = min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
        for n, entry in header.items():
            if n != "__metadata__" and n != first:
                entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
        end = header[first]["data_offsets"][1]
        _write(shard, header, data[:end] + b"\0" * 8 + data[end:])
        names = ["8 byte(s) after tensor " + repr(first), "a hole"]
    _refused(_recipe(tmp_path, llm_family, e2=bad), tmp_path, [str(shard), *names], capsys)


def test_shard_the_index_does_not_list_is_a_warning(llm_family, tmp_path):
    bad = _bad(llm_family, tmp_path)
    shutil.copy(_shards(bad)[0], bad / "model-00001-of-00009.safetensors")  # a leftover of an earlier save
    s = run_merge(_recipe(tmp_path, llm_family, e2=bad), tmp_path / "out", workers=0, shard_size=SHARD, progress=False)
    assert s["verified"] and any(
        "model-00001-of-00009.safetensors not listed" in n and str(bad) in n for n in s["notes"]
    ), s.get("notes")


def test_model_dir_without_config_is_a_warning(llm_family, tmp_path):
    bad = _bad(llm_family, tmp_path)
    (bad / "config.json").unlink()
    plan = build_plan(load_recipe(_recipe(tmp_path, llm_family, e2=bad)), shard_size=SHARD)
    assert any(f"{bad} has no config.json" in n for n in plan.notes), plan.notes


# ------------------------------------------------------------------------------------------------ recipes
def _text_row(text: str, *names):
    return lambda fam, tmp: (_recipe(tmp, fam, text), list(names))


RECIPE_ROWS = {
    "alias_bomb_in_a_parameter": _text_row(
        "bomb:\n" + BOMB + TA.replace("{{weight: 0.5}}\n  - model: {e2}", "{{weight: *l9}}\n  - model: {e2}"),
        "alias bomb",
    ),
    "alias_bomb_in_a_filter": _text_row(
        "bomb:\n"
        + BOMB
        + TA.replace("{{weight: 0.5}}\n  - model: {e2}", "{{weight: [{{filter: *l9, value: 1}}]}}\n  - model: {e2}"),
        "alias bomb",
    ),
    "recursive_alias": _text_row(TA + "parameters: &p {{normalize: *p}}\n", "recursive YAML alias"),
    "nested_too_deep": _text_row(TA + "parameters: {{lambda: " + "[" * 1500 + "]" * 1500 + "}}\n", "nested more"),
    "python_object_tag": _text_row(
        TA + "parameters: !!python/object/apply:os.system [echo hi]\n",
        "YAML tag !!python/object/apply:os.system",
        "is not allowed",
    ),
    "huge_weight": _text_row(
        TA.replace("{{weight: 0.5}}\n  - model: {e2}", "{{weight: 1" + "0" * 400 + "}}\n  - model: {e2}"),
        "models[0].parameters.weight",
        "out of range",
    ),
    "huge_density": _text_row(
        DARE.replace("W1", "0.5").replace("D1", "9" * 320).replace("SEED", "0"),
        "models[0].parameters.density",
        "out of range",
    ),
    "huge_random_seed": _text_row(
        DARE.replace("W1", "0.5").replace("D1", "0.5").replace("SEED", "7" * 330),
        "parameters.random_seed",
        "out of range",
    ),
    "integer_of_5000_digits": _text_row(TA + "parameters: {{lambda: " + "1" * 5000 + "}}\n", "not valid YAML"),
    "float_overflow_to_inf": _text_row(
        TA.replace("{{weight: 0.5}}\n  - model: {e2}", "{{weight: 1.0e999}}\n  - model: {e2}"),
        "models[0].parameters.weight",
        "finite",
    ),
}


@pytest.mark.parametrize("row", sorted(RECIPE_ROWS))
def test_hostile_recipe_is_refused_quickly(row, llm_family, tmp_path, capsys):
    recipe, names = RECIPE_ROWS[row](llm_family, tmp_path)
    _refused(recipe, tmp_path, [str(recipe), *names], capsys)
    assert not any(n.endswith("^)") for n in names)


def test_tag_message_has_no_caret_snippet(llm_family, tmp_path):
    recipe, _ = RECIPE_ROWS["python_object_tag"](llm_family, tmp_path)
    with pytest.raises(ValueError) as info:
        load_recipe(recipe)
    assert "^" not in str(info.value) and "\n" not in str(info.value) and "(line " in str(info.value)


def test_recipe_that_is_not_utf8(llm_family, tmp_path, capsys):
    recipe = _recipe(tmp_path, llm_family)
    recipe.write_bytes(recipe.read_bytes() + b"# caf\xe9\n")
    _refused(recipe, tmp_path, [str(recipe), "not UTF-8"], capsys)


def test_yaml_1_1_exponent_spelling_is_a_number(llm_family, tmp_path):
    """`5.0e-1`, `5e-1` and `1.0e38` mean numbers (YAML 1.2); YAML 1.1 would leave them strings."""
    plain = load_recipe(_recipe(tmp_path, llm_family))
    for spelling in ("5.0e-1", "5e-1", "0.5E+0", ".5e0"):
        r = load_recipe(
            _recipe(
                tmp_path,
                llm_family,
                TA.replace("weight: 0.5}}\n  - model: {e2}", f"weight: {spelling}}}}}\n  - model: {{e2}}"),
            )
        )
        assert r.models[0].parameters["weight"] == 0.5 and r.hash() == plain.hash(), spelling
    big = load_recipe(
        _recipe(tmp_path, llm_family, TA.replace("weight: 0.5}}\n  - model: {e2}", "weight: 1.0e38}}\n  - model: {e2}"))
    )
    assert big.models[0].parameters["weight"] == 1.0e38
    from shardmerge.engine.io.loaders import load_yaml_file

    (tmp_path / "s.yaml").write_text("a: 1e3x\nb: 1e3\nc: e3\n")
    assert load_yaml_file(tmp_path / "s.yaml") == {"a": "1e3x", "b": 1000.0, "c": "e3"}  # only whole numbers


def test_recipe_size_is_bounded(llm_family, tmp_path, capsys, monkeypatch):
    import shardmerge.engine.io.loaders

    monkeypatch.setattr(shardmerge.engine.io.loaders, "MAX_RECIPE_BYTES", 1000)
    recipe = _recipe(tmp_path, llm_family, TA + "#" * 2000 + "\n")
    _refused(recipe, tmp_path, [str(recipe), "more than the 1000"], capsys)
    assert os.path.getsize(recipe) > 1000
