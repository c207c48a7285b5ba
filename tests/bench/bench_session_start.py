"""Benchmark: session start latency on the simulated cluster, session created -> first tool result.

Runs what ``environments-operator demo`` runs (``environments_operator.demo.simulated_world``): the
emulator, the simulated cluster with its process kubelet, the real operator as its own
``environments-operator run`` process, and the sample self_hosted Environment and WorkerPool. Each
session of its scripted agent is created through the SDK; the clock stops when the first
``user.tool_result`` lands in the session's events (an emulator subscription). That span holds the
operator's dispatch (poll, Secret, Pod, ack), the process kubelet's start of the pod, and the worker's
cold start (interpreter, SDK imports, session read, stream attach, first tool run), which dominates.

1. **one at a time**: ``--sessions`` sessions, each created once the previous one is served and its pod
   has ended (p50, p99);
2. **burst**: ``--burst`` sessions created at once, with ``maxWorkers`` as large unless ``--max-workers``
   says otherwise (p50, p99 over the sessions, and the time until the last first result).

    PYTHONPATH=. .venv/bin/python tests/bench/bench_session_start.py [--sessions 50] [--burst 50] [--max-workers N]

Every worker pod here is a process on this machine, so a burst's cold starts share its cores: 50 workers
need about 50 x 1.8 s of CPU for their SDK imports, which two cores spread over every one of them.

A script, not a test. On a real cluster the pod's start (scheduling, image pull, container start) adds
to these figures; warm workers (``minWorkers``) are meant to take the worker's cold start off them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from environments_operator.demo import SimulatedWorld, simulated_world  # noqa: E402
from environments_operator.devcluster.kube import PODS  # noqa: E402
from environments_operator.domain.worker_manifests import ANNOTATION_SESSION_ID  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def first_result_after(world: SimulatedWorld, session_id: str, created: float, timeout: float = 300) -> float:
    """Seconds from ``created`` until the session's first ``user.tool_result``."""
    state = world.emulator.state
    session = state.sessions[session_id]
    subscription = state.player.subscribe(session)
    try:
        if any(event["type"] == "user.tool_result" for event in session.events):
            return time.monotonic() - created
        async with asyncio.timeout(timeout):
            while (await subscription.get()).get("type") != "user.tool_result":
                world.check()
        return time.monotonic() - created
    finally:
        state.player.unsubscribe(session, subscription)


async def served_and_gone(world: SimulatedWorld, session_id: str) -> None:
    state = world.emulator.state
    while True:
        items = [item for item in state.work.values() if item.session_id == session_id]
        pods = [p for p in world.kube.list(PODS, "demo")
                if p["metadata"]["annotations"].get(ANNOTATION_SESSION_ID) == session_id]
        if items and all(item.state == "stopped" for item in items) and not pods:
            return
        world.check()
        await asyncio.sleep(0.05)


async def one_at_a_time(world: SimulatedWorld, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        created = time.monotonic()
        session_id = await world.start_session()
        latencies.append(await first_result_after(world, session_id, created))
        await served_and_gone(world, session_id)
    return latencies


async def burst(world: SimulatedWorld, count: int) -> tuple[list[float], float]:
    started = time.monotonic()
    created = []
    for _ in range(count):
        created.append((await world.start_session(), time.monotonic()))
    latencies = await asyncio.gather(*(first_result_after(world, sid, at) for sid, at in created))
    return list(latencies), time.monotonic() - started


def summary(name: str, values: list[float]) -> str:
    return (f"{name:<34} p50 {statistics.median(values):6.2f} s   p99 {percentile(values, 0.99):6.2f} s   "
            f"min {min(values):6.2f} s   max {max(values):6.2f} s   (n={len(values)})")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-session-start-") as workdir:
        async with simulated_world(Path(workdir), max_workers=args.max_workers or max(args.burst, 1)) as world:
            await one_at_a_time(world, 1)  # warm-up: the operator's first dispatch, the OS's caches
            if args.sessions:
                print(summary("one at a time", await one_at_a_time(world, args.sessions)), flush=True)
            if args.burst:
                latencies, last = await burst(world, args.burst)
                print(summary(f"burst of {args.burst}", latencies), flush=True)
                print(f"{'':<34} last first result {last:.2f} s after the burst began", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--max-workers", type=int, default=0,
                        help="the pool's maxWorkers (default: as many as the burst)")
    asyncio.run(main(parser.parse_args()))
