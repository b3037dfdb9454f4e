"""The `shardmerge` command: merge, verify, probe, plam, demo, bench.

Each subcommand lives in jobs/<name>.py with `add_arguments(parser)` and `run_from_args(args)` (or `main(argv)`),
so `python -m jobs.<name>` under `ray job submit` and `shardmerge <name>` are the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

COMMANDS = {
    "merge": "merge models from a YAML recipe into a Hugging Face-layout directory",
    "verify": "re-check a merged output directory (hashes, headers, index, manifest)",
    "probe": "vision-token-masking probe of an MLLM over a benchmark (layer-wise curve, plateau)",
    "plam": "probe -> plateau -> PlaM merge of base-LLM weights into the MLLM's plateau layers",
    "demo": "build tiny models locally and run the whole pipeline on an embedded local Ray",
    "bench": "benchmarks that print measured ratios (vs-mergekit, floor, memory-72b, scaling, probe, kernels, svd)",
}
PASSTHROUGH = {"probe", "plam", "bench"}  # these modules parse their own argv via main(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="shardmerge", description="Distributed, sharded merge engine for (multimodal) "
                                "LLMs on Ray.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text, add_help=name not in PASSTHROUGH)
        if name not in PASSTHROUGH:
            importlib.import_module(f"jobs.{name}").add_arguments(sp)
    if argv and argv[0] in PASSTHROUGH:
        return importlib.import_module(f"jobs.{argv[0]}").main(argv[1:])
    args = p.parse_args(argv)
    if not args.command:
        p.print_help()
        return 2
    return importlib.import_module(f"jobs.{args.command}").run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
