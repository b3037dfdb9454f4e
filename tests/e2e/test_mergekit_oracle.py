"""mergekit 0.1.5 as the oracle, end to end: the same recipe on the same tiny checkpoints through `mergekit-yaml` and
through shardmerge; every tensor must agree within 1e-3 relative (ties: magnitude ties are absent in random data)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from shardmerge.jobs.merge import run_merge
from tests.e2e.test_merge_e2e import RECIPES

pytestmark = pytest.mark.slow  # over ~10 s a file: outside the fast suite (README)

ORACLE = ["linear", "task_arithmetic", "ties", "slerp", "breadcrumbs", "breadcrumbs_ties"]


def _load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


@pytest.mark.parametrize("method", ORACLE)
def test_matches_mergekit(method, llm_family, tmp_path):
    text = RECIPES[method].format(**{k: str(v) for k, v in llm_family.items()}) + "dtype: float32\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    r = subprocess.run(
        ["mergekit-yaml", str(recipe), str(tmp_path / "mk"), "--lazy-unpickle"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    run_merge(recipe, tmp_path / "sm", workers=0, shard_size="30KB", chunk_mb=0.003, progress=False)
    ours, theirs = _load(tmp_path / "sm"), _load(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        o = ours[name].float()
        err = (o - t.float()).abs().max() / t.float().abs().max().clamp_min(1e-12)
        assert err <= 1e-3, f"{method}: {name}: relative max error {err:.2e}"
