"""``environments-operator worker``: serve one work item inside a worker pod, then exit.

The pod contract (DESIGN.md) hands the worker exactly what the SDK's ``EnvironmentWorker.handle_item()``
reads: ``ANTHROPIC_WORK_ID``, ``ANTHROPIC_ENVIRONMENT_ID``, ``ANTHROPIC_SESSION_ID``,
``ANTHROPIC_WORK_SECRET`` (from the per-item Secret) and ``ANTHROPIC_BASE_URL``. The SDK then
heartbeats the item's lease while its ``SessionToolRunner`` runs the agent's tool calls (the SDK's
agent toolset: bash, read, write, edit, glob, grep) in the working directory and posts their results,
and force-stops the item once the session has been idle for ``--max-idle`` seconds. A tool that fails
(a command exiting non-zero, a missing file) is an error result for the agent, not a failure of the run.

This module checks the contract, runs that one call, and turns SIGTERM into a graceful end: the
processes the tools started are sent SIGTERM (then SIGKILL), so a long ``bash`` step ends at once and
its error result is posted; the run is cancelled, and the SDK's shielded teardown still stops the item,
so a deleted pod leaves no session hanging.

Exit codes: 0 served, 1 the item failed, 2 the pod contract is broken (a variable is missing, the
working directory is not writable), 143 stopped by SIGTERM/SIGINT. Never prints the work secret or any
credential. Heavy imports (the SDK) happen inside ``main``: they are most of a worker's cold start.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUIRED_VARIABLES = ("ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_SESSION_ID")
# One of these authenticates the item's calls; a WorkerPool pod gets only the per-item secret.
CREDENTIAL_VARIABLES = ("ANTHROPIC_WORK_SECRET", "ANTHROPIC_ENVIRONMENT_KEY")
# Set by the operator from the pool's spec.maxIdleSeconds; --max-idle overrides it.
MAX_IDLE_VARIABLE = "ENVIRONMENTS_OPERATOR_WORKER_MAX_IDLE_SECONDS"
# A tool process that ignores SIGTERM gets SIGKILL after this long: well inside a pod's default
# 30 s grace period, so the worker still has time to post the step's result and stop the item.
TOOL_KILL_GRACE_SECONDS = 5.0

EXIT_SERVED, EXIT_FAILED, EXIT_CONTRACT, EXIT_TERMINATED = 0, 1, 2, 143


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default=None,
        help="directory the agent's tools work in (default: the current directory; /workspace in the image)",
    )
    parser.add_argument(
        "--max-idle", type=float, default=None, metavar="SECONDS",
        help=f"stay attached this long after the session's turn ends, for a follow-up message "
        f"(default: ${MAX_IDLE_VARIABLE}, else the SDK's 60)",
    )


def missing_variables(environ: Mapping[str, str]) -> list[str]:
    """The contract variables that are unset or empty (a credential counts once for both names)."""
    missing = [name for name in REQUIRED_VARIABLES if not environ.get(name)]
    if not any(environ.get(name) for name in CREDENTIAL_VARIABLES):
        missing.append(CREDENTIAL_VARIABLES[0])
    return missing


def worker_options(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``EnvironmentWorker`` keyword arguments from the command line and the pod's environment.

    Raises ``ValueError`` naming the variable when ``$ENVIRONMENTS_OPERATOR_WORKER_MAX_IDLE_SECONDS`` is
    not a number >= 0.
    """
    environ = os.environ if environ is None else environ
    options: dict[str, Any] = {"workdir": args.workdir if args.workdir is not None else os.getcwd()}
    max_idle = args.max_idle
    if max_idle is None and environ.get(MAX_IDLE_VARIABLE):
        raw = environ[MAX_IDLE_VARIABLE]
        try:
            max_idle = float(raw)
        except ValueError:
            raise ValueError(f"{MAX_IDLE_VARIABLE}: expected a number of seconds, got {raw!r}") from None
    if max_idle is not None:
        if max_idle < 0:
            raise ValueError(f"--max-idle / {MAX_IDLE_VARIABLE}: must be >= 0, got {max_idle:g}")
        options["max_idle"] = max_idle
    return options


def workdir_problem(workdir: str) -> str | None:
    """Why the tools could not work in ``workdir``, or None when it is a writable directory."""
    path = Path(workdir)
    if not path.is_dir():
        return f"working directory {workdir} does not exist"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"working directory {workdir} is not writable by uid {os.getuid()}"
    return None


def descendant_pids(root: int, proc: Path = Path("/proc")) -> list[int]:
    """Every live process below ``root`` in the process tree (Linux ``/proc``), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    frontier = [root]
    while frontier:
        below = [child for pid in frontier for child in children.get(pid, [])]
        found.extend(below)
        frontier = below
    return found


def signal_descendants(signum: int) -> None:
    """Send ``signum`` to every process the worker's tools started (the bash shell and its jobs)."""
    for pid in descendant_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def main(args: argparse.Namespace) -> int:
    """Serve the item and exit the process with its code (returns only for a broken contract)."""
    import asyncio
    import logging
    import sys

    def contract_error(message: str) -> int:
        print(f"environments-operator worker: {message}", file=sys.stderr)
        return EXIT_CONTRACT

    missing = missing_variables(os.environ)
    if missing:
        return contract_error(
            f"missing required environment variable(s): {', '.join(missing)}. "
            "A WorkerPool sets them on every worker pod; run this command only inside one."
        )
    try:
        options = worker_options(args)
    except ValueError as exc:
        return contract_error(str(exc))
    problem = workdir_problem(options["workdir"])
    if problem is not None:
        return contract_error(f"{problem}; mount a writable volume there (an emptyDir) or pass --workdir.")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per request at INFO would drown the tool calls, which are what a pod's log is for.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    log = logging.getLogger("environments_operator.worker")

    async def serve() -> int:
        from anthropic import AsyncAnthropic
        from anthropic.lib.environments import EnvironmentWorker

        loop = asyncio.get_running_loop()
        async with AsyncAnthropic() as client:
            task = asyncio.current_task()
            assert task is not None
            terminated = asyncio.Event()

            def on_signal() -> None:
                if terminated.is_set():
                    return
                terminated.set()
                log.info("signal received: ending the running tool, the session run, and stopping the work item")
                # The SDK shields a running tool from cancellation, so its processes are ended directly;
                # the step then ends with an error result, and the cancellation ends the run.
                signal_descendants(signal.SIGTERM)
                loop.call_later(TOOL_KILL_GRACE_SECONDS, signal_descendants, signal.SIGKILL)
                task.cancel()

            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, on_signal)
            worker = EnvironmentWorker(client, **options)
            try:
                await worker.handle_item()
            except asyncio.CancelledError:
                if terminated.is_set():
                    task.uncancel()
                    return EXIT_TERMINATED
                raise
            except ValueError as exc:  # the SDK's own contract checks (e.g. no usable credential)
                log.error("work item cannot be served: %s", exc)
                return EXIT_CONTRACT
            except Exception as exc:
                log.error("work item %s failed: %s", os.environ.get("ANTHROPIC_WORK_ID"), exc)
                return EXIT_FAILED
            finally:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
        return EXIT_TERMINATED if terminated.is_set() else EXIT_SERVED

    code = asyncio.run(serve())
    # The item is stopped and its results are posted: nothing is left to do but unload the SDK, which
    # takes an interpreter about 0.45 s (tests/bench/bench_worker_start.py). A pod that exits at once
    # frees its slot of maxWorkers that much sooner.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
