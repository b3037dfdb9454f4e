"""Two Ray nodes that share no directory merge s3:// -> s3://: the inputs and the output live only in a local
S3-compatible server (moto, shardmerge.jobs.s3_local); each node stages its units in its own local directory;
the shards equal those of the local merge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

RECIPE = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 0.5}}\n  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
)


def test_two_nodes_without_a_shared_directory_merge_s3_to_s3(tmp_path, monkeypatch):
    import ray
    import ray._common.utils as common_utils
    import ray._private.utils as private_utils
    from ray.cluster_utils import Cluster

    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.tiny_models import build_llm
    from shardmerge.jobs.s3_local import LocalS3

    local = tmp_path / "local"
    base = build_llm(local / "base", seed=6, num_hidden_layers=4, tokenizer=False)
    models = {
        "base": base,
        "e1": build_llm(local / "e1", base=base, perturb_seed=1, tokenizer=False),
        "e2": build_llm(local / "e2", base=base, perturb_seed=2, tokenizer=False),
    }
    (tmp_path / "local.yaml").write_text(RECIPE.format(**models))
    execute(
        build_plan(load_recipe(tmp_path / "local.yaml"), shard_size="40KB"), tmp_path / "ref", workers=0, progress=False
    )
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").glob("model-*.safetensors")}

    with LocalS3() as s3:
        urls = {k: s3.upload_dir(v, "models", f"c/{k}") for k, v in models.items()}
        s3.client().create_bucket(Bucket="outputs")
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        (tmp_path / "s3.yaml").write_text(RECIPE.format(**urls))
        plan = build_plan(load_recipe(tmp_path / "s3.yaml"), shard_size="40KB")
        assert all(str(i).startswith("s3://") for i in plan.inputs)
        if ray.is_initialized():
            ray.shutdown()
        monkeypatch.setattr(private_utils, "write_ray_address", lambda *a, **k: None)
        monkeypatch.setattr(common_utils, "reset_ray_address", lambda *a, **k: None)
        stages = [tmp_path / f"node{i}-local-disk" for i in (1, 2)]
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            for d in stages:  # each node's own disk: staging and cache dirs that no other node sees
                c.add_node(num_cpus=1, env_vars={"SHARDMERGE_STAGE_DIR": str(d), "SHARDMERGE_CACHE": str(d / "cache")})
            c.wait_for_nodes()
            ray.init(address=c.address, log_to_driver=False)
            monkeypatch.setenv("SHARDMERGE_FAULT", "sleep:0.3")  # slow units, so both nodes' workers get some
            s = execute(plan, "s3://outputs/cluster", workers=2, chunk_bytes=4096, progress=False)
        finally:
            ray.shutdown()
            c.shutdown()
        assert len(s["units_by_node"]) == 2 and sum(s["units_by_node"].values()) == len(plan.units)
        assert all(d.is_dir() and not any(p.is_file() for p in d.iterdir()) for d in stages)  # staged, then freed
        c3 = s3.client()
        got = {
            Path(o["Key"]).name: c3.get_object(Bucket="outputs", Key=o["Key"])["Body"].read()
            for o in c3.list_objects_v2(Bucket="outputs", Prefix="cluster/")["Contents"]
        }
        assert {k: v for k, v in got.items() if k.startswith("model-")} == ref
        assert "shardmerge_manifest.json" in got
        from shardmerge.engine.verify import verify_dir

        assert verify_dir("s3://outputs/cluster") == []
        assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint


def test_worker_that_cannot_reach_an_object_store_input_fails_clearly(tmp_path, monkeypatch):
    from dataclasses import replace

    import ray

    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.tiny_models import build_llm
    from shardmerge.jobs.s3_local import LocalS3

    base = build_llm(tmp_path / "base", seed=6, num_hidden_layers=2, tokenizer=False)
    e1 = build_llm(tmp_path / "e1", base=base, perturb_seed=1, tokenizer=False)
    (tmp_path / "r.yaml").write_text(
        RECIPE.replace("  - model: {e2}\n    parameters: {{weight: 0.5}}\n", "").format(base=base, e1=e1)
    )
    plan = build_plan(load_recipe(tmp_path / "r.yaml"), shard_size="40KB")
    with LocalS3() as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            bad = replace(plan, inputs=plan.inputs + ("s3://no-such-bucket/models/e2",))
            with pytest.raises(
                RuntimeError,
                match=r"cannot read the input s3://no-such-bucket/models/e2: .*bucket 'no-such-bucket' does not exist",
            ):
                execute(bad, tmp_path / "out", workers=1, progress=False)
        finally:
            ray.shutdown()
