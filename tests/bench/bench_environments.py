"""Benchmark: how long N Environment resources take to become Ready, and how many API calls each costs.

Runs the shipped operator (kopf, in its own thread and event loop) against the test harness's fake
apiserver and the emulator (both in this process, over real HTTP), creates ``--count`` Environments at
once, and waits until every one has ``Ready=True``. The emulator counts every ``/v1/`` request it
receives and the most that were in flight at once, which shows the operator's bound on concurrent API
calls (``ENVIRONMENTS_OPERATOR_API_CONCURRENCY``) at work; ``--latency-ms`` makes each API call that
slow, so that calls overlap as they would against a remote API.

    .venv/bin/python tests/bench/bench_environments.py [--count 500] [--rounds 3] [--concurrency 16] [--latency-ms 0]

Prints, per round, the seconds until all were Ready and the API calls per resource, then the medians.
A script, not a test: it asserts only that every resource became Ready with exactly one environment.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: make ``tests.harness`` importable

import kopf  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402
from tests.harness.operator import run_operator  # noqa: E402

import environments_operator.handlers  # noqa: E402, F401  (registers the operator's handlers)
from environments_operator.devcluster.kube import ENVIRONMENTS, start_kube  # noqa: E402
from environments_operator.emulator.server import EmulatorServer  # noqa: E402
from environments_operator.handlers.startup import apply_kopf_settings  # noqa: E402

API_KEY = "sk-ant-bench"
NAMESPACE = "bench"
CRD = yaml.safe_load((ROOT / "crds" / "environments.managedagents.dev.yaml").read_text())


@dataclass
class ApiCounter:
    """Counts the emulator's ``/v1/`` requests by method and route, and the peak of concurrent ones."""

    by_route: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    peak: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_route.values())

    def middleware(self) -> Any:
        @web.middleware
        async def count(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if not request.path.startswith("/v1/"):
                return await handler(request)
            route = request.match_info.route.name or request.path
            self.by_route[f"{request.method} {route}"] += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1
        return count


def ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


async def one_round(count: int, concurrency: int, latency_ms: int) -> tuple[float, ApiCounter]:
    faults = [{"route": "*", "effect": "latency", "latency_ms": latency_ms}] if latency_ms else None
    emulator = EmulatorServer(api_keys=[API_KEY], faults=faults)
    counter = ApiCounter()
    emulator.app.middlewares.insert(0, counter.middleware())
    with tempfile.TemporaryDirectory() as workdir:
        async with start_kube(Path(workdir)) as kube, emulator:
            kube.install_crd(CRD)
            os.environ.update({
                "ANTHROPIC_API_KEY": API_KEY,
                "ANTHROPIC_BASE_URL": emulator.base_url,
                "ENVIRONMENTS_OPERATOR_API_CONCURRENCY": str(concurrency),
                "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "3600",
                "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0",
            })
            async with run_operator(kube, registry=kopf.get_default_registry(), namespaces=[NAMESPACE],
                                    settings_hook=apply_kopf_settings, log_level=logging.WARNING):
                started = time.monotonic()
                for index in range(count):
                    kube.create(ENVIRONMENTS, {
                        "apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
                        "metadata": {"name": f"env-{index:04d}", "namespace": NAMESPACE},
                        "spec": {"metadata": {"bench": "yes"}, "config": {"type": "cloud"}},
                    }, namespace=NAMESPACE)
                while sum(ready(obj) for obj in kube.list(ENVIRONMENTS, NAMESPACE)) < count:
                    if time.monotonic() - started > 600:
                        raise TimeoutError("not all Environments became Ready within 600 s")
                    await asyncio.sleep(0.1)
                elapsed = time.monotonic() - started
                ids = {obj["status"]["id"] for obj in kube.list(ENVIRONMENTS, NAMESPACE)}
                assert len(ids) == count == len(emulator.state.environments), "one environment per resource"
    return elapsed, counter


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="ENVIRONMENTS_OPERATOR_API_CONCURRENCY")
    parser.add_argument("--latency-ms", type=int, default=0, help="added to every API call at the emulator")
    args = parser.parse_args()
    times, per_resource = [], []
    for round_ in range(1, args.rounds + 1):
        elapsed, counter = await one_round(args.count, args.concurrency, args.latency_ms)
        times.append(elapsed)
        per_resource.append(counter.total / args.count)
        routes = ", ".join(f"{route}: {n}" for route, n in sorted(counter.by_route.items()))
        print(f"round {round_}: {args.count} Ready in {elapsed:.2f} s ({args.count / elapsed:.0f}/s); "
              f"API calls {counter.total} ({counter.total / args.count:.2f} per resource; {routes}); "
              f"peak concurrent API calls {counter.peak} (limit {args.concurrency})", flush=True)
    print(f"median: {statistics.median(times):.2f} s until all {args.count} Ready; "
          f"{statistics.median(per_resource):.2f} API calls per resource "
          f"(concurrency {args.concurrency}, latency {args.latency_ms} ms)")


if __name__ == "__main__":
    asyncio.run(main())
