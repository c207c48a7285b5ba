"""Benchmark: the worker's own cold start, process start -> its first tool result posted to the session.

Serves one emulator (``EmulatorServer``) on this script's event loop and, ``--runs`` times, creates a
scripted agent with one step (``bash: true``), a session in a self_hosted environment, claims and acks
its work item as the operator does (``tests.harness.sessions.claim``), then starts the real
``python -m environments_operator worker --max-idle 0`` with exactly the pod contract's variables
(``start_worker``). The clock starts just before that exec and stops when the ``user.tool_result``
event lands in the session's log (an emulator subscription, ``state.player.subscribe``); the worker
must then exit 0. One untimed warm-up run comes first.

Where the time goes: a timing middleware, put at the head of the emulator's middlewares before it
starts, records when each of the worker's requests arrives: the first request of any kind (interpreter
start + imports + client setup), the first heartbeat, the session read, the stream attach, the history
list, the tool result's POST, the stop. Each is printed as a delta from process start (min, p50, p90,
max over the runs), with the median step from the previous row.

Then, as separate processes (median of ``--import-runs`` each): ``python -c pass`` (interpreter start),
``python -X importtime -c "import anthropic.lib.environments"`` (the SDK's import), ``python -c "import
environments_operator.cli as c; c.build_parser()"`` (our CLI alone), and a script that times in-process
the SDK's import, then each piece of ours on top of it (what making ours lazy could save at most), and
its own teardown (``perf_counter`` is CLOCK_MONOTONIC, shared by parent and child). Last, one more worker
run under ``PYTHONPROFILEIMPORTTIME=1`` gives the real startup path's largest imports.

    PYTHONPATH=. .venv/bin/python tests/bench/bench_worker_start.py [--runs 20] [--import-runs 10]

A script, not a test. Shared machines are noisy: read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.emulator import API_KEY, api_client, self_hosted_environment  # noqa: E402
from tests.harness.sessions import WorkerProcess, claim, scripted_agent, start_worker  # noqa: E402

from environments_operator.emulator.server import EmulatorServer  # noqa: E402

SCRIPT = [{"tool": "bash", "input": {"command": "true"}}]
# (label, route name of the request whose first arrival marks it)
PHASES = (
    ("first HTTP request (interpreter + imports + client)", None),
    ("first heartbeat (POST work/heartbeat)", "work.heartbeat"),
    ("session read (GET sessions/{id})", "sessions.retrieve"),
    ("stream attach (GET .../events/stream)", "sessions.events.stream"),
    ("history list (GET .../events)", "sessions.events.list"),
    ("tool result POST arrives (POST .../events)", "sessions.events.send"),
)
RESULT_LABEL = "user.tool_result in the session log  <- the figure"
SDK_PATH = (
    "from anthropic import AsyncAnthropic; from anthropic.lib.environments import EnvironmentWorker; "
    "from anthropic.lib.tools.agent_toolset import AgentToolContext; import asyncio, logging"
)


@dataclasses.dataclass
class Requests:
    """Arrival time (perf_counter) and route name of every ``/v1`` request, since the last ``reset``."""

    seen: list[tuple[float, str]] = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        self.seen = []

    def first(self, route: str | None) -> float | None:
        return next((at for at, name in self.seen if route is None or name == route), None)


def instrument(emulator: EmulatorServer, requests: Requests) -> None:
    """Record each request's arrival, ahead of the emulator's own middlewares (before ``start``)."""

    @web.middleware
    async def arrivals(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            requests.seen.append((time.perf_counter(), str(request.match_info.route.name)))
        return await handler(request)

    emulator.app.middlewares.insert(0, arrivals)


@dataclasses.dataclass
class Run:
    phases: dict[str, float]  # label -> seconds since process start
    routes: list[str]
    cpu: float  # the worker's user + system CPU seconds (and of the children it waited for)


async def one_run(emulator: EmulatorServer, requests: Requests, workdir: Path) -> Run:
    async with api_client(emulator) as api:
        pool = self_hosted_environment(emulator, name="bench-worker-start")
        agent = await scripted_agent(api, SCRIPT, reply="done")
        created = await api.beta.sessions.create(agent=agent, environment_id=pool.id)
    contract = await claim(emulator, pool)
    session = emulator.state.sessions[created.id]
    events = emulator.state.player.subscribe(session)

    async def result_posted() -> float:
        while (await events.get())["type"] != "user.tool_result":
            pass
        return time.perf_counter()

    async def finished(worker: WorkerProcess) -> tuple[WorkerProcess, float]:
        await worker.finish()
        return worker, time.perf_counter()

    requests.reset()
    cpu_before = children_cpu()
    started = time.perf_counter()
    worker = await start_worker(contract, workdir, max_idle=0)
    exiting = asyncio.create_task(finished(worker))
    try:
        result_at = await asyncio.wait_for(result_posted(), 60)
        worker, exited_at = await exiting
    finally:
        worker.kill()
        emulator.state.player.unsubscribe(session, events)
    if worker.returncode != 0:
        raise AssertionError(f"worker exited {worker.returncode}: {worker.stderr}")
    phases: dict[str, float] = {}
    for label, route in PHASES:
        at = requests.first(route)
        if at is None:
            raise AssertionError(f"the worker made no {route} request; it made {[n for _, n in requests.seen]}")
        phases[label] = at - started
    phases[RESULT_LABEL] = result_at - started
    stopped = requests.first("work.stop")
    if stopped is not None:
        phases["item stopped (POST work/stop)"] = stopped - started
    phases["process exited (code 0)"] = exited_at - started
    return Run(phases, [name for _, name in requests.seen], children_cpu() - cpu_before)


def children_cpu() -> float:
    """CPU seconds of this process's reaped children: the runs are sequential, so a delta is one worker's."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spread(values: Sequence[float]) -> tuple[float, float, float, float]:
    """min, p50, p90, max."""
    ordered = sorted(values)
    p90 = statistics.quantiles(ordered, n=10, method="inclusive")[8] if len(ordered) > 1 else ordered[0]
    return ordered[0], statistics.median(ordered), p90, ordered[-1]


def report_runs(runs: list[Run]) -> None:
    labels = [label for label in runs[0].phases if all(label in run.phases for run in runs)]
    labels.sort(key=lambda label: statistics.median(run.phases[label] for run in runs))  # stable: ties keep order
    print(f"\n== worker cold start, delta from process start (ms, {len(runs)} runs), in order of arrival")
    print(f"{'':56} {'min':>7} {'p50':>7} {'p90':>7} {'max':>7}  {'p50 step':>8}")
    previous: str | None = None
    for label in labels:
        low, p50, p90, high = spread([run.phases[label] for run in runs])
        step = "" if previous is None else (
            f"{statistics.median(run.phases[label] - run.phases[previous] for run in runs) * 1000:+8.1f}"
        )
        print(f"{label:56} {low * 1000:7.1f} {p50 * 1000:7.1f} {p90 * 1000:7.1f} {high * 1000:7.1f}  {step:>8}")
        previous = label
    low, p50, p90, high = spread([run.cpu for run in runs])
    print(f"{'worker CPU, user + system (less noisy than wall)':56} {low * 1000:7.1f} {p50 * 1000:7.1f} "
          f"{p90 * 1000:7.1f} {high * 1000:7.1f}")
    order = statistics.mode(" -> ".join(run.routes) for run in runs)
    print(f"requests (most common order): {order}")


async def measure_workers(args: argparse.Namespace) -> tuple[list[Run], str]:
    emulator = EmulatorServer(api_keys=[API_KEY])
    requests = Requests()
    instrument(emulator, requests)  # aiohttp freezes the middlewares when the app starts
    async with emulator:
        with tempfile.TemporaryDirectory(prefix="bench-worker-") as workdir:
            await one_run(emulator, requests, Path(workdir))  # warm-up: page cache, .pyc
            runs: list[Run] = []
            for index in range(args.runs):
                runs.append(await one_run(emulator, requests, Path(workdir)))
                result = runs[-1].phases[RESULT_LABEL]
                print(f"run {index + 1:2}: first tool result {result * 1000:.0f} ms", flush=True)
            profile = await profiled_worker(emulator, Path(workdir))
    return runs, profile


async def profiled_worker(emulator: EmulatorServer, workdir: Path) -> str:
    """One more worker run under ``PYTHONPROFILEIMPORTTIME=1``; returns its stderr (untimed)."""
    async with api_client(emulator) as api:
        pool = self_hosted_environment(emulator, name="bench-worker-importtime")
        agent = await scripted_agent(api, SCRIPT, reply="done")
        await api.beta.sessions.create(agent=agent, environment_id=pool.id)
    contract = await claim(emulator, pool)
    os.environ["PYTHONPROFILEIMPORTTIME"] = "1"  # start_worker passes this process's environment on
    try:
        worker = await start_worker(contract, workdir, max_idle=0)
    finally:
        del os.environ["PYTHONPROFILEIMPORTTIME"]
    await worker.finish()
    assert worker.returncode == 0, worker.stderr
    return worker.stderr


# ----- separate processes -----------------------------------------------------------------------------

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
# In one process: the SDK as the worker imports it, then each piece of ours on top (what making it lazy
# could save at most, with everything the SDK shares already loaded), and the modules only ours brought.
MARGINAL = f"""
import importlib, json, sys, time
marks = [time.perf_counter()]
import anthropic.lib.environments
marks.append(time.perf_counter())
{SDK_PATH}
marks.append(time.perf_counter())
before = set(sys.modules)
import environments_operator
marks.append(time.perf_counter())
import environments_operator.cli as cli
marks.append(time.perf_counter())
import environments_operator.worker
marks.append(time.perf_counter())
for name in ("environments_operator.run", "environments_operator.emulator.cli", "environments_operator.crdgen"):
    importlib.import_module(name)
marks.append(time.perf_counter())
cli.build_parser()
marks.append(time.perf_counter())
new = sorted(set(sys.modules) - before)
print(json.dumps({{"marks": marks, "new": new, "end": time.perf_counter()}}), flush=True)
"""
MARGINAL_STEPS = (
    "in-process: import anthropic.lib.environments",
    "in-process: the rest of the worker's SDK imports (client, agent toolset)",
    "then ours: import environments_operator (__init__: importlib.metadata.version)",
    "then ours: import environments_operator.cli (argparse)",
    "then ours: import environments_operator.worker",
    "then ours: import run, emulator.cli, crdgen (build_parser imports them all)",
    "then ours: build_parser() itself, modules cached",
)


@dataclasses.dataclass(frozen=True)
class Ran:
    started: float  # perf_counter just before the exec; CLOCK_MONOTONIC, the same clock as the child's
    ended: float  # when it had exited and its pipes were read
    stdout: str
    stderr: str


def wall(argv: Sequence[str], times: int) -> tuple[float, list[Ran]]:
    """Median wall time of ``times`` runs of ``argv`` (seconds), and each run."""
    runs: list[Ran] = []
    for _ in range(times):
        started = time.perf_counter()
        done = subprocess.run(argv, env=CLEAN_ENV, capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(Ran(started, time.perf_counter(), done.stdout, done.stderr))
    return statistics.median(run.ended - run.started for run in runs), runs


@dataclasses.dataclass(frozen=True)
class Import:
    self_us: int
    cumulative_us: int
    depth: int
    name: str


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> list[Import]:
    found = []
    for line in stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            self_us, cumulative_us, indent, name = match.groups()
            found.append(Import(int(self_us), int(cumulative_us), (len(indent) - 1) // 2, name))
    return found


def top_level(imports: list[Import]) -> list[Import]:
    """Imports not made by another import (``importlib.import_module`` calls are not reported at all)."""
    return [entry for entry in imports if entry.depth == 0]


def report_processes(args: argparse.Namespace, profile: str) -> None:
    python = sys.executable
    n = args.import_runs
    print(f"\n== separate processes (medians of {n} runs each, ms)")
    interpreter, _ = wall([python, "-c", "pass"], n)
    sdk_profiled, profiled = wall([python, "-X", "importtime", "-c", "import anthropic.lib.environments"], n)
    sdk_counted = statistics.median(
        sum(e.cumulative_us for e in top_level(parse_importtime(run.stderr)) if e.name.startswith("anthropic"))
        for run in profiled
    ) / 1e6
    cli, _ = wall([python, "-c", "import environments_operator.cli as c; c.build_parser()"], n)
    marginal_wall, marginal = wall([python, "-c", MARGINAL], n)
    results = [json.loads(run.stdout) for run in marginal]
    steps = [statistics.median(r["marks"][i + 1] - r["marks"][i] for r in results) for i in range(len(MARGINAL_STEPS))]
    # perf_counter is CLOCK_MONOTONIC on Linux: the child's marks and our exec/exit times share one clock.
    boot = statistics.median(r["marks"][0] - run.started for r, run in zip(results, marginal, strict=True))
    teardown = statistics.median(run.ended - r["end"] for r, run in zip(results, marginal, strict=True))
    rows = [
        ("wall: python -c pass (interpreter start and exit)", interpreter),
        ('wall: python -X importtime -c "import anthropic.lib.environments"', sdk_profiled),
        ("  the SDK's import as -X importtime counts it (cumulative)", sdk_counted),
        ('wall: python -c "import environments_operator.cli as c; c.build_parser()"', cli),
        ("wall: SDK (worker's imports) + all of ours, the script below", marginal_wall),
        ("  exec -> the script's first line (interpreter start, site)", boot),
        *(("  " + label, step) for label, step in zip(MARGINAL_STEPS, steps, strict=True)),
        ("  the script's last line -> exited (interpreter teardown with the SDK loaded)", teardown),
    ]
    for label, seconds in rows:
        print(f"{label:80} {seconds * 1000:8.1f}")
    print(f"-> interpreter start {boot * 1000:.0f} ms; SDK import {steps[0] * 1000:.0f} ms "
          f"(+{steps[1] * 1000:.0f} ms for the rest of its worker path); teardown {teardown * 1000:.0f} ms")
    ours = sum(steps[2:])
    print(f"-> all of ours on top of the SDK: {ours * 1000:.1f} ms; modules only ours load: "
          f"{', '.join(results[0]['new'])}")

    imports = parse_importtime(profile)
    print("\n== the worker's real startup path under PYTHONPROFILEIMPORTTIME (one run, inflated by it; ms)")
    print("top 5 top-level imports by cumulative time:")
    for entry in sorted(top_level(imports), key=lambda e: -e.cumulative_us)[:5]:
        print(f"  {entry.cumulative_us / 1000:8.1f}  {entry.name}")
    print("top 5 modules by self time:")
    for entry in sorted(imports, key=lambda e: -e.self_us)[:5]:
        print(f"  {entry.self_us / 1000:8.1f}  {entry.name}")
    print("ours (top-level, cumulative / self):")
    for entry in top_level(imports):
        if entry.name.split(".")[0] == "environments_operator":
            print(f"  {entry.cumulative_us / 1000:8.1f} / {entry.self_us / 1000:.1f}  {entry.name}")
    total = sum(entry.cumulative_us for entry in top_level(imports)) / 1000
    print(f"all imports: {total:.0f} ms in {len(imports)} modules")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed worker runs (after one warm-up)")
    parser.add_argument("--import-runs", type=int, default=10, help="runs of each separate-process figure")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    runs, profile = asyncio.run(measure_workers(args))
    report_runs(runs)
    report_processes(args, profile)
    took = time.perf_counter() - started
    print(f"\n(benchmark took {took:.0f} s; load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
