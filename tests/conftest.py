"""Shared fixtures: tiny Llama-like checkpoints built locally (a base and fine-tuned experts), session-scoped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def llm_family(tmp_path_factory) -> dict[str, Path]:
    """base + three experts (float32, perturbed from base), sharded on disk."""
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("llm")
    out = {"base": build_llm(root / "base", seed=0)}
    for k in (1, 2, 3):
        out[f"e{k}"] = build_llm(root / f"e{k}", base=out["base"], perturb_seed=k)
    return out


@pytest.fixture(scope="session")
def llm_family_bf16(tmp_path_factory) -> dict[str, Path]:
    import torch

    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("llm_bf16")
    out = {"base": build_llm(root / "base", seed=5, dtype=torch.bfloat16)}
    for k in (1, 2):
        out[f"e{k}"] = build_llm(root / f"e{k}", base=out["base"], perturb_seed=10 + k, dtype=torch.bfloat16)
    return out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CONCERNS = ("unit", "kernels", "e2e", "cluster")  # tests/<concern>/ -> marker <concern>


def pytest_collection_modifyitems(config, items):
    """Every test is marked with its folder's concern (so `-m "not cluster"` works); tests marked `gpu` need CUDA:
    skipped (with the reason shown) where there is none, run where there is."""
    import torch

    here = Path(__file__).resolve().parent
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        concern = Path(str(item.fspath)).resolve().relative_to(here).parts[0]
        if concern not in CONCERNS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of tests/{{{','.join(CONCERNS)}}}/")
        item.add_marker(getattr(pytest.mark, concern))
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
