"""`shardmerge demo` end to end, as README's first set-up command runs it (tiny models, embedded Ray)."""

from __future__ import annotations

import json
import math

import pytest

from shardmerge.jobs.demo import human_summary, main

pytestmark = pytest.mark.slow  # over ~10 s a file: outside the fast suite (README)


def test_demo_runs_and_reports_every_part(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # --json: stdout is the JSON summary alone (steps go to stderr)
    assert result["verified"] and result["logits_finite"] and result["shards"] > 1
    assert result["pivot_verified"] and result["plam_verified"]
    lam = result["pivot_lambda_per_layer"]
    assert set(lam) == {"linear_1", "linear_2"}
    assert all(len(v) == 3 and math.isclose(sum(v), 1.0, abs_tol=2e-3) for v in lam.values())
    assert (tmp_path / "pivot" / "merged" / "pivot_calibration.json").is_file()
    # the PlaM step's probe is informative: the image matters (m(L) well above m(0)), no warning, nothing forced,
    # and the merged layers are the probe's plateau c*..L-1, after at least one cut that still needs the image
    curve = result["probe_curve"]
    assert curve[-1] - curve[0] >= 0.3, curve
    assert result["probe_warnings"] == [] and result["probe_forced_past"] == []
    c = result["probe_plateau_start"]
    assert c is not None and 0 < c < len(curve) - 1 and result["plam_layers"] == [c, len(curve) - 2]
    assert result["plam_training"]["train_accuracy_after"] > result["plam_training"]["train_accuracy_before"]
    text = human_summary(result, True, 12.0)  # the default (human) summary names every part's output and layers
    for line in (
        result["merged_dir"],
        result["pivot_merged_dir"],
        result["plam_merged_dir"],
        f"layers {result['plam_layers'][0]}..{result['plam_layers'][1]}",
    ):
        assert line in text, text
