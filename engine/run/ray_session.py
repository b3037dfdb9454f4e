"""The Ray session of a driver: attach to a cluster (--address or RAY_ADDRESS) or start a private embedded instance,
ship this very `shardmerge` to the workers, list live nodes, and unwrap a task's user-level error.

The merge's worker pool (shardmerge.engine.run.ray_pool) and everything else that runs Ray work (PivotMerge
calibration, the probe, the PlaM job) connect through `connect`, so they behave alike. A leaf module: it imports
only Ray (lazily) and the phase-line reporter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Attach to a cluster (address or RAY_ADDRESS) or start an embedded local instance. True if we started it.
    An already initialised Ray (a test's, a notebook's, a job driver's) is reused and left running."""
    import ray

    if ray.is_initialized():
        return False
    with _keep_sigterm_handler():
        try:
            return _connect(address, num_cpus)
        except (ValueError, RuntimeError, ConnectionError):
            raise
        except (
            Exception
        ) as exc:  # Ray raises a bare Exception when its node does not come up (e.g. an overloaded machine)
            raise RuntimeError(f"could not start or reach Ray ({address or 'embedded'}): {exc}") from exc


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the driver's SIGTERM handler with its own `sys.exit(15)`; a SystemExit raised while the
    driver waits in `ray.wait`/`ray.get` comes out of Ray's native code as SystemExit(1), so a command's own
    handler (the CLI's: stop cleanly, say how to resume, exit 143) is put back once Ray is connected."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _connect(address: str | None, num_cpus: int | None) -> bool:
    import ray

    from shardmerge.engine.phases import phase

    address = address or os.environ.get("RAY_ADDRESS")
    phase(
        "starting Ray",
        f"connecting to {address}" if address else f"a private local instance, {num_cpus or os.cpu_count()} CPUs",
    )
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=_runtime_env(embedded=False))
        return True
    # The embedded instance is private to this merge: Ray's metrics exporter threads (whose crashes at exit printed
    # SIGSEGV/SIGABRT dumps after successful merges) are off, and its notice that token auth was enabled by default
    # (auth stays on) is not printed.
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(
            address="local",  # a fresh instance: never attach to some other `ray start` cluster on this machine
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=True,
            runtime_env=_runtime_env(embedded=True),
            _system_config={"enable_metrics_collection": False},
        )
    finally:
        auth_log.setLevel(level)
    return True


def _runtime_env(*, embedded: bool) -> dict:
    """What the workers need to import this very `shardmerge`.

    Run from a source checkout that is not installed (`python -m jobs.merge`, e.g. under `ray job submit
    --working-dir .`), the checkout's package is copied once into a temporary `shardmerge/` folder and shipped as a
    Ray `py_modules` entry, so workers on nodes without shardmerge installed import the same code. Otherwise the
    workers import the installed package; an embedded instance also hands them the driver's PYTHONPATH."""
    import shardmerge

    checkout = getattr(shardmerge, "CHECKOUT", None)
    if checkout:
        return {"py_modules": [_stage_checkout(Path(checkout))]}
    path = os.environ.get("PYTHONPATH", "")
    return {"env_vars": {"PYTHONPATH": path}} if embedded and path else {}


def _stage_checkout(root: Path) -> str:
    import shutil
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="shardmerge-src-")) / "shardmerge"
    dest.mkdir()
    shutil.copy2(root / "__init__.py", dest / "__init__.py")
    for sub in ("engine", "kernels", "jobs"):
        shutil.copytree(root / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest)


def alive_nodes() -> list[dict]:
    """Total resources of every live node."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def unwrap(exc):
    """The user-level exception inside a RayTaskError (ValueError/RuntimeError from the unit, with its message)."""
    cause = exc.as_instanceof_cause()
    return cause.cause if getattr(cause, "cause", None) else cause
