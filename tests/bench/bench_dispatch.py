"""Benchmark: WorkerPool dispatch (claim → Secret → Pod → ack) on the emulator and the fake apiserver.

Runs the shipped operator (kopf's default registry with every handler of the package, production kopf
settings, configured through environment variables) against kmock (``environments_operator.devcluster.kube``) and the
emulator, both on this script's event loop, and prints four figures:

1. **single-item latency**: enqueue → its pod exists *and* the item is acknowledged, one item at a time
   with the queue otherwise idle (p50, p99 over ``--singles`` items);
2. **burst**: the time until ``--burst`` items queued at once all have a pod and are acknowledged,
   checked exactly-once (one pod, one successful ack per item);
3. **burst, reference loop**: the same burst through the loop the SDK documents for drain-and-dispatch
   (``work.poller(drain=True, auto_stop=False)``, then create the Secret and the Pod, in order), with the
   same Kubernetes adapter; printed as the ratio reference / ours (how many times faster ours is);
4. **idle cost**: Environments API and Kubernetes API requests per minute of one idle pool, counted
   over ``--idle-seconds``.

Times are taken where the work lands: the pod's ADDED event in the fake apiserver and the ack's answer
in the emulator, against the enqueue time. Every phase repeats ``--rounds`` times; medians are printed.

    .venv/bin/python tests/bench/bench_dispatch.py [--singles 100] [--burst 500] [--rounds 3] [--idle-seconds 20]

A script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.emulator import API_KEY, enqueue_sessions, self_hosted_environment  # noqa: E402
from tests.harness.operator import run_operator_process  # noqa: E402

from environments_operator.adapters.kube import KubeClient  # noqa: E402
from environments_operator.devcluster.kube import PODS, SECRETS, WORKERPOOLS, Kube, start_kube  # noqa: E402
from environments_operator.domain.worker_manifests import (  # noqa: E402
    PoolIdentity,
    WorkAssignment,
    build_work_secret,
    build_worker_pod,
)
from environments_operator.emulator.server import EmulatorServer  # noqa: E402

NAMESPACE = "bench"
KEY_SECRET = "env-key"
WORKER_IMAGE = "registry.example/worker:bench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Clock:
    """When each work item's pod appeared and its ack was answered (perf_counter seconds)."""

    def __init__(self) -> None:
        self.pod_added: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.requests: list[tuple[float, str]] = []
        self.changed = asyncio.Event()

    def done(self, work_id: str) -> float | None:
        if work_id in self.pod_added and work_id in self.acked:
            return max(self.pod_added[work_id], self.acked[work_id])
        return None


def instrument(emulator: EmulatorServer, clock: Clock) -> None:
    @web.middleware
    async def recorder(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        response = await handler(request)
        now = time.perf_counter()
        if request.path.startswith("/v1/"):
            clock.requests.append((now, f"{request.method} {request.match_info.route.name}"))
        if request.path.endswith("/ack") and response.status == 200:
            clock.acked.setdefault(request.path.split("/")[-2], now)
            clock.changed.set()
        return response

    emulator.app.middlewares.insert(0, recorder)


async def watch_pods(kube: Kube, clock: Clock) -> None:
    async for change in kube.changes(PODS):
        if change.type == "ADDED":
            work_id = change.object["metadata"]["annotations"]["managedagents.dev/work-id"]
            clock.pod_added.setdefault(work_id, time.perf_counter())
            clock.changed.set()


async def wait_all_done(clock: Clock, work_ids: list[str], timeout: float = 300) -> float:
    """The time the last of ``work_ids`` had both its pod and its ack."""
    deadline = time.perf_counter() + timeout
    while True:
        times = [clock.done(work_id) for work_id in work_ids]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None)
        if time.perf_counter() > deadline:
            missing = sum(t is None for t in times)
            raise TimeoutError(f"{missing} of {len(work_ids)} items not dispatched after {timeout}s")
        clock.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(clock.changed.wait(), 1.0)


def pool_body(environment_id: str, name: str, max_workers: int) -> dict[str, Any]:
    return {"apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"environmentId": environment_id, "maxWorkers": max_workers,
                     "environmentKeySecretRef": {"name": KEY_SECRET, "key": "key"},
                     "startupTimeoutSeconds": 3600, "ttlSecondsAfterFinished": 3600}}


def check_exactly_once(kube: Kube, emulator: EmulatorServer, work_ids: list[str], label: str) -> None:
    pods = collections.Counter(p["metadata"]["annotations"]["managedagents.dev/work-id"]
                               for p in kube.list(PODS, NAMESPACE))
    assert all(pods[w] == 1 for w in work_ids), f"{label}: an item has no pod or several"
    assert all(emulator.state.work[w].state == "starting" for w in work_ids), f"{label}: an item was not acked"


async def reference_loop(base_url: str, environment_id: str, environment_key: str, uid: str, count: int) -> None:
    """The drain-and-dispatch loop as the SDK documents it, with the operator's own Kubernetes adapter.

    Everything is imported and connected first; the loop starts when the parent says "go" (after it
    queued the burst and started its clock), so that process start-up is not counted against it.
    """
    from anthropic import AsyncAnthropic

    kube = KubeClient()
    pool = PoolIdentity(namespace=NAMESPACE, name="reference", uid=uid)
    dispatched = 0
    async with AsyncAnthropic(base_url=base_url, api_key=API_KEY) as client:
        # Warm both connection pools, as a long-running process would have them.
        await client.beta.environments.retrieve(environment_id)
        await kube.list("Secret", NAMESPACE, "app.kubernetes.io/managed-by=environments-operator")
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        while dispatched < count:
            async for item in client.beta.environments.work.poller(
                environment_id=environment_id, environment_key=environment_key, drain=True, auto_stop=False,
            ):
                assert item.secret is not None
                work = WorkAssignment(work_id=item.id, environment_id=environment_id, session_id=item.data.id,
                                      secret=item.secret)
                pod = await kube.create("Pod", NAMESPACE, build_worker_pod(
                    pool, work, template={}, default_image=WORKER_IMAGE, base_url=base_url, max_idle_seconds=60))
                assert pod is not None
                await kube.create("Secret", NAMESPACE, build_work_secret(pool, work, pod_uid=pod["metadata"]["uid"]))
                dispatched += 1
    kube.close()


@contextlib.asynccontextmanager
async def world(workdir: Path) -> AsyncIterator[tuple[Kube, EmulatorServer, Clock, Any]]:
    clock = Clock()
    async with start_kube(workdir) as kube:
        for crd in ("environments", "workerpools"):
            kube.install_crd(yaml.safe_load((ROOT / "crds" / f"{crd}.managedagents.dev.yaml").read_text()))
        emulator = EmulatorServer(api_keys=[API_KEY])
        instrument(emulator, clock)
        async with emulator:
            environment = self_hosted_environment(emulator, "bench")
            kube.ensure_namespace(NAMESPACE)
            kube.create(SECRETS, {"metadata": {"name": KEY_SECRET, "namespace": NAMESPACE},
                                  "data": {"key": base64.b64encode(environment.key.encode()).decode()}}, NAMESPACE)
            watcher = asyncio.create_task(watch_pods(kube, clock))
            try:
                yield kube, emulator, clock, environment
            finally:
                watcher.cancel()


async def wait_idle(kube: Kube, clock: Clock, settle: float = 11.0) -> None:
    """Until the pool is in its steady idle state: first status written, then one full stats interval
    (whose status write reports the pool's own poller in ``workersPolling``)."""
    await kube.wait_until(lambda: ((kube.get(WORKERPOOLS, "pool", NAMESPACE) or {}).get("status") or {})
                          .get("conditions"), timeout=30, message="the pool's first status")
    await asyncio.sleep(settle)


async def measure_singles(kube: Kube, emulator: EmulatorServer, clock: Clock, environment: Any,
                          count: int) -> list[float]:
    latencies = []
    for index in range(count):
        # Land at a random point of the idle long-poll, as real sessions do.
        await asyncio.sleep(0.05 + (index * 0.037) % 0.3)
        start = time.perf_counter()
        (item,) = enqueue_sessions(emulator, environment.id, 1)
        await wait_all_done(clock, [item.id], timeout=30)
        done = clock.done(item.id)
        assert done is not None
        latencies.append(done - start)
    return latencies


async def reference_burst(kube: Kube, emulator: EmulatorServer, clock: Clock, environment: Any, count: int, *,
                          show_cpu: bool) -> float:
    """Time a burst through ``reference_loop``, run in its own process as the operator runs in its own."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--reference-child", emulator.base_url, environment.id, environment.key,
        str(count), env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    start = time.perf_counter()
    work_ids = [item.id for item in enqueue_sessions(emulator, environment.id, count)]
    process.stdin.write(b"go\n")
    await process.stdin.drain()
    cpu_before = (cpu_seconds(process.pid), time.process_time())
    done = await wait_all_done(clock, work_ids) - start
    if show_cpu:
        print(f"  reference burst CPU: loop {cpu_seconds(process.pid) - cpu_before[0]:.2f} s, "
              f"apiserver+emulator {time.process_time() - cpu_before[1]:.2f} s", flush=True)
    if await process.wait() != 0:
        raise RuntimeError("the reference loop failed")
    check_exactly_once(kube, emulator, work_ids, "reference")
    return done


@dataclasses.dataclass
class Figures:
    singles_p50: list[float] = dataclasses.field(default_factory=list)
    singles_p99: list[float] = dataclasses.field(default_factory=list)
    ours: list[float] = dataclasses.field(default_factory=list)
    reference: list[float] = dataclasses.field(default_factory=list)
    idle_api: list[float] = dataclasses.field(default_factory=list)
    idle_kube: list[float] = dataclasses.field(default_factory=list)


async def measure_round(args: argparse.Namespace, api_latency_ms: int, figures: Figures) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with world(Path(tmp)) as (kube, emulator, clock, environment):
            if api_latency_ms:
                # Every Environments API request waits this long before it is handled: a remote API's
                # round trip. The fake apiserver stays local, as an in-cluster apiserver is.
                emulator.faults.add({"faults": [{"route": "*", "effect": "latency", "latency_ms": api_latency_ms}]})
            operator_env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": emulator.base_url,
                            "ENVIRONMENTS_OPERATOR_WORKER_IMAGE": WORKER_IMAGE,
                            "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0"}
            async with run_operator_process(kube, args=("run", "--namespace", NAMESPACE, "--standalone"),
                                            env=operator_env, watching=((WORKERPOOLS, NAMESPACE),)) as operator:
                kube.create(WORKERPOOLS, pool_body(environment.id, "pool", args.burst + args.singles + 10),
                            NAMESPACE)
                await wait_idle(kube, clock)

                # Idle cost: every request one idle pool makes, to either API.
                since_api, since_kube = len(clock.requests), len(kube.calls)
                await asyncio.sleep(args.idle_seconds)
                per_minute = 60.0 / args.idle_seconds
                figures.idle_api.append((len(clock.requests) - since_api) * per_minute)
                figures.idle_kube.append(sum(1 for c in kube.calls[since_kube:] if c.verb != "watch") * per_minute)

                # Single items on an idle queue.
                latencies = sorted(await measure_singles(kube, emulator, clock, environment, args.singles))
                figures.singles_p50.append(statistics.median(latencies))
                figures.singles_p99.append(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))])

                # The burst through the operator.
                await asyncio.sleep(1.0)
                cpu_before = (cpu_seconds(operator.process.pid), time.process_time())
                start = time.perf_counter()
                work_ids = [item.id for item in enqueue_sessions(emulator, environment.id, args.burst)]
                figures.ours.append(await wait_all_done(clock, work_ids) - start)
                if args.cpu:
                    print(f"  burst CPU: operator {cpu_seconds(operator.process.pid) - cpu_before[0]:.2f} s, "
                          f"apiserver+emulator {time.process_time() - cpu_before[1]:.2f} s", flush=True)
                check_exactly_once(kube, emulator, work_ids, "operator")
                acks = collections.Counter(route for _, route in clock.requests if route == "POST work.ack")
                assert acks["POST work.ack"] >= args.burst + args.singles

            # The same burst through the documented reference loop (the operator has stopped).
            figures.reference.append(await reference_burst(kube, emulator, clock, environment, args.burst,
                                                           show_cpu=args.cpu))


def report(title: str, args: argparse.Namespace, figures: Figures) -> None:
    ours, reference = statistics.median(figures.ours), statistics.median(figures.reference)
    print(f"\n== {title} (medians of {args.rounds} rounds)")
    print(f"single-item dispatch latency, enqueue -> pod exists and item acked ({args.singles} items, idle queue): "
          f"p50 {statistics.median(figures.singles_p50) * 1000:.1f} ms, "
          f"p99 {statistics.median(figures.singles_p99) * 1000:.1f} ms")
    print(f"burst of {args.burst} items, exactly-once checked: {ours:.2f} s ({args.burst / ours:.0f} items/s)")
    print(f"same burst, SDK-documented drain-and-dispatch loop: {reference:.2f} s -> ours/reference = "
          f"{ours / reference:.2f} (ours {reference / ours:.1f}x faster)")
    print(f"idle cost per pool: {statistics.median(figures.idle_api):.0f} Environments API requests/min, "
          f"{statistics.median(figures.idle_kube):.1f} Kubernetes API requests/min (watch streams not counted)")


async def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    for api_latency_ms in args.api_latency_ms:
        title = f"Environments API round trip +{api_latency_ms} ms" if api_latency_ms else "loopback, no added latency"
        figures = Figures()
        for round_ in range(args.rounds):
            await measure_round(args, api_latency_ms, figures)
            print(f"[{title}] round {round_ + 1}: single p50 {figures.singles_p50[-1] * 1000:.1f} ms, "
                  f"p99 {figures.singles_p99[-1] * 1000:.1f} ms; burst {figures.ours[-1]:.2f} s vs reference "
                  f"{figures.reference[-1]:.2f} s; idle {figures.idle_api[-1]:.0f} API + "
                  f"{figures.idle_kube[-1]:.1f} Kubernetes requests/min", flush=True)
        report(title, args, figures)


def main() -> None:
    if sys.argv[1:2] == ["--reference-child"]:
        base_url, environment_id, key, count = sys.argv[2:6]
        asyncio.run(reference_loop(base_url, environment_id, key, "00000000-0000-4000-8000-000000000000",
                                   int(count)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--singles", type=int, default=100)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--api-latency-ms", type=lambda text: [int(v) for v in text.split(",")], default=[0, 20],
                        help="comma-separated added Environments API round trips to measure (default 0,20)")
    parser.add_argument("--cpu", action="store_true", help="also print the CPU time of each burst")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
