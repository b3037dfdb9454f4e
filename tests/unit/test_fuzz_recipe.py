"""Fuzz recipes (seeded, 600 cases, planning only, in-process): every mutated recipe either plans or fails with one
clear ValueError; nothing else escapes (no TypeError, OverflowError, RecursionError, KeyError, yaml errors, ...) and
no case runs longer than its time limit (an alias bomb or a runaway validation would).

Cases start from valid recipes of several methods over the tiny models and are mutated structurally (values
swapped for hostile ones, keys dropped, added or misspelt, values wrapped in lists, filters and deep nesting) and
textually (alias bombs, recursive aliases, object tags, truncation, bytes that are not UTF-8, tabs, duplicate keys).
"""

from __future__ import annotations

import random
import signal
from contextlib import contextmanager

import pytest
import yaml

from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe

CASES, SEED, LIMIT_S = 600, 20261202, 10.0
HOSTILE = [
    0,
    -1,
    1,
    0.5,
    1.5,
    -0.0,
    10**400,
    -(10**330),
    2**63,
    1e308,
    "1.0e38",
    "5e-1",
    ".inf",
    ".nan",
    "",
    None,
    True,
    "heavy",
    [],
    {},
    [0.1, 0.9],
    [[1]],
    {"filter": "mlp", "value": 0.5},
    [{"filter": 3, "value": "x"}],
    {"mllm": 1, "base": 2},
    "x" * 300,
    "ünïcødé",
    "../../etc",
    "/nonexistent/model",
    "org/model",
    "a/b/c",
    {"value": {"value": 1}},
    7.0,
    -3,
    "base",
    "bfloat16",
    "float8",
]
KEYS = [
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    "modules",
    "mllm",
    "base_llm",
    "init_model",
    "calibration",
    "weight",
    "density",
    "lambda",
    "normalize",
    "t",
    "random_seed",
    "rescale",
    "gamma",
    "filter",
    "value",
    "model",
    "source",
    "bogus",
]
TEXT_MUTATIONS = ["bomb", "recursive", "tag", "truncate", "bytes", "tab", "duplicate", "deep", "anchor"] + ["none"] * 4


def _seeds(fam: dict) -> list[dict]:
    b, e1, e2 = (str(fam[k]) for k in ("base", "e1", "e2"))
    models = [
        {"model": e1, "parameters": {"weight": 0.5, "density": 0.6}},
        {
            "model": e2,
            "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]},
        },
    ]
    return [
        {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": [dict(m, parameters={"weight": 0.5}) for m in models],
        },
        {"merge_method": "ties", "base_model": b, "models": models, "parameters": {"normalize": True}},
        {"merge_method": "dare_ties", "base_model": b, "models": models, "parameters": {"random_seed": 3}},
        {
            "merge_method": "linear",
            "models": [{"model": e1, "parameters": {"weight": 1.0}}, {"model": e2, "parameters": {"weight": 2.0}}],
            "dtype": "float16",
        },
        {
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": b}, {"model": e1}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
        },
        {"merge_method": "breadcrumbs_ties", "base_model": b, "models": models, "parameters": {"gamma": 0.01}},
    ]


def _containers(node, out):
    if isinstance(node, (dict, list)):
        out.append(node)
        for v in node.values() if isinstance(node, dict) else node:
            _containers(v, out)
    return out


def _mutate(rng: random.Random, data: dict) -> dict:
    for _ in range(rng.choice([0, 1, 1, 2, 3])):  # 0: a valid recipe, so the success side is exercised too
        c = rng.choice(_containers(data, []))
        op = rng.randrange(5)
        if isinstance(c, dict):
            key = rng.choice(list(c) or KEYS)
            if op == 0 and c:
                c.pop(key, None)
            elif op == 1:
                c[rng.choice(KEYS)] = rng.choice(HOSTILE)
            elif op == 2:
                c[key] = (
                    [c.get(key)]
                    if rng.random() < 0.5
                    else {"filter": rng.choice(["mlp", "", "*"]), "value": c.get(key)}
                )
            else:
                c[key] = rng.choice(HOSTILE)
        elif c:
            i = rng.randrange(len(c))
            c[i] = rng.choice(HOSTILE) if op < 3 else (c[i] if op == 3 else [c[i]] * rng.randint(0, 3))
        else:
            c.append(rng.choice(HOSTILE))
    return data


def _text(rng: random.Random, data: dict) -> bytes:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    kind = rng.choice(TEXT_MUTATIONS)
    if kind == "bomb":
        bomb = "l0: &l0 [lol]\n" + "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))
        text = bomb + text.replace("0.5", "*l8", 1)
    elif kind == "recursive":
        text += "parameters: &p {weight: *p}\n"
    elif kind == "tag":
        tag = rng.choice(
            [
                "!!python/object:os.system",
                "!!python/name:os.system",
                "!!binary",
                "!!set",
                "!!omap",
                "!!timestamp",
                "!custom",
                "!!float",
                "!!int",
                "!!str",
            ]
        )
        text = text.replace(": 0.5", f": {tag} 0.5", 1)
    elif kind == "truncate":
        text = text[: rng.randrange(len(text) + 1)]
    elif kind == "bytes":
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = rng.choice([0x80, 0xFF, 0xC3, 0x00, 0x1B])
        return bytes(raw)
    elif kind == "tab":
        text = text.replace("  ", "\t", 1)
    elif kind == "duplicate":
        text += text.splitlines()[0] + "\n"
    elif kind == "deep":
        n = rng.choice([10, 70, 2000])
        text += "extra: " + "[" * n + "]" * n + "\n"
    elif kind == "anchor":
        text = text.replace("models:", "models: &m", 1) + "modules: {vision_tower: {merge_method: *m}}\n"
    return text.encode()


class _TimeLimit(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    def fire(signum, frame):
        raise _TimeLimit()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_fuzzed_recipes_plan_or_fail_clearly(llm_family, tmp_path):
    import copy

    rng = random.Random(SEED)
    seeds = _seeds(llm_family)
    tally = {"planned": 0, "refused": 0}
    for case in range(CASES):
        path = tmp_path / f"r{case:04d}.yaml"
        path.write_bytes(_text(rng, _mutate(rng, copy.deepcopy(rng.choice(seeds)))))
        try:
            with _time_limit(LIMIT_S):
                build_plan(load_recipe(path), shard_size="30KB", source=str(path))
            tally["planned"] += 1
        except _TimeLimit:
            pytest.fail(f"case {case}: ran past {LIMIT_S} s\n{path.read_bytes()[:2000]!r}")
        except ValueError as exc:
            msg = str(exc)
            assert msg and "Traceback" not in msg and len(msg) < 4000, (case, msg[:500])
            tally["refused"] += 1
        except Exception as exc:
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{path.read_bytes()[:2000]!r}")
    print(tally)
    assert tally["planned"] >= CASES // 20 and tally["refused"] >= CASES // 2, tally  # both sides exercised
