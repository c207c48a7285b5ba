"""Benchmark: a warm worker's assignment → its first request to the work API, against a cold start's.

Serves one emulator (``EmulatorServer``) and one ``FakeInClusterApi`` (tests/harness/incluster.py: real
HTTPS, a CA from trustme) on this script's event loop, and alternates ``--runs`` pairs of runs, each on a
fresh one-step session (``bash: true``) whose work item is claimed and acked as the operator does:

- **cold**: the clock starts just before the exec of ``python -m environments_operator worker`` with the
  fresh pod's variables (``tests.harness.sessions.start_worker``);
- **warm**: the same command with a warm pod's variables (``ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET``, the
  in-cluster ones, ``--service-account-dir``) is started first; once its watch is open (it has imported
  the SDK and built its client) and another ``--settle`` seconds have passed, the item is claimed and the
  clock starts when the assignment Secret is created (the fake notifies the open watch at once).

A timing middleware at the head of the emulator's records when each ``/v1`` request arrives. Printed, per
mode, min / p50 / max (ms) from the clock's start to: the first request of any kind, the first heartbeat,
the tool result's POST; for warm runs also process start → watch open (the preparation it hides). Every
worker must exit 0. Runs alternate, so a noisy moment of a shared machine hits both modes alike.

    PYTHONPATH=operator:. .venv/bin/python tests/bench/bench_worker_warm.py [--runs 10] [--settle 0.5]

A script, not a test. Shared machines are noisy: read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.emulator import API_KEY, api_client, self_hosted_environment  # noqa: E402
from tests.harness.incluster import FakeInClusterApi, assignment_data  # noqa: E402
from tests.harness.sessions import WorkerProcess, claim, scripted_agent, start_worker  # noqa: E402

from environments_operator.emulator.server import EmulatorServer  # noqa: E402
from environments_operator.worker import ASSIGNMENT_VARIABLE  # noqa: E402

SCRIPT = [{"tool": "bash", "input": {"command": "true"}}]
MARKS = (
    ("first request to the API", None),
    ("first heartbeat (POST work/heartbeat)", "work.heartbeat"),
    ("tool result POST (POST .../events)", "sessions.events.send"),
)


class Arrivals:
    """Arrival time (perf_counter) and route name of every ``/v1`` request since the last ``reset``."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []

    def reset(self) -> None:
        self.seen = []

    def first(self, route: str | None) -> float:
        for at, name in self.seen:
            if route is None or name == route:
                return at
        raise AssertionError(f"no {route} request; saw {[name for _, name in self.seen]}")

    def install(self, emulator: EmulatorServer) -> None:
        @web.middleware
        async def arrivals(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path.startswith("/v1/"):
                self.seen.append((time.perf_counter(), str(request.match_info.route.name)))
            return await handler(request)

        emulator.app.middlewares.insert(0, arrivals)  # aiohttp freezes the middlewares when the app starts


async def queued_session(emulator: EmulatorServer) -> object:
    async with api_client(emulator) as client:
        pool = self_hosted_environment(emulator, name="bench-worker-warm")
        agent = await scripted_agent(client, SCRIPT, reply="done")
        await client.beta.sessions.create(agent=agent, environment_id=pool.id)
    return pool


async def finished(worker: WorkerProcess) -> None:
    await worker.finish()
    if worker.returncode != 0:
        raise AssertionError(f"worker exited {worker.returncode}: {worker.stderr}")


async def cold_run(emulator: EmulatorServer, arrivals: Arrivals, workdir: Path) -> dict[str, float]:
    pool = await queued_session(emulator)
    contract = await claim(emulator, pool)  # type: ignore[arg-type]
    arrivals.reset()
    started = time.perf_counter()
    worker = await start_worker(contract, workdir, max_idle=0)
    try:
        await finished(worker)
    finally:
        worker.kill()
    return {label: arrivals.first(route) - started for label, route in MARKS}


async def warm_run(
    emulator: EmulatorServer, arrivals: Arrivals, api: FakeInClusterApi, workdir: Path, index: int, settle: float
) -> dict[str, float]:
    pod = f"work-warm-{index}"
    pool = await queued_session(emulator)
    service_account = api.write_service_account(workdir.parent / f"sa-{index}")
    environment = {ASSIGNMENT_VARIABLE: pod, **api.environ(), "ANTHROPIC_BASE_URL": emulator.base_url}
    watches = len(api.watches())
    started = time.perf_counter()
    worker = await start_worker(environment, workdir, max_idle=0,
                                extra_args=["--service-account-dir", str(service_account)])
    try:
        while len(api.watches()) == watches:
            if worker.returncode is not None:
                raise AssertionError(f"warm worker exited {worker.returncode} while waiting")
            await asyncio.sleep(0.005)
        watching = api.watches()[-1].at - started
        await asyncio.sleep(settle)
        contract = await claim(emulator, pool)  # type: ignore[arg-type]
        arrivals.reset()
        api.create_secret(pod, assignment_data(
            contract["ANTHROPIC_WORK_ID"], contract["ANTHROPIC_ENVIRONMENT_ID"],
            contract["ANTHROPIC_SESSION_ID"], contract["ANTHROPIC_WORK_SECRET"]))
        assigned = api.created_at[pod]
        await finished(worker)
    finally:
        worker.kill()
    marks = {label: arrivals.first(route) - assigned for label, route in MARKS}
    marks["process start -> watch open (hidden preparation)"] = watching
    return marks


def report(mode: str, clock: str, runs: list[dict[str, float]]) -> None:
    print(f"\n== {mode}: from {clock} (ms, {len(runs)} runs)")
    print(f"{'':52} {'min':>8} {'p50':>8} {'max':>8}")
    for label in runs[0]:
        values = [run[label] * 1000 for run in runs]
        print(f"{label:52} {min(values):8.1f} {statistics.median(values):8.1f} {max(values):8.1f}")


async def measure(args: argparse.Namespace) -> None:
    emulator = EmulatorServer(api_keys=[API_KEY])
    arrivals = Arrivals()
    arrivals.install(emulator)
    async with emulator, FakeInClusterApi() as api:
        with tempfile.TemporaryDirectory(prefix="bench-warm-") as scratch:
            workdir = Path(scratch) / "workspace"
            workdir.mkdir()
            await cold_run(emulator, arrivals, workdir)  # warm-up: page cache, .pyc
            await warm_run(emulator, arrivals, api, workdir, -1, args.settle)
            cold: list[dict[str, float]] = []
            warm: list[dict[str, float]] = []
            for index in range(args.runs):
                cold.append(await cold_run(emulator, arrivals, workdir))
                warm.append(await warm_run(emulator, arrivals, api, workdir, index, args.settle))
                first = MARKS[0][0]
                print(f"run {index + 1:2}: first request cold {cold[-1][first] * 1000:6.0f} ms, "
                      f"warm {warm[-1][first] * 1000:6.0f} ms", flush=True)
    report("cold", "the exec of the worker process", cold)
    report("warm", "the assignment Secret's creation", warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="pairs of timed runs (after one warm-up pair)")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds a warm worker waits idle, watch open, before it is assigned")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    started = time.perf_counter()
    asyncio.run(measure(args))
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
