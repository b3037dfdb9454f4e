"""`shardmerge verify DIR|s3://…` / `python -m shardmerge.jobs.verify DIR`: re-check a merged output; exit 1 on a problem."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a shardmerge output directory or object-store prefix (s3://bucket/prefix)")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 re-hash (sizes and headers only)")


def run_from_args(args: argparse.Namespace) -> int:
    from shardmerge.engine.verify import verify_dir

    problems = verify_dir(args.dir, hashes=not args.no_hash)
    if problems:
        print(f"shardmerge verify: FAILED: {problems[0]}", file=sys.stderr)
        for extra in problems[1:10]:
            print(f"  also: {extra}", file=sys.stderr)
        return 1
    print(f"shardmerge verify: OK: {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardmerge verify", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
