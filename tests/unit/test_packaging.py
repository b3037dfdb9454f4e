"""What installing shardmerge adds to an environment, and how a source checkout runs without installing.

The repository root is the `shardmerge` package: every listed package lives under it, the list in pyproject.toml
is the source tree's (a package missing from it would silently not be installed), and a checkout started as
`python -m jobs.<name>` binds itself as `shardmerge` and ships that same code to Ray workers."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_packages_listed_are_the_source_tree():
    conf = _setuptools()
    assert conf["package-dir"] == {"shardmerge": "."}
    on_disk = {"shardmerge"} | {
        "shardmerge." + ".".join(init.parent.relative_to(REPO).parts)
        for top in ("engine", "kernels", "jobs")
        for init in (REPO / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(conf["packages"]) == on_disk
    assert all(p == "shardmerge" or p.startswith("shardmerge.") for p in conf["packages"])


def test_installed_distribution_adds_one_top_level_name():
    top = importlib.metadata.distribution("shardmerge").read_text("top_level.txt")
    assert top is not None and top.split() == ["shardmerge"]
    scripts = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "shardmerge"]
    assert [e.value for e in scripts] == ["shardmerge.jobs.cli:main"]


def test_checkout_binds_itself_as_shardmerge_and_stages_its_code(tmp_path):
    code = (
        "import jobs, shardmerge, shardmerge.engine.run.ray_session as rs; "
        "print(shardmerge.__file__); print(shardmerge.CHECKOUT); "
        "print(rs._runtime_env(embedded=True)['py_modules'][0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    init, checkout, staged = run.stdout.split()
    assert Path(init) == REPO / "__init__.py" and Path(checkout) == REPO
    staged = Path(staged)
    assert staged.name == "shardmerge" and staged.is_relative_to(tmp_path)
    for rel in ("__init__.py", "engine/plan/build.py", "kernels/interpolate.py", "jobs/merge.py"):
        assert (staged / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert not list(staged.rglob("__pycache__"))
