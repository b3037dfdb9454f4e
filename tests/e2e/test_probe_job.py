"""The probe job end to end: CLI, outputs, bad rows, attention focus, Ray data parallelism (1 vs 2 actors)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from shardmerge.engine.probe import actors, core, fixtures, prompting, readers, runner, scoring
from shardmerge.engine.probe.worker import ShardResult, WorkerSettings
from shardmerge.jobs import probe as probe_cli

NUM_LAYERS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from shardmerge.engine.tiny_models import build_mllm

    return build_mllm(tmp_path_factory.mktemp("m") / "llava", "llava", seed=5, num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    rows = fixtures.bench_rows(6)
    fixtures.write_ours(d / "ours.parquet", rows, row_group_size=2)
    bad = fixtures.bench_rows(3, seed=9, kinds=("choice",))
    bad[1]["answer"] = "Q"  # one bad row
    fixtures.write_tsv(d / "mmb.tsv", bad)
    return d


def test_cli_writes_parquet_json_png(model_dir, bench_dir, tmp_path):
    out = tmp_path / "out"
    rc = probe_cli.main(
        [
            "--model",
            str(model_dir),
            "--bench",
            str(bench_dir),
            "--out",
            str(out),
            "--local",
            "--metric",
            "logprob",
            "--attention",
            "--attention-sample",
            "q3",
            "--bootstrap",
            "200",
            "--pooling",
            "samples",
        ]
    )
    assert rc == 0
    table = pq.read_table(out / "probe.parquet")
    assert table.column_names == list(runner.COLUMNS)
    n_samples = 6 + 2
    assert table.num_rows == n_samples * (NUM_LAYERS + 1)
    keys = list(
        zip(table.column("benchmark").to_pylist(), table.column("row").to_pylist(), table.column("cut").to_pylist())
    )
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    summary = json.loads((out / "probe.json").read_text())
    assert summary["samples"] == n_samples and summary["num_layers"] == NUM_LAYERS
    assert summary["bad_rows"]["count"] == 1 and summary["bad_rows"]["rows"][0]["benchmark"] == "mmb"
    assert summary["cuts"] == list(range(NUM_LAYERS + 1)) and set(summary["benchmarks"]) == {"mmb", "ours"}
    assert summary["settings"]["worker"]["score"]["path"] == "fast"
    pooled = summary["pooled"]
    assert pooled["n_samples"] == n_samples and len(pooled["curve_ci"]) == NUM_LAYERS + 1
    logprob = table.to_pydict()
    for c in range(NUM_LAYERS + 1):
        vals = [v for v, cc in zip(logprob["gold_logprob"], logprob["cut"]) if cc == c]
        assert pooled["curve"][c] == pytest.approx(sum(vals) / len(vals), rel=1e-9)
    from PIL import Image

    with Image.open(out / "probe.png") as img:
        assert img.format == "PNG" and img.size[0] > 600
    focus = json.loads((out / "focus.json").read_text())
    assert focus["heatmap"]["sample"] == "q3" and (out / focus["heatmap"]["file"]).is_file()
    assert pq.read_table(out / "focus.parquet").num_rows == n_samples * NUM_LAYERS


def test_rows_match_a_direct_score(model_dir, bench_dir, tmp_path):
    """A parquet row is exactly what score_sample computes for that sample (no mix-ups in gathering)."""
    job = runner.ProbeJob(
        benches=(str(bench_dir / "ours.parquet"),),
        out=str(tmp_path / "o"),
        worker=WorkerSettings(model=str(model_dir)),
        use_ray=False,
        n_boot=20,
    )
    runner.run_probe(job)
    table = pq.read_table(tmp_path / "o" / "probe.parquet").to_pylist()
    shard = [s for s in readers.plan_shards([bench_dir / "ours.parquet"]) if s.start <= 4 < s.stop][0]
    sample = [s for s in readers.read_shard(shard).samples if s.row == 4][0]
    prompter = prompting.Prompter(model_dir)
    model = prompting.load_model(model_dir, dtype=torch.float32)
    direct = scoring.score_sample(model, core.install(model), prompter, sample, scoring.ScoreSettings())
    got = [r for r in table if r["row"] == 4]
    assert [r["cut"] for r in got] == [r["cut"] for r in direct]
    for g, d in zip(got, direct):
        for key, value in d.items():
            assert g[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


@pytest.mark.slow
def test_one_and_two_ray_actors_write_the_same_parquet(model_dir, bench_dir, tmp_path, monkeypatch):
    """Also with a stale `ray start` cluster file on the machine: the probe starts a fresh local Ray anyway (a
    plain ray.init(num_cpus=...) would try to join the dead cluster and fail)."""
    import tempfile

    import ray

    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live below it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # a cluster that no longer runs
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    outs = []
    for workers in (1, 2):  # each run starts (and stops) its own local Ray, as `shardmerge probe` does
        out = tmp_path / f"w{workers}"
        job = runner.ProbeJob(
            benches=(str(bench_dir),),
            out=str(out),
            workers=workers,
            rows_per_shard=2,
            worker=WorkerSettings(model=str(model_dir), device="cpu", threads=1),
            n_boot=50,
        )
        summary = runner.run_probe(job)
        assert summary["settings"]["workers"] == workers and not ray.is_initialized()
        outs.append((pq.read_table(out / "probe.parquet"), summary))
    (t1, s1), (t2, s2) = outs
    assert t1.num_rows == 8 * (NUM_LAYERS + 1)
    assert t1.equals(t2)
    assert s1["pooled"] == s2["pooled"] and s1["bad_rows"] == s2["bad_rows"]
    per = [s1["benchmarks"][b]["curve"] for b in sorted(s1["benchmarks"])]  # default: macro pooling
    assert s1["settings"]["pooling"] == "macro"
    assert s1["pooled"]["curve"] == pytest.approx([sum(v) / len(per) for v in zip(*per)], rel=1e-12)


def test_actor_options_and_device_resolution():
    assert actors.actor_options("cuda") == {"num_cpus": 1.0, "num_gpus": 1, "max_restarts": 0}
    assert actors.actor_options("cpu", cpus_per_actor=2) == {"num_cpus": 2, "num_gpus": 0, "max_restarts": 0}
    with pytest.raises(ValueError, match="resolve"):
        actors.actor_options("auto")
    assert actors.resolve_device("auto", 0) == "cpu" and actors.resolve_device("auto", 4) == "cuda"
    with pytest.raises(ValueError, match="no GPU"):
        actors.resolve_device("cuda", 0)
    assert actors.num_actors(4, 2) == 2 and actors.num_actors(2, 10) == 2
    with pytest.raises(ValueError):
        actors.num_actors(0, 3)


def test_every_shard_accounted_exactly_once():
    shards = [readers.Shard("b", "p", "ours", i, i + 1, i) for i in range(3)]
    res = [ShardResult(i, [], [], [], None, 0.0) for i in (2, 0, 1)]
    assert [r.index for r in actors.collect(res, shards)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="twice"):
        actors.collect(res + [res[0]], shards)
    with pytest.raises(RuntimeError, match="missing"):
        actors.collect(res[:2], shards)


def test_cli_arguments():
    assert probe_cli.parse_cuts("all") is None
    assert probe_cli.parse_cuts("4,0,8") == (0, 4, 8)
    assert probe_cli.parse_cuts("0:10:4") == (0, 4, 8)
    with pytest.raises(ValueError, match="--cuts"):
        probe_cli.parse_cuts("a,b")
    args = probe_cli.build_parser().parse_args(
        [
            "--model",
            "m",
            "--bench",
            "a",
            "--bench",
            "b",
            "--out",
            "o",
            "--workers",
            "3",
            "--metric",
            "kl",
            "--cuts",
            "0:4",
        ]
    )
    job = probe_cli.job_from_args(args)
    assert job.benches == ("a", "b") and job.workers == 3 and job.metric == "kl"
    assert job.worker.score.cuts == (0, 1, 2, 3) and job.worker.device == "auto" and job.use_ray


def test_cli_reports_bad_input(tmp_path, capsys):
    rc = probe_cli.main(
        ["--model", "m", "--bench", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o"), "--local"]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_bench_probe_smoke_and_predicted_ratio(tmp_path, capsys):
    from shardmerge.jobs import bench_probe

    assert bench_probe.predicted_ratio(4, range(5), 0.5) == pytest.approx(1 + 0.5 * (4 + 3 + 2 + 1) / 4)
    assert bench_probe.predicted_ratio(4, [4], 0.5) == 1.0
    out = tmp_path / "b.json"
    rc = bench_probe.main(
        [
            "--layers",
            "2",
            "--hidden",
            "32",
            "--grid",
            "4x4",
            "--samples",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json-out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["cuts"] == 3 and result["fast_ratio"] > 0 and result["exact_ratio"] > 0
    assert result["samples"][0]["image_tokens"] == 4
