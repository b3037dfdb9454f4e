"""Multi-node: a 3-raylet local cluster (ray.cluster_utils.Cluster). The per-worker memory budget allows one worker
per node, so the pool spreads over every node and every node merges units; one node is removed mid-merge, its
units are re-run on the survivors (its replacement cannot be placed, which must not stall the pool) and the output
is byte-identical to the in-process merge."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
GB = 10**9
NODE_MEMORY = int(1.4 * GB)  # Ray `memory` resource of each node
BUDGET = int(1.0 * GB)  # --max-memory-per-worker: one worker per node fits, two do not


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("model-*.safetensors"))}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("cluster")  # one machine: every raylet sees it, as a shared filesystem would
    base = build_llm(root / "base", seed=6, num_hidden_layers=10, tokenizer=False)
    e1 = build_llm(root / "e1", base=base, perturb_seed=1, tokenizer=False)
    e2 = build_llm(root / "e2", base=base, perturb_seed=2, tokenizer=False)
    (root / "r.yaml").write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {e1}\n    parameters: {{weight: 0.5}}\n  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
    )
    plan = build_plan(load_recipe(root / "r.yaml"), shard_size="40KB")
    execute(plan, root / "ref", workers=0, progress=False)
    return {"root": root, "plan": plan, "ref": _shards(root / "ref")}


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 worker raylets. The machine-wide 'current cluster' address file is left alone (Cluster would make
    ours the default of every `ray.init()` on this shared machine, and delete another session's on shutdown)."""
    import ray
    import ray._common.utils as common_utils
    import ray._private.utils as private_utils
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    mp = pytest.MonkeyPatch()
    mp.setattr(private_utils, "write_ray_address", lambda *a, **k: None)
    mp.setattr(common_utils, "reset_ray_address", lambda *a, **k: None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "memory": NODE_MEMORY})
    try:
        nodes = [c.add_node(num_cpus=2, memory=NODE_MEMORY) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()


def _journal_nodes(out: Path) -> tuple[dict[str, set], int]:
    """node id -> the workers that reported units from it, and the number of units reported so far."""
    from shardmerge.engine.io.shard_files import Journal

    by_node: dict[str, set] = {}
    units = 0
    for r in Journal(out).records():
        if "unit" in r:
            by_node.setdefault(r["node"], set()).add(r["worker"])
            units += 1
    return by_node, units


@pytest.mark.slow
def test_units_spread_over_every_node_and_survive_node_loss(cluster, family, tmp_path, monkeypatch):
    import ray

    from shardmerge.engine.run.executor import execute

    c, workers_nodes = cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    out, plan, seen, removed = tmp_path / "out", family["plan"], [], []

    def remove_a_node_once_all_have_worked() -> None:
        """Node loss: as soon as every node has merged a unit, kill one worker node's raylet and processes."""
        import time

        t0 = time.monotonic()
        while time.monotonic() - t0 < 180 and not removed:
            by_node, units = _journal_nodes(out) if out.exists() else ({}, 0)
            if len(by_node) == 3:
                seen.append(by_node)
                victim = next(n for n in workers_nodes if n.node_id in by_node)
                c.remove_node(victim)
                removed.append((victim.node_id, units))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_a_node_once_all_have_worked, daemon=True)
    killer.start()
    monkeypatch.setenv("SHARDMERGE_FAULT", "sleep:1.2")
    s = execute(plan, out, workers=3, chunk_bytes=4096, progress=False, memory_per_worker=BUDGET)
    killer.join(timeout=5)
    assert removed, "the node was never removed: not every node got a unit"
    assert set(s["units_by_node"]) == set(seen[0])  # units ran on all three nodes
    assert all(len(workers) == 1 for workers in seen[0].values())  # the memory budget: one worker per node
    assert s["replaced_workers"] >= 1  # the removed node's worker (its replacement does not fit anywhere)
    assert removed[0][1] < len(plan.units)  # removed mid-merge
    assert sum(s["units_by_node"].values()) == len(plan.units)
    assert _shards(out) == family["ref"]


def _launcher_config(raw: dict) -> dict:
    """What `ray up` does with a cluster config before using it: fill defaults, merge commands, validate."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_passes_ray_launcher_validation():
    import re

    import yaml

    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "cluster.yaml").read_text())
    cfg = _launcher_config(raw)
    types = cfg["available_node_types"]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6")) for t in workers)  # GPU nodes
    assert cfg["file_mounts"]["~/shardmerge"] == "."
    for cmds in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):  # after merge_setup_commands
        text = "\n".join(cmds)
        assert 'pip install -e "$HOME/shardmerge' in text and "/shared" in text and "mount -t nfs4" in text
        pin = re.search(r"ray\[default\]==(\d+)\.(\d+)\.(\d+)", text)
        assert pin and (2, 30) <= (int(pin[1]), int(pin[2])) < (3, 0)  # within pyproject's ray range
    import jsonschema

    broken = dict(raw, available_node_types={"head": dict(raw["available_node_types"]["head"], gpus=8)})
    with pytest.raises(jsonschema.ValidationError, match="gpus"):  # the validation can fail: unknown key
        _launcher_config(broken)
