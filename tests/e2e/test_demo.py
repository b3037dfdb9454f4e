"""`shardmerge demo` end to end, as README's first set-up command runs it (tiny models, embedded Ray)."""

from __future__ import annotations

import json
import math

from shardmerge.jobs.demo import main


def test_demo_runs_and_reports_every_part(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("[demo] done:") + len("[demo] done:") :])
    assert result["verified"] and result["logits_finite"] and result["shards"] > 1
    assert result["pivot_verified"] and result["plam_verified"]
    lam = result["pivot_lambda_per_layer"]
    assert set(lam) == {"linear_1", "linear_2"}
    assert all(len(v) == 3 and math.isclose(sum(v), 1.0, abs_tol=2e-3) for v in lam.values())
    assert (tmp_path / "pivot" / "merged" / "pivot_calibration.json").is_file()
