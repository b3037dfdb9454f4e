"""`--out` can never destroy an input: it may not be, contain or lie inside an input model's directory (after
resolving symlinks), nor hold the recipe or a file the recipe reads; `--overwrite` removes only what an earlier
shardmerge run owns and says what it removed. Every case checks that every input byte is unchanged afterwards."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from shardmerge.engine.io.output_dir import check_not_an_input
from shardmerge.engine.io.shard_files import STATE_DIR
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe
from shardmerge.jobs.merge import main as merge_main
from shardmerge.jobs.merge import run_merge

TA = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
)
SHARD = "30KB"


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture
def fam(llm_family, tmp_path) -> dict:
    """A private copy of the tiny family (these tests aim merges at it) and a recipe in a dir of its own."""
    models = {k: Path(shutil.copytree(llm_family[k], tmp_path / "models" / k)) for k in ("base", "e1", "e2")}
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(TA.format(**models))
    return {**models, "recipe": recipe, "root": tmp_path}


def _merge(recipe: Path, out: Path, **kw) -> dict:
    return run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.002, progress=False, **kw)


def _refused(fam: dict, out: Path, names: list[str], capsys, flags=("--overwrite",)) -> None:
    """Refused through run_merge and the CLI (one line, exit 2), naming `names`; no input byte changes."""
    before = _snapshot(fam["base"], fam["e1"], fam["e2"], fam["recipe"].parent)
    for kw in ({"overwrite": True}, {}):
        with pytest.raises(ValueError) as info:
            _merge(fam["recipe"], out, **kw)
        assert all(n in str(info.value) for n in names), str(info.value)
        assert _snapshot(fam["base"], fam["e1"], fam["e2"], fam["recipe"].parent) == before
    capsys.readouterr()
    argv = [str(fam["recipe"]), "--out", str(out), "--workers", "0", "--shard-size", SHARD, "--no-progress"]
    assert merge_main(argv + list(flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardmerge merge: error: ") and err.count("\n") == 1 and names[0] in err, err
    assert _snapshot(fam["base"], fam["e1"], fam["e2"], fam["recipe"].parent) == before
    assert not list(Path(fam["root"]).rglob(MANIFEST))


def test_out_is_an_input(fam, capsys):
    _refused(fam, fam["e2"], [f"is the input directory {fam['e2']}"], capsys)


def test_out_inside_an_input(fam, capsys):
    _refused(fam, fam["e1"] / "merged", [f"lies inside the input directory {fam['e1']}"], capsys)
    assert not (fam["e1"] / "merged").exists()  # not even created


def test_out_is_the_parent_of_an_input(fam, capsys):
    _refused(fam, fam["base"].parent, ["contains the input directory", str(fam["base"].parent)], capsys)


def test_out_is_an_input_through_a_symlink(fam, capsys):
    link = fam["root"] / "link"
    link.symlink_to(fam["base"], target_is_directory=True)
    _refused(fam, link, [f"is the input directory {fam['base']}"], capsys)
    assert link.is_symlink() and link.resolve() == fam["base"].resolve()


def test_out_holds_the_recipe(fam, capsys):
    _refused(fam, fam["recipe"].parent, ["contains the recipe file", str(fam["recipe"])], capsys)


def test_out_holds_a_calibration_file_the_recipe_reads(fam, tmp_path):
    """An earlier merge's pivot_calibration.json used as the calibration of this one: --overwrite of that output
    would delete it (checked on the plan; the rule is the same for every file the recipe reads)."""
    from shardmerge.engine.recipe.schema import CalibrationRecipe

    old = tmp_path / "old_out"
    old.mkdir()
    (old / "pivot_calibration.json").write_text("{}")
    plan = build_plan(load_recipe(fam["recipe"]), shard_size=SHARD, source=str(fam["recipe"]))
    recipe = plan.recipe.model_copy(update={"calibration": CalibrationRecipe(path=str(old / "pivot_calibration.json"))})
    with pytest.raises(ValueError, match=r"contains the calibration file .*pivot_calibration.json"):
        check_not_an_input(dataclasses.replace(plan, recipe=recipe), old)
    check_not_an_input(dataclasses.replace(plan, recipe=recipe), tmp_path / "elsewhere")  # any other dir is fine


def test_overwrite_refuses_a_plain_model_dir(fam, llm_family, capsys):
    """A model dir that is not an input of this recipe (no manifest, no journal): nothing in it is ours."""
    other = Path(shutil.copytree(llm_family["e3"], fam["root"] / "e3"))
    before = _snapshot(other)
    with pytest.raises(ValueError, match="no earlier shardmerge merge wrote .*config.json"):
        _merge(fam["recipe"], other, overwrite=True)
    assert _snapshot(other) == before


def test_overwrite_removes_only_what_the_previous_merge_owns(fam, caplog):
    out = fam["root"] / "out"
    _merge(fam["recipe"], out)
    listed = json.loads((out / MANIFEST).read_text())
    owned = {MANIFEST, *listed["files"], *(s["file"] for s in listed["shards"])}
    assert {p.name for p in out.iterdir()} <= owned
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):  # a file we did not write: nothing is deleted
        _merge(fam["recipe"], out, overwrite=True)
    assert (out / MANIFEST).exists() and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    first = _snapshot(out)
    with caplog.at_level(logging.INFO, logger="shardmerge.output"):
        s = _merge(fam["recipe"], out, overwrite=True)
    assert set(s["removed"]) == {p.name for p in map(Path, first)}
    assert any("--overwrite: removed" in r.getMessage() and str(out) in r.getMessage() for r in caplog.records)
    assert _snapshot(out) == first  # the same merge again, byte for byte


def test_overwrite_of_an_unfinished_merge(fam, monkeypatch):
    """Killed in the metadata step: the journal lists the metadata files, so --overwrite removes them too."""
    import shardmerge.engine.io.shard_files as writer  # the filesystem store writes through it

    out = fam["root"] / "out"
    real = writer.atomic_write

    def fail_on_card(path, data):
        if Path(path).name == "README.md":
            raise writer.WriteFailed(f"{path}: write failed (simulated)")
        real(path, data)

    monkeypatch.setattr(writer, "atomic_write", fail_on_card)
    with pytest.raises(writer.WriteFailed):
        _merge(fam["recipe"], out)
    monkeypatch.undo()
    assert (out / STATE_DIR).is_dir() and (out / "config.json").exists() and not (out / MANIFEST).exists()
    s = _merge(fam["recipe"], out, overwrite=True)
    assert {"config.json", STATE_DIR} <= set(s["removed"]) and (out / MANIFEST).exists()


def test_overwrite_ignores_names_outside_the_dir_in_a_damaged_manifest(fam):
    out = fam["root"] / "out"
    _merge(fam["recipe"], out)
    doc = json.loads((out / MANIFEST).read_text())
    doc["files"].append("../models/e2/config.json")
    doc["shards"].append({"file": str(fam["e1"] / "config.json"), "sha256": "", "size": 0})
    (out / MANIFEST).write_text(json.dumps(doc))
    before = _snapshot(fam["e1"], fam["e2"])
    _merge(fam["recipe"], out, overwrite=True)
    assert _snapshot(fam["e1"], fam["e2"]) == before
