"""`shardmerge demo` end to end, as README's first set-up command runs it (tiny models, embedded Ray)."""

from __future__ import annotations

import json
import math

from shardmerge.jobs.demo import human_summary, main


def test_demo_runs_and_reports_every_part(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # --json: stdout is the JSON summary alone (steps go to stderr)
    assert result["verified"] and result["logits_finite"] and result["shards"] > 1
    assert result["pivot_verified"] and result["plam_verified"]
    lam = result["pivot_lambda_per_layer"]
    assert set(lam) == {"linear_1", "linear_2"}
    assert all(len(v) == 3 and math.isclose(sum(v), 1.0, abs_tol=2e-3) for v in lam.values())
    assert (tmp_path / "pivot" / "merged" / "pivot_calibration.json").is_file()
    text = human_summary(result, True, 12.0)  # the default (human) summary names every part's output and layers
    for line in (result["merged_dir"], result["pivot_merged_dir"], result["plam_merged_dir"], "layers 2..3"):
        assert line in text, text
