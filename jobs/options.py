"""The options every `shardmerge` command shares, defined once: the same name, meaning, default and help wherever a
command takes them (tests/unit/test_cli.py compares the parsers; docs/cli.md lists them).

This module and the parsers that use it import nothing heavy (no torch, ray, transformers or engine internals), so
`shardmerge COMMAND --help` answers at once; the commands import those when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys

DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = (
    "where tensors are computed: cpu, cuda, or auto = cuda when a GPU is visible (to this process, or to the Ray "
    "cluster given by --address / RAY_ADDRESS), else cpu [auto]"
)
WORKERS_HELP = "parallel workers (Ray actors); 0 runs everything in this process, without Ray"
ADDRESS_HELP = (
    "Ray cluster address ('auto': the cluster `ray start` runs on this machine; ray://HOST:PORT); default: "
    "RAY_ADDRESS if set, else a private Ray instance started for this command and stopped after it"
)
OUT_HELP = "output directory"
PROGRESS_HELP = "no progress bar and no phase lines (stderr)"
QUIET_HELP = "only warnings and errors on stderr"
VERBOSE_HELP = "also debug messages on stderr"
JSON_HELP = "print the JSON summary on stdout instead of the human summary"
LOCAL_HELP = "deprecated: the same as --workers 0"


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def add_workers(p: argparse.ArgumentParser, auto: str) -> None:
    """--workers N (default None = auto; `auto` says what auto means for this command)."""
    p.add_argument("--workers", type=int, default=None, metavar="N", help=f"{WORKERS_HELP} [auto: {auto}]")


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, metavar="ADDR", help=ADDRESS_HELP)


def add_out(p: argparse.ArgumentParser, what: str, *, required: bool = True) -> None:
    p.add_argument("--out", required=required, default=None, metavar="DIR", help=f"{OUT_HELP} ({what})")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    g.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def add_local_alias(p: argparse.ArgumentParser) -> None:
    """The old spelling of --workers 0 (probe); kept working, with a deprecation notice (see `workers`)."""
    p.add_argument("--local", action="store_true", help=LOCAL_HELP)


def add_common(p: argparse.ArgumentParser, *, workers: str | None, out: str | None, out_required: bool = True) -> None:
    """The shared options of a command that runs on Ray: device, workers, address, out, progress, verbosity, json."""
    if out is not None:
        add_out(p, out, required=out_required)
    add_device(p)
    if workers is not None:
        add_workers(p, workers)
    add_address(p)
    add_progress(p)
    add_json(p)
    add_verbosity(p)


def workers(args: argparse.Namespace, prog: str) -> int | None:
    """args.workers, with the deprecated --local read as --workers 0 (and a notice saying so)."""
    if getattr(args, "local", False):
        print(f"{prog}: warning: --local is deprecated; use --workers 0 (the same meaning)", file=sys.stderr)
        if args.workers not in (None, 0):
            raise ValueError(f"--local (= --workers 0) contradicts --workers {args.workers}")
        return 0
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 (in this process) or a positive number, got {args.workers}")
    return args.workers


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
