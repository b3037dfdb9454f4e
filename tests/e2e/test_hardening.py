"""The bad-input and fault matrix, walked through the public `run_merge` and CLI path: every row asserts the exact
error class, that the message names the file and the tensor (or the field), and that no manifest marks an output
complete. Also: disk full, read-only output, the on-disk states a kill leaves behind, and the security rows (no
pickle code, no remote code, symlinks confined). The 20-trial SIGKILL sweep is tests/cluster/test_kill_resume.py; the
header fuzz test is tests/unit/test_fuzz_header.py."""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import shutil
import struct
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardmerge.engine.io.shard_files import WriteFailed, partial_path
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.engine.plan.build import build_plan
from shardmerge.engine.recipe.schema import load_recipe
from shardmerge.engine.verify import verify_dir
from shardmerge.jobs.merge import main as merge_main
from shardmerge.jobs.merge import run_merge

REPO = Path(__file__).resolve().parents[2]
TA = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
)
SHARD = "30KB"  # the tiny models' merge spans 3 output shards
FLAGS = {"--allow-nonfinite": "allow_nonfinite", "--resume": "resume", "--overwrite": "overwrite"}


# ------------------------------------------------------------------------------------------------ helpers
def _recipe(path: Path, fam: dict, text: str = TA, **swap) -> Path:
    path.write_text(text.format(**{k: str(v) for k, v in {**fam, **swap}.items()}))
    return path


def _merge(recipe: Path, out: Path, *flags: str, **kw) -> dict:
    opts = {FLAGS[f]: True for f in flags}
    return run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.002, progress=False, **opts, **kw)


def _cli(recipe: Path, out: Path, *flags: str) -> int:
    return merge_main(
        [
            str(recipe),
            "--out",
            str(out),
            "--workers",
            "0",
            "--shard-size",
            SHARD,
            "--chunk-mb",
            "0.002",
            "--no-progress",
            *flags,
        ]
    )


def _manifests(out: Path) -> list[Path]:
    return sorted(out.rglob(MANIFEST)) if out.exists() else []


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, weight_map: dict) -> None:
    idx = _index(d)
    (d / "model.safetensors.index.json").write_text(json.dumps(dict(idx, weight_map=weight_map)))


def _shard_of(d: Path, tensor: str) -> Path:
    return d / _index(d)["weight_map"][tensor]


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: dict | bytes, data: bytes, hlen: int | None = None) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if hlen is None else hlen) + body + data)


def _single_file(d: Path, edit) -> Path:
    """Rewrite a model dir's weights as one model.safetensors through `edit(state_dict) -> state_dict`."""
    sd = {}
    for f in sorted(set(_index(d)["weight_map"].values())):
        sd.update(load_file(d / f))
        (d / f).unlink()
    (d / "model.safetensors.index.json").unlink()
    save_file(edit(sd), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _set(name: str, fn):
    return lambda sd: {**sd, name: fn(sd[name].clone())}


@dataclass
class Row:
    """One matrix row: (recipe, flags) built in a fresh dir, the exact error class, what the message must name."""

    recipe: Path
    exc: type
    names: list[str]
    flags: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)


def _assert_refused(row: Row, tmp: Path, capsys, monkeypatch) -> None:
    for k, v in row.env.items():
        monkeypatch.setenv(k, v)
    out = tmp / "out"
    with pytest.raises(Exception) as info:
        _merge(row.recipe, out, *row.flags)
    assert type(info.value) is row.exc, f"{type(info.value).__name__}: {info.value}"
    for name in row.names:
        assert name in str(info.value), (name, str(info.value))
    assert _manifests(out) == []
    capsys.readouterr()
    assert _cli(row.recipe, tmp / "out_cli", *row.flags) == 2  # the CLI: one clear line, exit 2
    err = capsys.readouterr().err
    assert err.startswith("shardmerge merge: error: ") and err.count("\n") == 1, err
    assert all(name in err for name in row.names), err
    assert _manifests(tmp / "out_cli") == []


# ------------------------------------------------------------------------------------------------ input rows
def _truncated_shard(fam, tmp):
    bad = _copy(fam["e2"], tmp / "bad")
    shard = _shard_of(bad, "model.layers.1.mlp.up_proj.weight")
    header, _ = _header(shard)
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    os.truncate(shard, shard.stat().st_size - 100)
    return Row(_recipe(tmp / "r.yaml", fam, e2=bad), ValueError, [str(shard), repr(last), "truncated"])


def _header_row(fam, tmp, mutate, *names):
    bad = _copy(fam["e2"], tmp / "bad")
    shard = _shard_of(bad, "model.norm.weight")
    header, data = _header(shard)
    extra = mutate(shard, header, data)
    return Row(_recipe(tmp / "r.yaml", fam, e2=bad), ValueError, [str(shard), *names, *(extra or [])])


def _bad_json(shard, header, data):
    _write_raw(shard, b"{not json" + b" " * 7, data)


def _offsets_past_eof(shard, header, data):
    n = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [len(data), len(data) + n[1] - n[0]]
    _write_raw(shard, header, data)
    return ["'model.norm.weight'", "past the end"]


def _overlapping(shard, header, data):
    norm = header["model.norm.weight"]
    other = next(
        n for n, e in header.items() if n not in ("__metadata__", "model.norm.weight") and e["data_offsets"][0] == 0
    )
    norm["data_offsets"] = [0, norm["data_offsets"][1] - norm["data_offsets"][0]]  # inside the first tensor
    _write_raw(shard, header, data)
    return ["'model.norm.weight'", repr(other), "overlap"]


def _absurd_length(shard, header, data):
    _write_raw(shard, header, data, hlen=1 << 40)
    return ["header length 1099511627776"]


def _unsupported_dtype(shard, header, data):
    header["model.norm.weight"]["dtype"] = "U32"  # same 4 bytes per element; safetensors has it, we do not
    _write_raw(shard, header, data)
    return ["'model.norm.weight'", "dtype 'U32' is not supported"]


def _index_row(fam, tmp, edit, names_index=True):
    bad = _copy(fam["e2"], tmp / "bad")
    wm = _index(bad)["weight_map"]
    names = edit(bad, wm, tmp)
    _write_index(bad, wm)
    return Row(
        _recipe(tmp / "r.yaml", fam, e2=bad),
        ValueError,
        [str(bad / "model.safetensors.index.json")] * names_index + names,
    )


def _missing_file(bad, wm, tmp):
    wm["model.norm.weight"] = "model-00009-of-00009.safetensors"
    return ["'model-00009-of-00009.safetensors'", "'model.norm.weight'", "does not exist"]


def _dotdot(bad, wm, tmp):
    shutil.copy(bad / wm["model.norm.weight"], tmp / "x.safetensors")  # a real file: refused for where it is
    wm["model.norm.weight"] = "../x.safetensors"
    return ["'../x.safetensors'", "outside the model directory"]


def _absolute(bad, wm, tmp):
    shutil.copy(bad / wm["model.norm.weight"], tmp / "x.safetensors")
    wm["model.norm.weight"] = str(tmp / "x.safetensors")
    return [repr(str(tmp / "x.safetensors")), "absolute path"]


def _index_only(bad, wm, tmp):
    wm["model.ghost.weight"] = wm["model.norm.weight"]
    return ["'model.ghost.weight'", "does not contain it"]


def _shard_only(bad, wm, tmp):
    shard = wm.pop("model.norm.weight")
    return [str(bad / shard), "'model.norm.weight'", "does not list"]


def _variant_row(fam, tmp, edit, names, key="e2"):
    bad = _single_file(_copy(fam[key], tmp / "bad"), edit)
    return Row(_recipe(tmp / "r.yaml", fam, **{key: bad}), ValueError, [str(bad), *names])


def _float8(fam, tmp):
    """Quantized float8 weights would be copied from one model (a silent non-merge): refused, naming the file."""
    to_f8 = _set("model.norm.weight", lambda t: t.to(torch.float8_e4m3fn))
    swap = {k: _single_file(_copy(fam[k], tmp / k), to_f8) for k in ("base", "e1", "e2")}
    return Row(
        _recipe(tmp / "r.yaml", fam, **swap),
        ValueError,
        [str(swap["base"] / "model.safetensors"), "'model.norm.weight'", "F8_E4M3", "passthrough"],
    )


def _nonfinite_input(value):
    def build(fam, tmp):
        def poke(t):
            t[3, 5] = value
            return t

        bad = _single_file(_copy(fam["e2"], tmp / "bad"), _set("model.layers.1.mlp.up_proj.weight", poke))
        return Row(
            _recipe(tmp / "r.yaml", fam, e2=bad),
            ValueError,
            [
                str(bad / "model.safetensors"),
                "'model.layers.1.mlp.up_proj.weight'",
                "NaN/Inf",
                "first at row 3",
                "--allow-nonfinite",
            ],
        )

    return build


def _method_overflow(*flags):
    """Finite inputs near float32's max: the linear sum overflows. The method's failure is an error even with
    --allow-nonfinite (which only admits NaN/Inf that the inputs bring)."""

    def build(fam, tmp):
        big = _set("model.norm.weight", lambda t: t.fill_(2e38))
        e1, e2 = (_single_file(_copy(fam[k], tmp / k), big) for k in ("e1", "e2"))
        text = (
            "merge_method: linear\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1.0}}\n"
            "  - model: {e2}\n    parameters: {{weight: 1.0}}\n"
        )
        return Row(
            _recipe(tmp / "r.yaml", fam, text, e1=e1, e2=e2),
            RuntimeError,
            ["merge_method 'linear'", "'model.norm.weight'", "from finite inputs"],
            flags,
        )

    return build


def _architectures(fam, tmp):
    bad = _copy(fam["e2"], tmp / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    return Row(
        _recipe(tmp / "r.yaml", fam, e2=bad),
        ValueError,
        [str(bad), "architectures", "MistralForCausalLM", "LlamaForCausalLM"],
    )


def _empty_dir(fam, tmp):
    (tmp / "empty").mkdir()
    return Row(
        _recipe(tmp / "r.yaml", fam, e2=tmp / "empty"), ValueError, [str(tmp / "empty"), "model.safetensors.index.json"]
    )


def _typo(old: str, new: str, *names, text: str = TA):
    def build(fam, tmp):
        assert old in text
        r = _recipe(tmp / "r.yaml", fam, text.replace(old, new))
        return Row(r, ValueError, [str(r), *names])

    return build


TIES = TA.replace("task_arithmetic", "ties")
FIRST_WEIGHT = "{{weight: 0.5}}\n  - model: {e2}"  # the first model's parameters in TA / TIES


def _offline_hub(fam, tmp):
    text = TA.replace("  - model: {e2}\n", "  - model: someorg/not-cached\n")
    return Row(
        _recipe(tmp / "r.yaml", fam, text),
        ValueError,
        ["'someorg/not-cached'", "HF_HUB_OFFLINE"],
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")},
    )


INPUT_ROWS = {
    "truncated_shard": _truncated_shard,
    "header_bad_json": lambda f, t: _header_row(f, t, _bad_json, "header is not valid JSON"),
    "header_offsets_past_eof": lambda f, t: _header_row(f, t, _offsets_past_eof),
    "header_overlapping_ranges": lambda f, t: _header_row(f, t, _overlapping),
    "header_length_absurd": lambda f, t: _header_row(f, t, _absurd_length),
    "index_names_missing_file": lambda f, t: _index_row(f, t, _missing_file),
    "index_file_outside_dotdot": lambda f, t: _index_row(f, t, _dotdot),
    "index_file_absolute_path": lambda f, t: _index_row(f, t, _absolute),
    "tensor_in_index_not_in_shard": lambda f, t: _index_row(f, t, _index_only),
    "tensor_in_shard_not_in_index": lambda f, t: _index_row(f, t, _shard_only, names_index=False),
    "dtype_not_supported": lambda f, t: _header_row(f, t, _unsupported_dtype),
    "dtype_float8_not_mergeable": _float8,
    "shape_mismatch_between_experts": lambda f, t: _variant_row(
        f, t, _set("model.norm.weight", lambda x: torch.zeros(33)), ["'model.norm.weight'", "shape [33]"]
    ),
    "nan_in_input": _nonfinite_input(float("nan")),
    "inf_in_input": _nonfinite_input(float("inf")),
    "nonfinite_produced_by_method": _method_overflow(),
    "nonfinite_produced_by_method_allow_flag": _method_overflow("--allow-nonfinite"),
    "architectures_differ": _architectures,
    "empty_model_dir": _empty_dir,
    "recipe_unknown_method": _typo(
        "task_arithmetic", "task_arithmetik", "merge_method", "unknown merge_method 'task_arithmetik'"
    ),
    "recipe_unknown_key": _typo("base_model:", "base_modle:", "base_modle: unknown key"),
    "recipe_weight_not_a_number": _typo(
        FIRST_WEIGHT,
        "{{weight: heavy}}\n  - model: {e2}",
        "models[0].parameters.weight",
        "expected a number, got 'heavy'",
    ),
    "recipe_density_above_1": _typo(
        FIRST_WEIGHT,
        "{{weight: 0.5, density: 1.5}}\n  - model: {e2}",
        "models[0].parameters.density",
        "density must be in (0, 1], got 1.5",
        text=TIES,
    ),
    "recipe_density_zero": _typo(
        FIRST_WEIGHT,
        "{{weight: 0.5, density: 0}}\n  - model: {e2}",
        "models[0].parameters.density",
        "density must be in (0, 1], got 0",
        text=TIES,
    ),
    "hub_id_offline_not_cached": _offline_hub,
}


@pytest.mark.parametrize("row", sorted(INPUT_ROWS))
def test_bad_input_is_refused(row, llm_family, tmp_path, capsys, monkeypatch):
    _assert_refused(INPUT_ROWS[row](llm_family, tmp_path), tmp_path, capsys, monkeypatch)


def test_allow_nonfinite_merges_inputs_with_nan(llm_family, tmp_path):
    """The flag's other side: the NaN flows through to exactly its element; the rest is the closed form."""
    row = _nonfinite_input(float("nan"))(llm_family, tmp_path)
    s = _merge(row.recipe, tmp_path / "out", "--allow-nonfinite")
    assert s["verified"] and _manifests(tmp_path / "out") == [tmp_path / "out" / MANIFEST]
    name = "model.layers.1.mlp.up_proj.weight"
    got = {k: v for f in (tmp_path / "out").glob("model-*.safetensors") for k, v in load_file(f).items()}[name]
    base, e1 = (load_file(_shard_of(llm_family[k], name))[name] for k in ("base", "e1"))
    e2 = load_file(tmp_path / "bad" / "model.safetensors")[name]
    assert torch.isnan(got[3, 5]) and int(torch.isnan(got).sum()) == 1
    want = base + 0.5 * (e1 - base) + 0.5 * (e2 - base)
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[3, 5] = False
    torch.testing.assert_close(got[mask], want[mask], atol=1e-6, rtol=1e-5)  # float32 row of the dtype table


# ------------------------------------------------------------------------------------------------ output rows
@pytest.fixture(scope="module")
def clean(llm_family, tmp_path_factory) -> dict:
    """A finished merge of the TA recipe (the reference bytes), and a recipe that plans differently."""
    d = tmp_path_factory.mktemp("clean")
    r = _recipe(d / "r.yaml", llm_family)
    other = _recipe(d / "r2.yaml", llm_family, TA.replace(FIRST_WEIGHT, "{{weight: 0.4}}\n  - model: {e2}"))
    _merge(r, d / "out")
    plan = build_plan(load_recipe(r), shard_size=SHARD, source=str(r))
    return {"recipe": r, "other": other, "out": d / "out", "files": _files(d / "out"), "plan": plan}


def _full_after(budget: int):
    """os.pwrite that writes `budget` bytes in all (the last write short, as a filling disk does), then ENOSPC."""
    real, left = os.pwrite, [budget]

    def pwrite(fd, data, offset):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, data[: left[0]], offset)
        left[0] -= n
        return n

    return pwrite


def _unfinished(clean, out: Path, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", _full_after(clean["plan"].total_bytes // 2))
        with pytest.raises(WriteFailed):
            _merge(clean["recipe"], out)


def test_output_dir_with_a_different_finished_plan(clean, tmp_path, capsys):
    out = Path(shutil.copytree(clean["out"], tmp_path / "out"))
    for flags in ((), ("--resume",)):
        with pytest.raises(Exception) as info:
            _merge(clean["other"], out, *flags)
        assert type(info.value) is ValueError
        assert str(out) in str(info.value) and "different plan" in str(info.value) and "--overwrite" in str(info.value)
        assert _files(out) == clean["files"]  # untouched: its manifest still names the old plan only
        capsys.readouterr()
        assert _cli(clean["other"], out, *flags) == 2 and "different plan" in capsys.readouterr().err
    s = _merge(clean["other"], out, "--overwrite")
    assert json.loads((out / MANIFEST).read_text())["plan_hash"] == s["plan_hash"] != clean["plan"].plan_hash


@pytest.mark.parametrize("case", ["different_plan_resume", "unfinished_without_resume", "foreign_files"])
def test_output_dir_that_is_not_ours_to_continue(case, clean, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    if case == "foreign_files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        recipe, flags, names = clean["recipe"], (), ["is not empty", "--overwrite"]
    else:
        _unfinished(clean, out, monkeypatch)
        if case == "different_plan_resume":
            recipe, flags, names = clean["other"], ("--resume",), ["--resume refused", "was started for plan"]
        else:
            recipe, flags, names = clean["recipe"], (), ["holds an unfinished merge", "pass --resume"]
    before = _files(out)
    with pytest.raises(Exception) as info:
        _merge(recipe, out, *flags)
    assert type(info.value) is ValueError and str(out) in str(info.value)
    assert all(n in str(info.value) for n in names), str(info.value)
    assert _files(out) == before and _manifests(out) == []
    capsys.readouterr()
    assert _cli(recipe, out, *flags) == 2 and names[0] in capsys.readouterr().err


def test_disk_full_during_a_shard_write_then_resume(clean, tmp_path, monkeypatch):
    plan, out = clean["plan"], tmp_path / "out"
    budget, acc = plan.total_bytes // 2, 0
    for t in plan.tensors():  # in-process units write their tensors in plan order
        acc += t.nbytes
        if acc > budget:
            break
    shard = plan.shards[t.shard].filename
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", _full_after(budget))
        with pytest.raises(Exception) as info:
            _merge(clean["recipe"], out)
    assert type(info.value) is WriteFailed and isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert shard in msg and repr(t.name) in msg and os.strerror(errno.ENOSPC) in msg, msg
    assert not partial_path(out, shard).exists() and not (out / shard).exists()  # removed, never published
    assert _manifests(out) == []
    published = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert published and shard not in published
    s = _merge(clean["recipe"], out, "--resume")  # space freed: the hook is gone
    assert s["reused_shards"] == len(published) and s["units_run"] < len(plan.units)
    assert _files(out) == clean["files"]


def test_disk_full_while_writing_the_manifest_then_resume(clean, tmp_path, monkeypatch):
    import builtins

    import shardmerge.engine.io.shard_files  # the filesystem store's atomic_write opens the temp file there

    out, real_open = tmp_path / "out", builtins.open

    def full_open(path, mode="r", *args, **kw):
        if Path(path).name == MANIFEST + ".tmp":
            with real_open(path, "wb") as f:
                f.write(b'{"format": "shardmer')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(shardmerge.engine.io.shard_files, "open", full_open, raising=False)
        with pytest.raises(Exception) as info:
            _merge(clean["recipe"], out)
    assert type(info.value) is WriteFailed and str(out / MANIFEST) in str(info.value)
    assert _manifests(out) == [] and not (out / (MANIFEST + ".tmp")).exists()
    s = _merge(clean["recipe"], out, "--resume")
    assert s["reused_shards"] == len(clean["plan"].shards) and s["units_run"] == 0
    assert _files(out) == clean["files"]


@contextmanager
def _read_only(d: Path, monkeypatch):
    """d made read-only for real (mode 0555; as root also the immutable flag). Where neither holds (root without
    chattr), os.access and mkdir are made to answer as a read-only mount does."""
    d.chmod(0o555)
    immutable = (
        os.geteuid() == 0
        and shutil.which("chattr") is not None
        and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    )
    real_access, real_mkdir = os.access, Path.mkdir

    def access(path, mode, **kw):
        return False if Path(path) == d and mode & os.W_OK else real_access(path, mode, **kw)

    def mkdir(self, *args, **kw):
        if self.parent == d:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kw)

    try:
        try:
            (d / ".probe").touch()
            (d / ".probe").unlink()
            monkeypatch.setattr(os, "access", access)
            monkeypatch.setattr(Path, "mkdir", mkdir)
        except OSError:
            pass  # really read-only
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)


def test_read_only_output_dir(clean, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro, monkeypatch):
        for out, says in ((ro, "is not writable"), (ro / "new", "cannot be created")):
            with pytest.raises(Exception) as info:
                _merge(clean["recipe"], out)
            assert type(info.value) is ValueError, repr(info.value)
            assert f"output directory {out} " in str(info.value) and says in str(info.value)
            capsys.readouterr()
            assert _cli(clean["recipe"], out) == 2 and says in capsys.readouterr().err
    assert list(ro.iterdir()) == []


# ------------------------------------------------------------------------------------------------ kill leftovers
@pytest.mark.parametrize("state", ["lock_only", "empty_journal", "torn_journal"])
def test_killed_before_the_journal_was_written(state, clean, tmp_path):
    """A kill between taking the lock and the journal's first line leaves a state dir without a journal: the next
    run starts afresh (a stale temp shard is not trusted) instead of calling the directory foreign."""
    out = tmp_path / "out"
    (out / ".shardmerge" / "tmp").mkdir(parents=True)
    (out / ".shardmerge" / "driver.lock").touch()
    if state != "lock_only":
        (out / ".shardmerge" / "journal.jsonl").write_text("" if state == "empty_journal" else '{"plan_ha')
    stale = partial_path(out, clean["plan"].shards[0].filename)
    stale.write_bytes(b"\0" * clean["plan"].shards[0].size)  # right size, wrong bytes
    s = _merge(clean["recipe"], out, "--resume")
    assert s["reused_units"] == 0 and s["units_run"] == len(clean["plan"].units)
    assert _files(out) == clean["files"]


def test_killed_after_the_manifest_before_cleanup(clean, tmp_path):
    """Manifest written, state dir not yet removed: `verify` says to resume, and --resume completes it (re-hashing
    the shards, redoing one that no longer matches) with the same bytes."""
    out = Path(shutil.copytree(clean["out"], tmp_path / "out"))
    (out / ".shardmerge").mkdir()
    (out / ".shardmerge" / "journal.jsonl").write_text(json.dumps({"plan_hash": clean["plan"].plan_hash}) + "\n")
    assert any("unfinished merge's state" in p for p in verify_dir(out))
    with pytest.raises(ValueError, match="already holds this finished merge.*--resume"):
        _merge(clean["recipe"], out)
    s = _merge(clean["recipe"], out, "--resume")
    assert s["reused_shards"] == len(clean["plan"].shards) and s["units_run"] == 0
    assert _files(out) == clean["files"] and verify_dir(out) == []
    shard = out / clean["plan"].shards[1].filename
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    s = _merge(clean["recipe"], out, "--resume")
    assert s["reused_shards"] == len(clean["plan"].shards) - 1 and s["units_run"] >= 1
    assert _files(out) == clean["files"]


# ------------------------------------------------------------------------------------------------ security
SCANNED = ("engine", "jobs", "kernels")
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _unsafe_loads(source: str) -> list[str]:
    """Every way the source could unpickle or evaluate data: pickle-family imports, torch.load without
    weights_only=True, numpy allow_pickle=True, yaml loaders other than safe_load, torch.jit.load, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {m}" for m in mods if m.split(".")[0] in PICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
        weights_only = kw.get("weights_only")
        if name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        pickle_ok = kw.get("allow_pickle")
        if isinstance(pickle_ok, ast.Constant) and pickle_ok.value is True:
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        if name.startswith("yaml.") and name.split(".")[-1] in ("load", "load_all", "unsafe_load", "full_load"):
            found.append(f"line {node.lineno}: {name}")
        if name in ("eval", "exec", "torch.jit.load"):
            found.append(f"line {node.lineno}: {name}()")
    return found


def _sources():
    return [(p, p.read_text()) for d in SCANNED for p in sorted((REPO / d).rglob("*.py"))]


def test_no_pickle_loading_except_torch_load_weights_only():
    assert (
        len(
            _unsafe_loads(
                "import pickle\nimport torch, yaml\ntorch.load(f)\nyaml.load(s)\neval('1')\n"
                "import numpy as np\nnp.load(f, allow_pickle=True)\n"
            )
        )
        == 5
    )  # the scan can fail
    problems = {str(p.relative_to(REPO)): found for p, src in _sources() if (found := _unsafe_loads(src))}
    assert problems == {}
    loads = [p.name for p, src in _sources() if "torch.load(" in src.replace("`torch.load(weights_only", "")]
    assert loads == ["legacy_bin.py"]  # the one torch.load, and it passed the rule above


def _remote_code_uses(source: str, require_explicit: bool) -> list[str]:
    """trust_remote_code may only be literal False or a value named after it (a user's flag, default False);
    with require_explicit, every from_pretrained call must pass it (transformers' None can prompt and run code)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if (
                    isinstance(k, ast.Constant)
                    and k.value == "trust_remote_code"
                    and not (isinstance(v, ast.Constant) and v.value is False)
                ):
                    found.append(f"line {node.lineno}: {{'trust_remote_code': {ast.unparse(v)}}}")
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        v = kw.get("trust_remote_code")
        if v is not None and not (
            (isinstance(v, ast.Constant) and v.value is False) or "trust_remote_code" in ast.unparse(v)
        ):
            found.append(f"line {node.lineno}: trust_remote_code={ast.unparse(v)}")
        if require_explicit and _dotted(node.func).endswith(".from_pretrained") and v is None:
            found.append(f"line {node.lineno}: {_dotted(node.func)} without trust_remote_code=False")
        if _dotted(node.func).endswith("add_argument") and any(
            isinstance(a, ast.Constant) and "trust-remote-code" in str(a.value) for a in node.args
        ):
            default = kw.get("default")
            if not (kw.get("action") and ast.unparse(kw["action"]) == "'store_true'" and default is None):
                found.append(f"line {node.lineno}: --trust-remote-code must be a store_true flag (default False)")
    return found


def test_trust_remote_code_is_never_enabled_without_a_user_flag():
    bad = "AutoConfig.from_pretrained(p)\nf(trust_remote_code=True)\nf(**{'trust_remote_code': True})\n"
    assert len(_remote_code_uses(bad, require_explicit=True)) == 3  # the scan can fail
    problems, calls = {}, 0
    for p, src in _sources():
        rel = str(p.relative_to(REPO))
        found = _remote_code_uses(src, require_explicit=True)
        calls += src.count(".from_pretrained(")
        if found:
            problems[rel] = found
    assert problems == {} and calls >= 6  # the probe's five loaders and the demo's


def _custom_code_model(src: Path, dst: Path, marker: Path) -> Path:
    """A model dir whose config points transformers at a Python file that leaves `marker` when it runs."""
    d = _copy(src, dst)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        model_type="evilmodel",
        auto_map=dict.fromkeys(
            ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor"),
            "evil.Evil",
        ),
    )
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    return d


def test_remote_code_in_a_model_dir_never_runs(llm_family, tmp_path, monkeypatch):
    from shardmerge.engine.probe.prompting import Prompter, load_model

    marker = tmp_path / "RAN"
    evil = _custom_code_model(llm_family["e2"], tmp_path / "evil", marker)
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a "yes" that must never be asked for
    for loader in (Prompter, load_model):
        with pytest.raises(ValueError, match="trust_remote_code"):
            loader(evil)
    s = _merge(_recipe(tmp_path / "r.yaml", llm_family, e2=evil), tmp_path / "out")  # the merge reads JSON only
    assert s["verified"] and not list((tmp_path / "out").glob("*.py"))
    assert not marker.exists() and asked == []


def test_pickle_in_a_legacy_bin_never_runs(llm_family, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "RAN"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    d = tmp_path / "legacy"
    d.mkdir()
    shutil.copy(llm_family["e2"] / "config.json", d / "config.json")
    torch.save({"model.norm.weight": torch.ones(32), "evil": Evil()}, d / "pytorch_model.bin")
    row = Row(
        _recipe(tmp_path / "r.yaml", llm_family, e2=d), ValueError, [str(d / "pytorch_model.bin"), "weights_only=True"]
    )
    _assert_refused(row, tmp_path, capsys, monkeypatch)
    assert not marker.exists()


def _outside_shard(fam, tmp):
    d = _copy(fam["e2"], tmp / "m")
    shard = _shard_of(d, "model.norm.weight")
    shutil.move(shard, tmp / "outside.safetensors")
    shard.symlink_to(tmp / "outside.safetensors")
    return Row(
        _recipe(tmp / "r.yaml", fam, e2=d),
        ValueError,
        [str(d / "model.safetensors.index.json"), repr(shard.name), "outside the model directory"],
    )


def _outside_single(fam, tmp):
    d = _single_file(_copy(fam["e2"], tmp / "m"), lambda sd: sd)
    shutil.move(d / "model.safetensors", tmp / "outside.safetensors")
    (d / "weights.safetensors").symlink_to(tmp / "outside.safetensors")
    return Row(
        _recipe(tmp / "r.yaml", fam, e2=d), ValueError, [str(d), "'weights.safetensors'", "outside the model directory"]
    )


def _outside_file(name: str, key: str):
    """config.json or tokenizer.json as a symlink to a file elsewhere (it would be read or copied into the output)."""

    def build(fam, tmp):
        d = _copy(fam[key], tmp / "m")
        secret = tmp / "secret.json"
        secret.write_text((d / name).read_text())  # valid JSON: only where it lives is wrong
        (d / name).unlink()
        (d / name).symlink_to(secret)
        return Row(
            _recipe(tmp / "r.yaml", fam, **{key: d}), ValueError, [str(d), repr(name), "outside the model directory"]
        )

    return build


SYMLINK_ROWS = {
    "index_shard_symlink_outside": _outside_shard,
    "single_file_symlink_outside": _outside_single,
    "config_symlink_outside": _outside_file("config.json", "e2"),
    "tokenizer_symlink_outside": _outside_file("tokenizer.json", "base"),
}


@pytest.mark.parametrize("row", sorted(SYMLINK_ROWS))
def test_symlinks_in_model_dirs_are_confined(row, llm_family, tmp_path, capsys, monkeypatch):
    _assert_refused(SYMLINK_ROWS[row](llm_family, tmp_path), tmp_path, capsys, monkeypatch)


def test_symlinked_model_dir_is_resolved(llm_family, tmp_path):
    """A link to a whole model dir is fine: it is resolved first, and its files are confined to the target."""
    (tmp_path / "link").symlink_to(llm_family["base"], target_is_directory=True)
    plan = build_plan(load_recipe(_recipe(tmp_path / "r.yaml", llm_family, base=tmp_path / "link")))
    assert plan.config_source == str(llm_family["base"].resolve())
    assert all(math.prod(t.shape) > 0 for t in plan.tensors())
