"""``environments-operator worker``: serve one work item inside a worker pod, then exit.

The pod contract (DESIGN.md) hands the worker exactly what the SDK's ``EnvironmentWorker.handle_item()``
reads: ``ANTHROPIC_WORK_ID``, ``ANTHROPIC_ENVIRONMENT_ID``, ``ANTHROPIC_SESSION_ID``,
``ANTHROPIC_WORK_SECRET`` and ``ANTHROPIC_BASE_URL``. It comes in one of two ways:

- **fresh pod**: the four ``ANTHROPIC_*`` item variables are in the environment from the start (the work
  secret from the per-item Secret through ``secretKeyRef``);
- **warm pod** (``ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET`` is set, to the pod's own name; the four item
  variables are not): the pod starts before its item exists. The worker imports the SDK and builds its
  client first (most of a cold start), then waits for its assignment Secret through the Kubernetes API
  with the pod's in-cluster configuration (``environments_operator.assignment``), puts the Secret's four
  values into its environment, and from there on serves exactly as a fresh pod does.

The SDK then heartbeats the item's lease while its ``SessionToolRunner`` runs the agent's tool calls (the
SDK's agent toolset: bash, read, write, edit, glob, grep) in the working directory and posts their
results, and force-stops the item once the session has been idle for ``--max-idle`` seconds. A tool that
fails (a command exiting non-zero, a missing file) is an error result for the agent, not a failure of the
run.

This module checks the contract, runs that one call, and turns SIGTERM into a graceful end: the
processes the tools started are sent SIGTERM (then SIGKILL), so a long ``bash`` step ends at once and
its error result is posted; the run is cancelled, and the SDK's shielded teardown still stops the item,
so a deleted pod leaves no session hanging. A warm pod signalled while it still waits ends at once.

Exit codes: 0 served, 1 the item failed, 2 the pod contract is broken (a variable is missing, the
working directory is not writable; for a warm pod also: no in-cluster configuration, 401/403 from the
API, an assignment Secret without one of its four keys), 143 stopped by SIGTERM/SIGINT (a warm pod
included, whether or not it was assigned). Never prints the work secret or any credential. Heavy
imports (the SDK, httpx) happen inside ``main``: they are most of a worker's cold start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUIRED_VARIABLES = ("ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_SESSION_ID")
# Set (to the pod's own name) on a warm pod instead of the item's variables: the Secret that assigns it.
ASSIGNMENT_VARIABLE = "ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET"
# What a warm pod's assignment provides, so it must not have them before: a pod is warm or fresh.
ASSIGNED_VARIABLES = (*REQUIRED_VARIABLES, "ANTHROPIC_WORK_SECRET")
DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
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
    parser.add_argument(
        "--service-account-dir", default=DEFAULT_SERVICE_ACCOUNT_DIR, metavar="DIR",
        help="a warm pod's service account token, ca.crt and namespace (default: %(default)s, where "
        "Kubernetes mounts them)",
    )


def is_warm(environ: Mapping[str, str]) -> bool:
    """A warm pod: its item comes later, through the assignment Secret ``$ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET``."""
    return bool(environ.get(ASSIGNMENT_VARIABLE))


def missing_variables(environ: Mapping[str, str]) -> list[str]:
    """The contract variables that are unset or empty (a credential counts once for both names).

    A warm pod needs none of them at the start: its assignment brings the item's four.
    """
    if is_warm(environ):
        return []
    missing = [name for name in REQUIRED_VARIABLES if not environ.get(name)]
    if not any(environ.get(name) for name in CREDENTIAL_VARIABLES):
        missing.append(CREDENTIAL_VARIABLES[0])
    return missing


def conflicting_variables(environ: Mapping[str, str]) -> list[str]:
    """A warm pod's item variables that are set already (there must be none: the assignment sets them)."""
    if not is_warm(environ):
        return []
    return [name for name in ASSIGNED_VARIABLES if environ.get(name)]


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


# What the SDK imports only once it serves an item: the agent toolset, and its transport's pieces on the
# first request. A warm pod imports them while it waits: assignment -> first request p50 12 ms instead of
# 26 ms (tests/bench/bench_worker_warm.py, 8 runs each). Found by diffing sys.modules around a served item
# (anthropic 2.15, httpx2 2.16); a name a later SDK no longer uses is skipped.
SERVING_IMPORTS = (
    "anthropic.lib.tools.agent_toolset",
    "httpcore2._async.connection_pool",
    "httpcore2._backends.anyio",
    "anyio._backends._asyncio",
    "anyio.streams.tls",
    "truststore",
    "opentelemetry.propagate",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.baggage.propagation",
    "pydantic.validate_call_decorator",
)


def preload_serving_imports() -> None:
    """Import ``SERVING_IMPORTS`` now, best effort: they only move work earlier, never change it."""
    import importlib

    for name in SERVING_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


class ContractError(Exception):
    """The pod contract is broken before anything is served (exit 2); the message names what, never a value."""


@dataclasses.dataclass(frozen=True)
class Warm:
    """A warm pod's assignment: which Secret, and how to reach the API that holds it."""

    secret_name: str
    cluster: Any  # environments_operator.assignment.InClusterConfig (imported with httpx, inside main)


def check_contract(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[dict[str, Any], Warm | None]:
    """The ``EnvironmentWorker`` options, and for a warm pod its assignment; raises ``ContractError``."""
    missing = missing_variables(environ)
    if missing:
        raise ContractError(
            f"missing required environment variable(s): {', '.join(missing)}. "
            "A WorkerPool sets them on every worker pod; run this command only inside one."
        )
    conflicting = conflicting_variables(environ)
    if conflicting:
        raise ContractError(
            f"{ASSIGNMENT_VARIABLE} is set (a warm pod, assigned later) but so is {', '.join(conflicting)}: "
            "a worker pod is either warm or fresh."
        )
    try:
        options = worker_options(args, environ)
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    problem = workdir_problem(options["workdir"])
    if problem is not None:
        raise ContractError(f"{problem}; mount a writable volume there (an emptyDir) or pass --workdir.")
    if not is_warm(environ):
        return options, None
    from environments_operator.assignment import AssignmentError, in_cluster_config

    try:
        cluster = in_cluster_config(environ, Path(args.service_account_dir))
    except AssignmentError as exc:
        raise ContractError(str(exc)) from None
    return options, Warm(environ[ASSIGNMENT_VARIABLE], cluster)


def main(args: argparse.Namespace) -> int:
    """Serve the item and exit the process with its code (returns only for a broken contract)."""
    import asyncio
    import logging
    import sys

    try:
        options, warm = check_contract(args, os.environ)
    except ContractError as exc:
        print(f"environments-operator worker: {exc}", file=sys.stderr)
        return EXIT_CONTRACT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per request at INFO would drown the tool calls, which are what a pod's log is for.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a warm pod's requests to the Kubernetes API

    code = asyncio.run(serve(options, warm))
    # The item is stopped and its results are posted: nothing is left to do but unload the SDK, which
    # takes an interpreter about 0.45 s (tests/bench/bench_worker_start.py). A pod that exits at once
    # frees its slot of maxWorkers that much sooner.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve(options: dict[str, Any], warm: Warm | None) -> int:
    """Build the SDK's worker, wait for the assignment (a warm pod), serve the item; returns the exit code."""
    import asyncio
    import logging

    from anthropic import AsyncAnthropic
    from anthropic.lib.environments import EnvironmentWorker

    if warm is not None:
        preload_serving_imports()
    log = logging.getLogger("environments_operator.worker")
    loop = asyncio.get_running_loop()
    async with AsyncAnthropic() as client:
        task = asyncio.current_task()
        assert task is not None
        terminated = asyncio.Event()
        serving = False

        def on_signal() -> None:
            if terminated.is_set():
                return
            terminated.set()
            if not serving:
                log.info("signal received while waiting for an assignment: exiting, nothing was served")
                task.cancel()
                return
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
            if warm is not None:
                code = await take_assignment(warm)
                if code is not None:
                    return code
            serving = True
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


async def take_assignment(warm: Warm) -> int | None:
    """Wait for a warm pod's assignment and put its four variables into the environment.

    Returns None once assigned, or ``EXIT_CONTRACT`` when the assignment cannot be read.
    """
    import logging

    from environments_operator.assignment import AssignmentError, wait_for_assignment

    log = logging.getLogger("environments_operator.worker")
    try:
        assignment = await wait_for_assignment(warm.cluster, warm.secret_name)
    except AssignmentError as exc:
        log.error("warm: the assignment cannot be read: %s", exc)
        return EXIT_CONTRACT
    os.environ.update(assignment)
    log.info("warm: assigned work item %s", assignment["ANTHROPIC_WORK_ID"])
    return None
