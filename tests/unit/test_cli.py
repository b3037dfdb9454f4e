"""The CLI's one vocabulary: the parsers of merge, verify, probe, plam, demo and the benchmarks spell the options of
the same meaning the same way (name, default, choices, help); `--help` of every command lists every choice and
default without importing torch, ray or transformers; docs/cli.md and README match the parsers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardmerge.jobs import cli, options

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("merge", "verify", "probe", "plam", "demo")
BENCHES = tuple(f"bench {b}" for b in cli.BENCHES)
HEAVY = ("torch", "ray", "transformers", "numpy", "pyarrow", "yaml", "shardmerge.engine")
# The shared vocabulary: the same flag everywhere it appears, benchmarks included (--out and --workers say, after
# the shared text, what they hold / what `auto` means for that command).
SHARED = ("--device", "--workers", "--address", "--out", "--no-progress", "--json", "--quiet", "--verbose", "--local")
PREFIXED = {"--out": options.OUT_HELP + " (", "--workers": options.WORKERS_HELP + " [auto: "}


def _actions(name: str) -> dict:
    return {s: a for a in cli.parser(name)._actions for s in a.option_strings if s.startswith("--")}


def _spelling(a) -> tuple:
    return (type(a).__name__, a.dest, a.default, tuple(a.choices or ()), a.type, a.nargs, a.required, a.metavar)


def same_value(flag: str, a, b) -> bool:
    if flag in PREFIXED and a.help.startswith(PREFIXED[flag]) and b.help.startswith(PREFIXED[flag]):
        return _spelling(a)[:-3] == _spelling(b)[:-3]  # required / metavar of --out may differ (demo: optional)
    return _spelling(a) == _spelling(b) and a.help == b.help


def test_options_of_one_meaning_are_spelt_the_same_in_every_command():
    """Any flag two commands share has the same name, default, choices, type and help (what defines it)."""
    seen: dict[str, tuple[str, object]] = {}
    for name in COMMANDS:
        for flag, a in _actions(name).items():
            if flag == "--help":
                continue
            if flag in seen:
                other, b = seen[flag]
                assert same_value(flag, a, b), (
                    f"{flag}: {name} {_spelling(a)} {a.help!r} vs {other} {_spelling(b)} {b.help!r}"
                )
            else:
                seen[flag] = (name, a)


def test_shared_vocabulary_in_benchmarks_too():
    reference = {}
    for name in COMMANDS:
        reference.update({f: a for f, a in _actions(name).items() if f in SHARED and f not in reference})
    assert set(reference) == set(SHARED)
    for name in BENCHES:
        for flag, a in _actions(name).items():
            if flag in SHARED:
                assert same_value(flag, a, reference[flag]), f"{name} {flag}: {_spelling(a)} {a.help!r}"
        assert "--json" not in _actions(name), f"{name}: --json is the summary flag; a file is --json-out PATH"


@pytest.mark.parametrize("name", ["merge", "probe", "plam"])
def test_ray_commands_take_the_whole_vocabulary(name):
    flags = _actions(name)
    for flag in ("--device", "--workers", "--address", "--out", "--no-progress", "--json", "--quiet", "--verbose"):
        assert flag in flags, f"{name} lacks {flag}"
    assert flags["--device"].default == "auto" and tuple(flags["--device"].choices) == ("auto", "cpu", "cuda")
    assert flags["--workers"].default is None and flags["--workers"].type is int  # None = auto; 0 = in-process


def test_every_device_option_defaults_to_auto():
    for name in (*COMMANDS, *BENCHES):
        a = _actions(name).get("--device")
        if a is not None:
            assert a.default == "auto" and tuple(a.choices) == options.DEVICES, name


def test_probe_choices_are_the_engines():
    """The light parsers spell the engine's choices themselves; they must stay the engine's."""
    from shardmerge.engine.layout.roles import TARGET_GROUPS
    from shardmerge.engine.probe import plateau, readers, runner, scoring, worker
    from shardmerge.jobs import plam, probe

    assert set(probe.METRICS) == set(runner.METRICS)
    assert tuple(probe.PATHS) == tuple(scoring.PATHS)
    assert set(probe.DTYPES) == {"auto", *worker.DTYPES}
    assert tuple(probe.FORMATS) == tuple(readers.FORMATS)
    assert tuple(probe.POOLINGS) == tuple(plateau.POOLINGS)
    assert tuple(probe.SCORES) == tuple(scoring.SCORES)
    from shardmerge.engine.probe import attention

    assert tuple(probe.MASKINGS) == tuple(attention.MODES)
    assert tuple(plam.TARGETS) == tuple(TARGET_GROUPS)
    flags = _actions("plam")
    assert tuple(flags["--metric"].choices) == probe.METRICS and tuple(flags["--path"].choices) == probe.PATHS


def test_local_is_a_deprecated_alias_of_workers_0(capsys):
    p = cli.parser("probe")
    base = ["--model", "m", "--bench", "b", "--out", "o"]
    assert options.workers(p.parse_args([*base, "--local"]), "shardmerge probe") == 0
    assert "--local is deprecated; use --workers 0" in capsys.readouterr().err
    assert options.workers(p.parse_args([*base, "--workers", "0"]), "shardmerge probe") == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="--local .* contradicts --workers 3"):
        options.workers(p.parse_args([*base, "--local", "--workers", "3"]), "shardmerge probe")
    with pytest.raises(ValueError, match="--workers must be 0 .* got -1"):
        options.workers(p.parse_args([*base, "--workers", "-1"]), "shardmerge probe")


def test_building_the_parsers_imports_nothing_heavy():
    """The deterministic proxy of a fast --help: importing the CLI and building every command's parser loads no
    torch, ray, transformers, numpy, pyarrow, yaml or engine module (timings: BENCHMARKS.md)."""
    code = (
        "import sys; import shardmerge.jobs.cli as c\n"
        f"[c.parser(n) for n in {COMMANDS!r}]\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), COLUMNS="100")


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_option_choice_and_default(name):
    """`shardmerge NAME --help` in a fresh process: every option, each of its choices, and its default (in the
    help's [brackets]) appear."""
    r = subprocess.run(
        [sys.executable, "-m", "shardmerge.jobs.cli", name, "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for a in cli.parser(name)._actions:
        for s in a.option_strings:
            assert s in text, f"{name} --help lacks {s}"
        for c in a.choices or ():
            assert str(c) in text, f"{name} --help lacks choice {c} of {a.option_strings}"
        if a.option_strings and a.nargs != 0 and a.default not in (None, False, 0.0, 0) and a.dest != "help":
            assert f"[{a.default}" in (a.help or ""), f"{name} {a.option_strings}: default {a.default} not in its help"
        if a.default is None and a.option_strings and a.nargs != 0 and a.required is False:
            pass  # None: not set; the help says what happens then


def test_main_help_and_unknown_command():
    assert cli.main(["--help"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


def test_resume_command_parses_back_to_the_same_options():
    """The command an interrupt prints repeats every option given (append and two-value options included)."""
    import shlex

    from shardmerge.jobs import merge, plam

    argv = ["r.yaml", "--out", "o d", "--workers", "1", "--shard-size", "30KB", "--no-progress", "--overwrite"]
    args = merge.build_parser().parse_args(argv)
    cmd = shlex.split(merge.resume_command(args))
    assert cmd[:2] == ["shardmerge", "merge"] and cmd[-1] == "--resume" and "--overwrite" not in cmd
    again = vars(merge.build_parser().parse_args(cmd[2:]))
    assert {**vars(args), "overwrite": False, "resume": True} == again
    argv = ["--mllm", "m", "--base", "b", "--bench", "x", "--bench", "y", "--out", "o", "--layers", "2", "3"]
    args = plam.build_parser().parse_args([*argv, "--alpha", "0.2"])
    cmd = shlex.split(plam.rerun_command(args))
    assert vars(plam.build_parser().parse_args(cmd[2:])) == vars(args)


def test_docs_cli_md_is_the_reference_generated_from_the_parsers():
    """docs/cli.md holds, verbatim, the option tables generated from the parsers: an option added, renamed or
    re-documented in a parser fails here until `python -m shardmerge.jobs.cli --reference` is pasted in."""
    doc = (REPO / "docs" / "cli.md").read_text()
    begin, end = "<!-- BEGIN GENERATED REFERENCE -->\n", "<!-- END GENERATED REFERENCE -->"
    assert begin in doc and end in doc
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == cli.reference()


def test_readme_option_blocks_list_every_flag():
    """README's usage block of each command names every one of its options."""
    readme = (REPO / "README.md").read_text()
    for name in ("merge", "probe", "plam"):
        block = re.search(rf"```\n(shardmerge {name} [^`]*)```", readme)
        assert block, f"README has no `shardmerge {name} ...` options block"
        for flag in _actions(name):
            if flag != "--help":
                assert re.search(rf"{re.escape(flag)}\b", block.group(1)), f"README {name} block lacks {flag}"
