"""`shardmerge verify DIR` / `python -m shardmerge.jobs.verify DIR`: re-check a merged output directory; exit 1 on a problem."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from shardmerge.jobs import options

    p = argparse.ArgumentParser(prog="shardmerge verify", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a shardmerge output directory or object-store prefix (s3://bucket/prefix)")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 re-hash (sizes and headers only)")
    options.add_json(p)
    options.add_verbosity(p)
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from shardmerge.engine.verify import verify_dir
    from shardmerge.jobs import options

    options.setup_logging(args)
    problems = verify_dir(args.dir, hashes=not args.no_hash)
    if args.json:
        print(json.dumps({"dir": str(args.dir), "ok": not problems, "hashes": not args.no_hash, "problems": problems}))
        return 1 if problems else 0
    if problems:
        print(f"shardmerge verify: FAILED: {problems[0]}", file=sys.stderr)
        for extra in problems[1:10]:
            print(f"  also: {extra}", file=sys.stderr)
        return 1
    print(f"shardmerge verify: OK: {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
