"""``environments-operator worker``: serve one work item inside a worker pod, then exit.

The pod contract (DESIGN.md) hands the worker exactly what the SDK's ``EnvironmentWorker.handle_item()``
reads: ``ANTHROPIC_WORK_ID``, ``ANTHROPIC_ENVIRONMENT_ID``, ``ANTHROPIC_SESSION_ID``,
``ANTHROPIC_WORK_SECRET`` (from the per-item Secret) and ``ANTHROPIC_BASE_URL``. The SDK then
heartbeats the item's lease while it runs the session's tools, and force-stops the item when it ends.
This module only checks the contract, runs that one call, and turns SIGTERM into a graceful end:
the run is cancelled, and the SDK's shielded teardown still stops the item, so a deleted pod leaves
no session hanging.

Exit codes: 0 served, 1 the item failed, 2 the pod contract is broken (a variable is missing),
143 stopped by SIGTERM/SIGINT. Never prints the work secret or any credential.
"""

from __future__ import annotations

import argparse
from typing import Any

REQUIRED_VARIABLES = ("ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_SESSION_ID")
# One of these authenticates the item's calls; a WorkerPool pod gets only the per-item secret.
CREDENTIAL_VARIABLES = ("ANTHROPIC_WORK_SECRET", "ANTHROPIC_ENVIRONMENT_KEY")

EXIT_SERVED, EXIT_FAILED, EXIT_CONTRACT, EXIT_TERMINATED = 0, 1, 2, 143


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="working directory for the agent's tools")
    parser.add_argument("--max-idle", type=float, default=None, metavar="SECONDS",
                        help="exit after this long without activity")


def missing_variables(environ: dict[str, str]) -> list[str]:
    """The contract variables that are unset or empty (a credential counts once for both names)."""
    missing = [name for name in REQUIRED_VARIABLES if not environ.get(name)]
    if not any(environ.get(name) for name in CREDENTIAL_VARIABLES):
        missing.append(CREDENTIAL_VARIABLES[0])
    return missing


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """``EnvironmentWorker`` keyword arguments from the command line; unset flags keep the SDK's defaults."""
    options: dict[str, Any] = {}
    if args.workdir is not None:
        options["workdir"] = args.workdir
    if args.max_idle is not None:
        options["max_idle"] = args.max_idle
    return options


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os
    import signal
    import sys

    missing = missing_variables(dict(os.environ))
    if missing:
        print(
            f"environments-operator worker: missing required environment variable(s): {', '.join(missing)}. "
            "A WorkerPool sets them on every worker pod; run this command only inside one.",
            file=sys.stderr,
        )
        return EXIT_CONTRACT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("environments_operator.worker")

    async def serve() -> int:
        from anthropic import AsyncAnthropic
        from anthropic.lib.environments import EnvironmentWorker

        options = worker_options(args)
        loop = asyncio.get_running_loop()
        async with AsyncAnthropic() as client:
            task = asyncio.current_task()
            assert task is not None
            terminated = asyncio.Event()

            def on_signal() -> None:
                if not terminated.is_set():
                    terminated.set()
                    log.info("signal received: ending the session run and stopping the work item")
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

    return asyncio.run(serve())
