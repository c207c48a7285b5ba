"""Benchmark: session start latency with warm workers (``minWorkers: 2``) against cold starts (issue 13).

One run, one simulated cluster: the fake apiserver (``start_kube``), the emulator with one self_hosted
environment, the real operator in-process (kopf on its own thread and loop, ``run_operator``, as in
tests/e2e/conftest.py's ``workerpool_world``) and the process kubelet (every pod a real local
``environments-operator worker``, warm pods in warm mode through the in-cluster front). One WorkerPool,
``maxWorkers: 4``:

1. **cold**: ``minWorkers: 0``; ``--sessions`` one-step sessions (``bash: echo hi``), one at a time: each
   is created once the previous one is served (item stopped) and no pod of the pool is left unfinished;
2. **warm**: the same pool patched to ``minWorkers: 2``; the same sessions, one at a time: each is created
   once the previous one is served and two unbound warm pods run again, each with its assignment watch
   open (its worker has imported the SDK and waits).

Each phase starts with one untimed warm-up session. Latency = session created (just before the SDK's
``sessions.create``) -> its first ``user.tool_result`` event (an emulator subscription).

The operator's share, from ``DISPATCH_LATENCY`` (operator/environments_operator/metrics.py): every
``observe`` of its stage children is recorded in-process (exact values, not the histogram's buckets).
For a warm pod stage ``released`` ends after the assignment Secret's create *and* the pod's "assigned"
annotation patch; so the Secret's own moment is also taken from the fake apiserver's commit of it
(``claim -> assignment Secret stored``, claim time = the released observation's time minus its value; the
operator's ``ctx.now()`` is ``loop.time()``, the same monotonic clock).

Cost, from the fake apiserver's record: the operator's requests and created objects per session in each
phase (their difference is what a warm pod adds), the warm pods' own requests through the in-cluster
front, and an idle pool with ``minWorkers: 2`` over ``--idle`` seconds.

    PYTHONPATH=operator:. .venv/bin/python tests/bench/bench_warm_start.py [--sessions 50] [--idle 10]

A script, not a test. Every pod is a process on this machine: read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))

from tests.harness.emulator import API_KEY, api_client, self_hosted_environment  # noqa: E402
from tests.harness.sessions import scripted_agent  # noqa: E402

from environments_operator import metrics  # noqa: E402
from environments_operator.devcluster import kube as kube_module  # noqa: E402
from environments_operator.devcluster.kube import PODS, SECRETS, WORKERPOOLS, Kube, start_kube  # noqa: E402
from environments_operator.devcluster.process_kubelet import ProcessKubelet  # noqa: E402
from environments_operator.emulator.server import EmulatorServer  # noqa: E402

NAMESPACE = "ns"
KEY_SECRET = "env-key"
POOL = "pool"
WORKER_IMAGE = "registry.example/worker:bench-warm"
SCRIPT = [{"tool": "bash", "input": {"command": "echo hi"}}]
WARM = {"managedagents.dev/warm": "true"}
WARM_POD_LABEL = "managedagents.dev/warm-pod"
STAGES = ("pod_created", "acked", "released")


@dataclass
class Record:
    """What the operator and the apiserver did, with monotonic times (thread-safe appends)."""

    stages: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: {s: [] for s in STAGES})
    assignment_secrets: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def since(self, stage: str, moment: float) -> list[tuple[float, float]]:
        return [(at, value) for at, value in self.stages[stage] if at >= moment]


def instrument(record: Record) -> None:
    """Record every DISPATCH_LATENCY observation, and when each warm pod's assignment Secret is stored."""
    for stage in STAGES:
        child = metrics.DISPATCH_LATENCY.labels(stage=stage)
        original = child.observe

        def observe(amount: float, *args: Any, _stage: str = stage, _original: Any = original, **kw: Any) -> None:
            with record.lock:
                record.stages[_stage].append((time.monotonic(), float(amount)))
            _original(amount, *args, **kw)

        child.observe = observe  # type: ignore[method-assign]

    commit = kube_module.FakeApiServer._commit

    def _commit(self: Any, resource: Any, change_type: str, new: Any, previous: Any) -> Any:
        if resource.key == SECRETS.key and change_type == "ADDED" \
                and WARM_POD_LABEL in ((new.get("metadata") or {}).get("labels") or {}):
            with record.lock:
                record.assignment_secrets.append((time.monotonic(), str(new["metadata"]["name"])))
        return commit(self, resource, change_type, new, previous)

    kube_module.FakeApiServer._commit = _commit  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def bench_world(workdir: Path) -> AsyncIterator[tuple[Kube, EmulatorServer, ProcessKubelet, Any]]:
    """tests/e2e/conftest.py's ``workerpool_world`` + ``process_kubelet``, outside pytest (as bench_soak does)."""
    import kopf
    from tests.e2e.conftest import ENVIRONMENTS_CRD, WORKERPOOLS_CRD
    from tests.harness.operator import run_operator

    import environments_operator.handlers  # noqa: F401  (registers the handlers)
    from environments_operator.handlers.startup import apply_kopf_settings

    async with start_kube(workdir) as kube:
        kube.install_crd(ENVIRONMENTS_CRD)
        kube.install_crd(WORKERPOOLS_CRD)
        emulator = EmulatorServer(api_keys=[API_KEY])
        async with emulator:
            environment = self_hosted_environment(emulator, "workers")
            kube.ensure_namespace(NAMESPACE)
            kube.create(SECRETS, {"metadata": {"name": KEY_SECRET, "namespace": NAMESPACE},
                                  "data": {"key": base64.b64encode(environment.key.encode()).decode()}}, NAMESPACE)
            os.environ.update({"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": emulator.base_url,
                               "ENVIRONMENTS_OPERATOR_WORKER_IMAGE": WORKER_IMAGE,
                               "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "3600",
                               "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0",
                               "KUBECONFIG": str(kube.kubeconfig)})
            async with run_operator(kube, registry=kopf.get_default_registry(), namespaces=[NAMESPACE],
                                    settings_hook=apply_kopf_settings, log_level=logging.INFO) as operator:
                kubelet = ProcessKubelet(kube, images={WORKER_IMAGE}, root=workdir / "node")
                kubelet.start()
                try:
                    kube.create(WORKERPOOLS, {
                        "apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
                        "metadata": {"name": POOL, "namespace": NAMESPACE},
                        "spec": {"environmentId": environment.id,
                                 "environmentKeySecretRef": {"name": KEY_SECRET, "key": "key"},
                                 "minWorkers": 0, "maxWorkers": 4, "maxIdleSeconds": 0,
                                 "startupTimeoutSeconds": 300, "ttlSecondsAfterFinished": 1,
                                 "poll": {"blockMs": 200, "reclaimOlderThanMs": 1000}}}, namespace=NAMESPACE)
                    yield kube, emulator, kubelet, operator
                finally:
                    await kubelet.stop()


def pool_pods(kube: Kube) -> list[dict[str, Any]]:
    return kube.list(PODS, NAMESPACE, {"managedagents.dev/worker-pool": POOL})


def unfinished(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def watching_pods(kube: Kube) -> set[str]:
    """Pods (by ServiceAccount name, which is the warm pod's name) that opened a watch through the front."""
    return {user.rsplit(":", 1)[-1] for user, call in kube.server.incluster_calls if call.verb == "watch"}


def ready_warm(kube: Kube) -> list[str]:
    watching = watching_pods(kube)
    return [p["metadata"]["name"] for p in kube.list(PODS, NAMESPACE, WARM)
            if not p["metadata"].get("deletionTimestamp")
            and not (p["metadata"].get("annotations") or {}).get("managedagents.dev/work-id")
            and (p.get("status") or {}).get("phase") == "Running" and p["metadata"]["name"] in watching]


async def first_result_after(emulator: EmulatorServer, session_id: str, created: float, timeout: float = 120) -> float:
    state = emulator.state
    session = state.sessions[session_id]
    subscription = state.player.subscribe(session)
    try:
        if any(event["type"] == "user.tool_result" for event in session.events):
            return time.monotonic() - created
        async with asyncio.timeout(timeout):
            while (await subscription.get()).get("type") != "user.tool_result":
                pass
        return time.monotonic() - created
    finally:
        state.player.unsubscribe(session, subscription)


@dataclass
class Sample:
    latency: float
    stages: dict[str, float]
    secret_share: float | None  # claim -> assignment Secret stored (warm only)
    pod: str | None


def diagnose(kube: Kube, emulator: EmulatorServer, session_id: str, operator: Any, kubelet: ProcessKubelet) -> None:
    """What a session that got no tool result within the timeout left behind."""
    print(f"\n!! session {session_id}: no user.tool_result in time", flush=True)
    for item in emulator.state.work.values():
        if item.session_id == session_id:
            print(f"   work item {item.id}: {item.state}")
    for pod in pool_pods(kube):
        meta = pod["metadata"]
        print(f"   pod {meta['name']}: {(pod.get('status') or {}).get('phase')} "
              f"labels={meta.get('labels')} annotations={meta.get('annotations')} "
              f"exit={kubelet.exit_codes.get(meta['name'])}")
        with contextlib.suppress(Exception):
            print("     log tail: " + " | ".join(kubelet.log(meta["name"]).splitlines()[-8:]))
    for record in list(getattr(operator, "logs", []))[-15:]:
        print(f"   operator {record.levelname}: {record.getMessage()[:300]}")
    print(f"   events: {[e['type'] for e in emulator.state.sessions[session_id].events]}", flush=True)


async def one_session(kube: Kube, emulator: EmulatorServer, api: Any, agent: str, record: Record,
                      environment_id: str, warm: bool, operator: Any = None, kubelet: Any = None,
                      timeout: float = 60) -> Sample:
    created = time.monotonic()
    session = await api.beta.sessions.create(agent=agent, environment_id=environment_id)
    state = emulator.state
    try:
        latency = await first_result_after(emulator, session.id, created, timeout)
    except TimeoutError:
        diagnose(kube, emulator, session.id, operator, kubelet)
        raise

    def served() -> bool:
        items = [i for i in state.work.values() if i.session_id == session.id]
        if not items or not all(i.state == "stopped" for i in items):
            return False
        if warm:
            return len(ready_warm(kube)) >= 2
        return not any(unfinished(p) for p in pool_pods(kube))

    await kube.wait_until(served, timeout=timeout, message=lambda: f"session {session.id} served and settled")
    stages = {}
    for stage in STAGES:
        seen = record.since(stage, created)
        if seen:
            stages[stage] = seen[0][1]
    share, pod = None, None
    released = record.since("released", created)
    secrets = [(at, name) for at, name in record.assignment_secrets if at >= created]
    if warm and released and secrets:
        claimed_at = released[0][0] - released[0][1]
        share, pod = secrets[0][0] - claimed_at, secrets[0][1]
    return Sample(latency, stages, share, pod)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def request_counts(kube: Kube, start: int, end: int) -> collections.Counter[str]:
    return collections.Counter(f"{c.verb} {c.resource}{'/' + c.subresource if c.subresource else ''}"
                               for c in kube.server.calls[start:end])


Phase = tuple[list[Sample], collections.Counter[str], collections.Counter[str], int]


async def run_phase(name: str, kube: Kube, emulator: EmulatorServer, api: Any, agent: str, record: Record,
                    environment_id: str, count: int, warm: bool, operator: Any, kubelet: ProcessKubelet) -> Phase:
    await one_session(kube, emulator, api, agent, record, environment_id, warm, operator, kubelet)  # warm-up, untimed
    calls_from, front_from = len(kube.server.calls), len(kube.server.incluster_calls)
    samples = []
    for index in range(count):
        samples.append(await one_session(kube, emulator, api, agent, record, environment_id, warm, operator, kubelet))
        share = f", claim->assignment Secret {samples[-1].secret_share * 1000:5.1f} ms" \
            if samples[-1].secret_share is not None else ""
        print(f"{name} {index + 1:3}: {samples[-1].latency * 1000:7.0f} ms{share}", flush=True)
    front = collections.Counter(f"{c.verb} {c.resource}" for _, c in kube.server.incluster_calls[front_from:])
    return samples, request_counts(kube, calls_from, len(kube.server.calls)), front, count


def line(name: str, values: list[float], unit: str = "ms") -> str:
    scale = 1000 if unit == "ms" else 1
    return (f"{name:<44} p50 {statistics.median(values) * scale:8.1f}  p99 {percentile(values, 0.99) * scale:8.1f}"
            f"  min {min(values) * scale:8.1f}  max {max(values) * scale:8.1f} {unit}  (n={len(values)})")


async def measure(args: argparse.Namespace) -> None:
    record = Record()
    instrument(record)
    with tempfile.TemporaryDirectory(prefix="bench-warm-start-") as workdir:
        async with bench_world(Path(workdir)) as (kube, emulator, kubelet, operator):
            environment_id = kube.get(WORKERPOOLS, POOL, NAMESPACE)["spec"]["environmentId"]
            async with api_client(emulator) as api:
                agent = await scripted_agent(api, SCRIPT, reply="done")
                cold, cold_calls, _, n_cold = await run_phase("cold", kube, emulator, api, agent, record,
                                                              environment_id, args.sessions, warm=False,
                                                              operator=operator, kubelet=kubelet)
                kube.patch(WORKERPOOLS, POOL, {"spec": {"minWorkers": 2}}, NAMESPACE)
                await kube.wait_until(lambda: len(ready_warm(kube)) >= 2, timeout=120, message="2 warm pods ready")
                warm, warm_calls, warm_front, n_warm = await run_phase("warm", kube, emulator, api, agent, record,
                                                                       environment_id, args.sessions, warm=True,
                                                                       operator=operator, kubelet=kubelet)
                idle_calls, idle_front = None, None
                if args.idle > 0:
                    calls_from, front_from = len(kube.server.calls), len(kube.server.incluster_calls)
                    await asyncio.sleep(args.idle)
                    idle_calls = request_counts(kube, calls_from, len(kube.server.calls))
                    idle_front = collections.Counter(
                        f"{c.verb} {c.resource}" for _, c in kube.server.incluster_calls[front_from:])

    print("\n== session created -> first user.tool_result (one at a time, maxWorkers 4)")
    print(line("cold (minWorkers 0)", [s.latency for s in cold]))
    print(line("warm (minWorkers 2)", [s.latency for s in warm]))
    cold_p50, warm_p50 = statistics.median(s.latency for s in cold), statistics.median(s.latency for s in warm)
    cold_p99, warm_p99 = percentile([s.latency for s in cold], 0.99), percentile([s.latency for s in warm], 0.99)
    print(f"{'ratio warm/cold':<44} p50 {warm_p50 / cold_p50:8.3f}  p99 {warm_p99 / cold_p99:8.3f}"
          "   (target p50 <= 0.3)")
    print("\n== operator's share: DISPATCH_LATENCY observations (claim -> stage), in-process")
    for name, samples in (("cold", cold), ("warm", warm)):
        for stage in STAGES:
            values = [s.stages[stage] for s in samples if stage in s.stages]
            if values:
                print(line(f"{name} {stage}", values))
    shares = [s.secret_share for s in warm if s.secret_share is not None]
    if shares:
        print(line("warm claim -> assignment Secret stored", shares) + "   (target p50 <= 20 ms)")
    print("\n== cost (fake apiserver record)")
    for name, calls, n in (("cold", cold_calls, n_cold), ("warm", warm_calls, n_warm)):
        print(f"operator requests per session, {name}: {sum(calls.values()) / n:.1f}")
    every = sorted(set(cold_calls) | set(warm_calls))
    print(f"  {'request':<40} {'cold/session':>12} {'warm/session':>12}")
    for key in every:
        print(f"  {key:<40} {cold_calls[key] / n_cold:12.2f} {warm_calls[key] / n_warm:12.2f}")
    created = {name: sum(v for k, v in calls.items() if k.startswith("create ")) / n
               for name, calls, n in (("cold", cold_calls, n_cold), ("warm", warm_calls, n_warm))}
    print(f"objects created per session: cold {created['cold']:.1f}, warm {created['warm']:.1f}")
    print(f"warm pods' own requests (in-cluster front) per warm pod: {sum(warm_front.values()) / n_warm:.1f} "
          f"{dict(warm_front)}")
    if idle_calls is not None and idle_front is not None:
        per_minute = 60 / args.idle
        print(f"idle pool, minWorkers 2, {args.idle:.0f} s: operator {sum(idle_calls.values()) * per_minute:.1f} "
              f"requests/min {dict(idle_calls)}; warm pods {sum(idle_front.values()) * per_minute:.1f} requests/min "
              f"{dict(idle_front)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="timed sessions per mode (after one warm-up)")
    parser.add_argument("--idle", type=float, default=10, help="seconds to watch an idle minWorkers 2 pool (0: skip)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    started = time.perf_counter()
    asyncio.run(measure(args))
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
