"""The `shardmerge` command: merge, verify, probe, plam, demo, bench.

Each subcommand lives in jobs/<name>.py with `build_parser()` and `main(argv)`, so `python -m jobs.<name>` under
`ray job submit` and `shardmerge <name>` are the same code. Importing this module or building a parser imports
nothing heavy (torch, ray, transformers, the engine): only running a command does, so `--help` answers at once.
The options the commands share are defined once, in jobs/options.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "merge": "merge models from a YAML recipe into a Hugging Face-layout directory",
    "verify": "re-check a merged output directory (hashes, headers, index, manifest)",
    "probe": "vision-token-masking probe of an MLLM over a benchmark (layer-wise curve, plateau)",
    "plam": "probe -> plateau -> PlaM merge of base-LLM weights into the MLLM's plateau layers",
    "demo": "build tiny models locally and run the whole pipeline on an embedded local Ray",
    "bench": "benchmarks that print measured ratios (vs-mergekit, floor, memory-72b, scaling, probe, kernels, svd)",
}


BENCHES = ("vs-mergekit", "floor", "memory-72b", "scaling", "probe", "kernels", "svd")  # jobs/bench.py's


def parser(name: str):
    """The argparse parser of command `name`, or of benchmark `bench NAME` (for the CLI reference and its tests).
    A benchmark's parser imports its benchmark module (torch among others); a command's imports nothing heavy."""
    if name.startswith("bench "):
        from shardmerge.jobs.bench import BENCHES as modules

        return importlib.import_module(modules[name.split(" ", 1)[1]]).build_parser()
    return importlib.import_module(f"shardmerge.jobs.{name}").build_parser()


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def reference(names=None) -> str:
    """The option tables of docs/cli.md, generated from the parsers (tests/unit/test_cli.py checks that the file
    holds exactly this text): `python -m shardmerge.jobs.cli --reference`."""
    names = names or [*COMMANDS.keys() - {"bench"}, *(f"bench {b}" for b in BENCHES)]
    names = [n for n in COMMANDS if n in names] + [n for n in names if n.startswith("bench ")]
    out = []
    for name in names:
        p = parser(name)
        out += [f"### `shardmerge {name}`", "", p.description or "", "", "| option | default | choices | meaning |"]
        out.append("|---|---|---|---|")
        for a in p._actions:
            if a.dest == "help":
                continue
            flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}` (positional)"
            if a.option_strings and a.nargs != 0:
                meta = a.metavar if a.metavar is not None else a.dest.upper()
                flag += " " + " ".join(meta) if isinstance(meta, tuple) else f" {meta}"
            default = "" if a.default in (None, False) or a.nargs == 0 else f"`{a.default}`"
            if a.default is None and "[auto" in (a.help or ""):
                default = "auto"
            if a.required:
                default = "required"
            choices = ", ".join(f"`{c}`" for c in a.choices) if a.choices else ""
            out.append(f"| {_cell(flag)} | {_cell(default)} | {_cell(choices)} | {_cell(a.help or '')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="shardmerge",
        description="Distributed, sharded merge engine for (multimodal) LLMs on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items())
        + "\n\n`shardmerge COMMAND --help` for a command's options.",
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    if argv == ["--reference"]:
        print(reference(), end="")
        return 0
    if not argv or argv[0] not in COMMANDS:
        p.print_help() if not argv or argv[0] in ("-h", "--help") else p.parse_args(argv[:1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"shardmerge.jobs.{name}")  # only the chosen command's imports are paid for
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
