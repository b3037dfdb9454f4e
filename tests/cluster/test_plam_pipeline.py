"""`shardmerge plam` end to end on tiny local models: probe -> plateau -> PlaM merge -> verify (-> re-probe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from shardmerge.engine.probe.fixtures import bench_rows, write_ours
    from shardmerge.engine.tiny_models import build_base_llm, build_mllm

    root = tmp_path_factory.mktemp("plam")
    mllm = build_mllm(root / "mllm", "qwen2_5_vl", seed=0, num_layers=4)
    base = build_base_llm(root / "base", "qwen2_5_vl", seed=1, from_mllm=mllm)
    bench = write_ours(root / "bench.parquet", bench_rows(6, seed=0, kinds=("choice", "yesno")))
    return root, mllm, base, bench


def _plam(*extra, root, mllm, base, bench, out, cwd=None):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "shardmerge.jobs.cli",
            "plam",
            "--mllm",
            str(mllm),
            "--base",
            str(base),
            "--bench",
            str(bench),
            "--out",
            str(out),
            "--workers",
            "1",
            "--device",
            "cpu",
            "--shard-size",
            "200KB",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


def test_plam_pipeline_end_to_end(setup):
    root, mllm, base, bench = setup
    out = root / "run"
    r = _plam("--layers", "2", "3", "--reprobe", "--force", root=root, mllm=mllm, base=base, bench=bench, out=out)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "plam_summary.json").read_text())
    assert summary["verified"] and summary["layers"] == [2, 3]
    for f in (
        "probe/probe.png",
        "probe/probe.json",
        "probe/probe.parquet",
        "probe_merged/probe.png",
        "merged/shardmerge_manifest.json",
        "plam.yaml",
    ):
        assert (out / f).exists(), f
    from shardmerge.engine.verify import verify_dir

    assert verify_dir(out / "merged") == []
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").state_dict()
    orig = AutoModelForImageTextToText.from_pretrained(mllm).state_dict()
    changed = sorted(n for n in orig if not torch.equal(orig[n], merged[n]))
    assert changed and all(".layers.2." in n or ".layers.3." in n for n in changed), changed[:5]
    assert all(any(p in n for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)


def test_summary_names_the_layers_and_the_recipe_reruns_from_elsewhere(setup, tmp_path, monkeypatch):
    """Run with paths relative to the working directory: the summary names the merged layers (from the plan) and
    the plateau, and plam.yaml holds absolute paths, so `shardmerge merge plam.yaml` re-runs it from another
    directory, byte-identically."""
    root, mllm, base, bench = setup
    rel = {k: os.path.relpath(v, root) for k, v in (("mllm", mllm), ("base", base), ("bench", bench))}
    r = _plam("--layers", "1", "2", "--force", "--json", root=root, out="rel_run", cwd=root, **rel)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # --json: the summary alone on stdout
    assert summary["layers"] == [1, 2] and summary["layers_from"] == "--layers"
    assert set(summary["plateau"]) == {"start", "interval", "probe"} and os.path.isabs(summary["plateau"]["probe"])
    assert "Traceback" not in r.stderr and "] probing" in r.stderr and "] merging (merged)" in r.stderr
    out = root / "rel_run"
    assert json.loads((out / "plam_summary.json").read_text())["layers"] == [1, 2]
    import yaml

    recipe = yaml.safe_load((out / "plam.yaml").read_text())
    assert recipe["mllm"] == str(mllm.resolve()) and recipe["base_llm"] == str(base.resolve())
    from shardmerge.jobs.merge import main as merge_main

    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    assert merge_main([str(out / "plam.yaml"), "--out", "again", "--workers", "0", "--shard-size", "200KB", "-q"]) == 0
    shards = sorted(p.name for p in (out / "merged").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "again").glob("*.safetensors"))
    assert all((out / "merged" / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in shards)


def test_no_plateau_is_an_error_naming_the_fix(setup):
    """Random tiny weights ignore the image: the probe finds no plateau, and plam refuses to guess layers."""
    root, mllm, base, bench = setup
    out = root / "noplateau"
    r = _plam(root=root, mllm=mllm, base=base, bench=bench, out=out)
    assert r.returncode == 2
    assert "found no plateau" in r.stderr and "--layers" in r.stderr
    assert (out / "probe" / "probe.png").exists() and not (out / "merged").exists()


def test_uninformative_probe_stops_before_the_merge(setup):
    """The random tiny MLLM ignores the image: the probe warns that vision is not needed, so no merge without
    --force, even when the layers are given."""
    root, mllm, base, bench = setup
    out = root / "refused"
    r = _plam("--layers", "2", "3", root=root, mllm=mllm, base=base, bench=bench, out=out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not informative" in r.stderr and "does not need vision" in r.stderr and "--force" in r.stderr
    assert (out / "probe" / "probe.json").exists() and not (out / "merged").exists()


@pytest.mark.slow  # three merges and four probes, each a subprocess-started Ray job
def test_weights_control_and_holdout_evaluation(setup):
    """--weights 0.9,0.3 merges the unnormalised form, the control rescales the MLLM by 1.2, and --holdout probes
    and evaluates disjoint question groups."""
    from safetensors.torch import load_file

    root, mllm, base, bench = setup
    out = root / "weights"
    r = _plam(
        "--layers",
        "2",
        "3",
        "--weights",
        "0.9,0.3",
        "--holdout",
        "0.5",
        "--force",
        root=root,
        mllm=mllm,
        base=base,
        bench=bench,
        out=out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "plam_summary.json").read_text())
    assert s["weights"] == [0.9, 0.3] and s["control"]["scale"] == pytest.approx(1.2) and s["forced_past"]
    ev = s["evaluation"]
    assert set(ev["models"]) == {"mllm", "merged", "control"} and ev["split"].startswith("seeded")
    probed = {
        r["row"]
        for r in __import__("pyarrow.parquet", fromlist=["x"]).read_table(out / "probe" / "probe.parquet").to_pylist()
    }
    held = {
        r["row"]
        for r in __import__("pyarrow.parquet", fromlist=["x"])
        .read_table(out / "eval_mllm" / "probe.parquet")
        .to_pylist()
    }
    assert probed and held and not probed & held and len(probed | held) == 6

    def tensors(d):
        out_ = {}
        for f in sorted(d.glob("*.safetensors")):
            out_.update(load_file(f))
        return out_

    m, b, merged, control = (tensors(d) for d in (mllm, base, out / "merged", out / "control"))
    name = next(n for n in merged if ".layers.2.self_attn.q_proj.weight" in n)
    base_name = next(n for n in b if n.endswith("layers.2.self_attn.q_proj.weight"))
    torch.testing.assert_close(merged[name].float(), 0.9 * m[name].float() + 0.3 * b[base_name].float())
    torch.testing.assert_close(control[name].float(), 1.2 * m[name].float())
