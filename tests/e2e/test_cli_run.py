"""The CLI as a user drives it, in this process (no Ray): a real SIGTERM / SIGINT mid-merge gives the one resume
line and 143 / 130, the resumed run reports a rate over the bytes it merged itself, its summaries say what
happened; probe and plam stop the same way on a signal."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest

import shardmerge.engine.run.executor as executor
from shardmerge.engine.io.output_dir import SUMMARY
from shardmerge.engine.io.shard_files import Journal
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.jobs import merge, plam, probe

TA = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.7}}\n"
)
ARGS = ["--workers", "0", "--shard-size", "30KB", "--chunk-mb", "0.002"]
MiB = 2**20


@pytest.fixture()
def recipe(llm_family, tmp_path) -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(TA.format(**llm_family))
    return r


def _slow_units(monkeypatch, seconds: float) -> list:
    """Each in-process unit takes `seconds` longer; returns the list the finished unit ids go to."""
    done, real = [], executor.run_unit

    def slow(unit, *a, **k):
        time.sleep(seconds)
        res = real(unit, *a, **k)
        done.append(unit.id)
        return res

    monkeypatch.setattr(executor, "run_unit", slow)
    return done


def _signal_after(done: list, n: int, sig: int) -> threading.Thread:
    """Send `sig` to this process once `n` units are done (as `kill` or Ctrl-C would)."""

    def fire():
        deadline = time.monotonic() + 120
        while len(done) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_merge_then_resume_reports_this_runs_rate(sig, recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    done = _slow_units(monkeypatch, 0.2)
    t = _signal_after(done, 2, sig)
    assert merge.main([str(recipe), "--out", str(out), *ARGS]) == 128 + sig
    t.join()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert line.startswith(f"shardmerge merge: interrupted by {name}; the unfinished merge in {out}"), line
    assert not (out / MANIFEST).exists() and not (out / SUMMARY).exists()
    kept = [r["unit"] for r in Journal(out).records() if "unit" in r]
    assert len(kept) >= 2

    monkeypatch.undo()  # the resumed run at full speed
    cmd = shlex.split(line.split("Continue it with: ", 1)[1])
    assert cmd[:2] == ["shardmerge", "merge"] and cmd[-1] == "--resume"
    assert merge.main(cmd[2:]) == 0
    cap = capsys.readouterr()
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["reused_units"] == len(kept) and summary["units_run"] == summary["units"] - len(kept)
    assert 0 < summary["bytes_run"] < summary["bytes"]
    # the rate of the final progress line is this run's bytes over this run's merging time
    last = [ln for ln in cap.err.splitlines() if ln.startswith("merge: ")][-1]
    value, unit = re.search(r"([\d.]+) (B|KiB|MiB|GiB)/s", last).groups()
    shown = float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert shown == pytest.approx(summary["bytes_run"] / summary["merge_seconds"], rel=0.01), (
        last
    )  # shown with 3 digits
    assert re.search(rf"merging: {summary['units_run']} work units, .*; {len(kept)} already done", cap.err), cap.err
    for phase in ("planning", "merging", "writing metadata", "verifying"):
        assert f"] {phase}" in cap.err, cap.err
    # the human summary on stdout
    for text in (
        f"merged     {out}",
        "method     task_arithmetic of 3 model(s)",
        "verified   yes",
        f"{len(kept)} reused",
    ):
        assert text in cap.out, cap.out
    assert f"shardmerge verify {out}" in cap.out


def test_tiny_merge_json_summary_and_file(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    assert merge.main([str(recipe), "--out", str(out), *ARGS, "--json"]) == 0
    cap = capsys.readouterr()
    printed = json.loads(cap.out)  # --json: stdout is the JSON summary alone
    written = json.loads((out / SUMMARY).read_text())
    assert printed["out"] == written["out"] == str(out.resolve()) and printed["method"] == "task_arithmetic"
    assert printed["verified"] is True and len(printed["models"]) == 3 and printed["bytes_run"] == printed["bytes"]
    last = [ln for ln in cap.err.splitlines() if ln.startswith("merge: ")][-1]
    assert "0.00" not in last and re.search(r"[\d.]+ (KiB|MiB|GiB)/s", last), last
    # the summary file is the merge's: --overwrite removes it with the rest, verify does not mind it
    assert merge.main([str(recipe), "--out", str(out), *ARGS, "--overwrite", "-q"]) == 0
    assert "shardmerge_summary.json" in capsys.readouterr().out
    from shardmerge.jobs import verify

    assert verify.main([str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"dir": str(out), "ok": True, "hashes": True, "problems": []}


def test_quiet_prints_no_progress(recipe, tmp_path, capsys):
    assert merge.main([str(recipe), "--out", str(tmp_path / "o"), *ARGS, "-q"]) == 0
    assert capsys.readouterr().err == ""


def _sleep_then_signal(sig):
    def body(*a, **k):
        threading.Timer(0.2, os.kill, (os.getpid(), sig)).start()
        time.sleep(30)
        raise AssertionError("the signal did not stop the command")

    return body


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_probe_stops_on_a_signal_with_one_line(sig, tmp_path, capsys, monkeypatch):
    import shardmerge.engine.probe.runner as runner

    monkeypatch.setattr(runner, "run_probe", _sleep_then_signal(sig))
    argv = ["--model", "m", "--bench", "b.parquet", "--out", str(tmp_path / "p"), "--workers", "0", "--limit", "4"]
    assert probe.main(argv) == 128 + sig
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("shardmerge probe: interrupted by SIG"), line
    assert str(tmp_path / "p") in line
    cmd = shlex.split(line.split("Continue it with: ", 1)[1])
    assert vars(probe.build_parser().parse_args(cmd[2:])) == vars(probe.build_parser().parse_args(argv))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_plam_stops_on_a_signal_with_one_line(sig, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plam, "run_plam", _sleep_then_signal(sig))
    argv = ["--mllm", "m", "--base", "b", "--bench", "x", "--out", str(tmp_path / "o"), "--layers", "1", "2"]
    assert plam.main([*argv, "--workers", "0"]) == 128 + sig
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("shardmerge plam: interrupted by SIG"), line
    cmd = shlex.split(line.split("Continue it with: ", 1)[1])
    assert cmd[:2] == ["shardmerge", "plam"] and cmd[cmd.index("--layers") + 1 : cmd.index("--layers") + 3] == [
        "1",
        "2",
    ]


def test_plam_recipe_from_the_plateau_is_absolute_and_names_its_layers(tmp_path, monkeypatch):
    """Without --layers the recipe points at the probe's result by absolute path, and the layers reported are
    the ones the plan merges: c* .. L-1."""
    import yaml

    from shardmerge.engine.tiny_models import build_base_llm, build_mllm

    mllm = build_mllm(tmp_path / "mllm", "qwen2_5_vl", seed=0, num_layers=4)
    build_base_llm(tmp_path / "base", "qwen2_5_vl", seed=1, from_mllm=mllm)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "probe").mkdir(parents=True)
    probe_json = Path("run") / "probe" / "probe.json"  # relative, as plam's --out often is
    probe_json.write_text(
        json.dumps({"model": "m", "metric": "accuracy", "num_layers": 4, "cuts": list(range(5)), "plateau_start": 1})
    )
    args = plam.build_parser().parse_args(["--mllm", "mllm", "--base", "base", "--bench", "b", "--out", "run"])
    recipe = plam._recipe(args, probe_json)
    assert recipe["mllm"] == str(tmp_path / "mllm") and recipe["base_llm"] == str(tmp_path / "base")
    assert recipe["parameters"]["plateau"] == str(tmp_path / "run" / "probe" / "probe.json")
    path = tmp_path / "run" / "plam.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path / "run")  # another working directory: the recipe still plans
    assert plam.layer_range(plam.merged_layers(path)) == [1, 3]
    with pytest.raises(RuntimeError, match="not one contiguous range"):
        plam.layer_range([1, 3])
    assert plam._model_ref("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"  # a hub id stays
