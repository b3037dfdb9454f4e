"""SIGINT / SIGTERM for the long-running commands (merge, probe, plam): the work stops where it is (workers
cancelled; a merge's journal and temp shards are left for --resume), one line names the output directory and the
exact command that continues it, and the command exits 130 (SIGINT) or 143 (SIGTERM) without a traceback.

SIGTERM is raised in the main thread as `Terminated` (a KeyboardInterrupt), the way Python raises
KeyboardInterrupt for SIGINT. Ray's driver installs its own SIGTERM handler when it connects (`sys.exit(15)`), so
the engine puts the command's back once connected (shardmerge.engine.run.ray_session.connect); a SystemExit(15) that
still gets through is read as SIGTERM too.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT, and a KeyboardInterrupt itself:
    Ray's native wait loop (`ray.wait`, `ray.get`) turns any other exception a signal handler raises into
    SystemExit(1), but a KeyboardInterrupt into a (new) KeyboardInterrupt, so the stop reaches the command either
    way; `_received` tells the two signals apart."""


_received: list[int] = []


def on_sigterm(signum, frame):
    _received.append(signum)
    raise Terminated()


def interrupted_line(prog: str, name: str, out: str | Path, what: str, command: str) -> str:
    return (
        f"{prog}: interrupted by {name}; the unfinished {what} in {out if '://' in str(out) else Path(out).resolve()} is kept. "
        f"Continue it with: {command}"
    )


def run_interruptible(
    prog: str, body: Callable[[], int], *, out: str | Path, what: str, command: Callable[[], str], handler=None
) -> int:
    """Run `body()` with SIGTERM raising Terminated; on SIGINT / SIGTERM print the one line and return 130 / 143.
    `command()` gives the command line that continues the work (built only when needed)."""
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread only
    previous = signal.signal(signal.SIGTERM, handler or on_sigterm) if main else None
    name = None
    _received.clear()
    try:
        return body()
    except KeyboardInterrupt as exc:
        name = "SIGTERM" if isinstance(exc, Terminated) or signal.SIGTERM in _received else "SIGINT"
    except SystemExit as exc:  # Ray's driver handler (sys.exit(SIGTERM)), if it ran before ours was back
        if exc.code != signal.SIGTERM:
            raise
        name = "SIGTERM"
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    print(interrupted_line(prog, name, out, what, command()), file=sys.stderr, flush=True)
    return 128 + (signal.SIGINT if name == "SIGINT" else signal.SIGTERM)


def rerun_command(parser, args, head: list[str], skip: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> str:
    """`head` + every option of `args` that differs from the parser's default (options in `skip` left out) +
    `extra`, shell-quoted: the command line that repeats this run."""
    import shlex

    argv = list(head)
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", *skip):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            argv += [flag]
        elif isinstance(value, list) and action.nargs not in (None, "?"):  # nargs=2 and the like: one flag
            argv += [flag, *map(str, value)]
        elif isinstance(value, list):  # action="append": the flag once per value
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return shlex.join(argv + list(extra))
