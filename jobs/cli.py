"""The `shardmerge` command: merge, verify, probe, plam, demo, bench.

Each subcommand lives in jobs/<name>.py with `add_arguments(parser)` and `run_from_args(args)` (or `main(argv)`),
so `python -m jobs.<name>` under `ray job submit` and `shardmerge <name>` are the same code.
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
PASSTHROUGH = {"probe", "plam", "bench"}  # these modules parse their own argv via main(argv)


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
    if not argv or argv[0] not in COMMANDS:
        p.print_help() if not argv or argv[0] in ("-h", "--help") else p.parse_args(argv[:1])
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"jobs.{name}")  # only the chosen command's imports are paid for
    if name in PASSTHROUGH:
        return module.main(rest)
    sp = argparse.ArgumentParser(prog=f"shardmerge {name}", description=COMMANDS[name])
    module.add_arguments(sp)
    return module.run_from_args(sp.parse_args(rest))


if __name__ == "__main__":
    sys.exit(main())
