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
    # the PlaM step's probe is informative: the image matters (m(L) well above m(0)), no warning, nothing forced,
    # and the merged layers are the probe's plateau c*..L-1, after at least one cut that still needs the image
    curve = result["probe_curve"]
    assert curve[-1] - curve[0] >= 0.3, curve
    assert result["probe_warnings"] == [] and result["probe_forced_past"] == []
    c = result["probe_plateau_start"]
    assert c is not None and 0 < c < len(curve) - 1 and result["plam_layers"] == [c, len(curve) - 2]
    assert result["plam_training"]["train_accuracy_after"] > result["plam_training"]["train_accuracy_before"]
