"""Benchmark: the operator's footprint with a fleet: idle WorkerPools across namespaces, plus Environments.

Runs the real operator as its own ``environments-operator run --all-namespaces`` process
(``environments_operator.demo.operator_process``) against the simulated cluster's fake apiserver and the
emulator, both in this process. It applies ``--environments`` Environments spread over ``--namespaces``
namespaces; ``--pools`` of them are self_hosted, each with its key Secret and an idle WorkerPool (no
sessions: each pool keeps one long-poll open, ``blockMs`` 900 by default, and reads queue stats every
10 s); the rest are cloud Environments. Then, in four phases:

1. **setup** (operator #1, drift interval 1 day, so no drift check runs before phase 3): every
   Environment created and synced (``Ready`` and ``Synced`` True), then every pool ``Ready``, then
   ``--settle`` seconds;
2. **idle window 1** (``--window`` s): the operator's RSS (``/proc/<pid>/status`` VmRSS) at its start
   and end, its CPU time (``/proc/<pid>/stat`` utime + stime, all threads) over it as a share of one
   core, the Environments API requests per minute by route (the emulator's ``requests`` counter) and
   the Kubernetes requests per minute by verb and resource (``kube.calls``, the operator's requests
   only). No drift check is due in it: this is the idle cost between drift checks;
3. **drift pass**: once every Environment's ``status.lastSyncTime`` is more than 1.1 x
   ``--drift-interval`` old, the operator is restarted (operator #2) with that drift interval. Every
   Environment is then overdue, so each one is re-read once, spread by design over the first 10% of
   the interval (``DriftSchedule``); there is no single drift timer, every Environment has its own.
   The pass is over when every Environment's ``status.lastSyncTime`` (written by the operator at each
   check) is later than the restart; its length is first check -> last check, both from those
   timestamps. Its CPU is read from a 1 s timeline of the operator's CPU time, over the same span; the
   "net" figure subtracts the pools' polls and stats requests of that span at window 1's CPU per
   request, leaving what the checks themselves cost (a restart's own work, when it overlaps the pass,
   stays in it: "restart -> first check" shows how long that work held the first check back);
4. **idle window 2** (operator #2, after its pass, ``--settle`` s later): as window 1, a repeat that
   also shows what a restart and a pass left behind. The next checks are due 0.9 x the interval after
   the pass, so with the default 300 s the window holds none (the table shows environments.retrieve).

The steady-state estimate adds the pass's net CPU and requests, spread over one drift interval, to
the idle window medians: each Environment is re-read once per interval.

    PYTHONPATH=operator:. .venv/bin/python tests/bench/bench_fleet.py \\
        [--pools 500] [--namespaces 50] [--environments 5000] [--window 120] [--drift-interval 300]

    # a smoke run, a couple of minutes
    PYTHONPATH=operator:. .venv/bin/python tests/bench/bench_fleet.py \\
        --pools 20 --namespaces 4 --environments 100 --window 20 --drift-interval 60

``--environments`` counts every Environment, the pools' self_hosted ones included. The emulator and
the fake apiserver run in this process and their CPU is not the operator's: it is printed apart. At
500 pools they answer about 560 long-polls a second; if they fall behind, polls take longer and the
operator's share shrinks with them, so the table prints the poll rate reached per pool (an idle pool
at full speed polls 1.1 times a second) and the operator's CPU per poll, which extrapolate.

A script, not a test. It prints one table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from environments_operator.demo import (  # noqa: E402
    API_KEY,
    DemoFailed,
    OperatorProcess,
    manifests,
    operator_process,
)
from environments_operator.devcluster.kube import (  # noqa: E402
    ENVIRONMENTS,
    SECRETS,
    WORKERPOOLS,
    Kube,
    start_kube,
)
from environments_operator.domain.crd import all_crds  # noqa: E402
from environments_operator.emulator.server import EmulatorServer  # noqa: E402

DRIFT_SETTING = "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS"
SETUP_DRIFT_INTERVAL = 86_400  # operator #1: no drift check before the pass
CHECK_EVERY = 2.0  # seconds between looks at the tracker and the operator
POLLS_PER_SECOND_IDLE = 1 / 0.9  # one idle pool at full speed: a 900 ms long-poll after another
MIB = 1024 * 1024


# ----- the operator process, read from /proc ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def log_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as log:
        return sum(1 for _ in log)


IDLE_ROUTES = ("work.poll", "work.stats")  # what an idle pool sends


@dataclasses.dataclass
class Sample:
    wall: float
    cpu: float
    idle_requests: float  # work.poll + work.stats received so far


class Timeline:
    """The operator's CPU time and the pools' requests once a second, read at moments known only afterwards."""

    def __init__(self, pid: int, emulator: EmulatorServer) -> None:
        self.pid = pid
        self.emulator = emulator
        self.samples: list[Sample] = []

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                requests = sum(self.emulator.requests[route] for route in IDLE_ROUTES)
                self.samples.append(Sample(time.time(), cpu_seconds(self.pid), requests))
            await asyncio.sleep(1.0)

    def at(self, wall: float, field: str) -> float:
        """``field`` at ``wall``, interpolated linearly between the samples around it."""
        samples = self.samples
        value: Callable[[Sample], float] = lambda sample: getattr(sample, field)  # noqa: E731
        if wall <= samples[0].wall:
            return value(samples[0])
        for before, after in itertools.pairwise(samples):
            if before.wall <= wall <= after.wall:
                share = (wall - before.wall) / max(after.wall - before.wall, 1e-9)
                return value(before) + share * (value(after) - value(before))
        return value(samples[-1])


# ----- the fleet -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fleet:
    namespaces: list[str]
    pools: list[tuple[str, str]]  # (namespace, name): a self_hosted Environment, its key Secret, a WorkerPool
    cloud: list[tuple[str, str]]  # (namespace, name): a cloud Environment

    @classmethod
    def layout(cls, *, pools: int, namespaces: int, environments: int) -> Fleet:
        names = [f"fleet-{i:03d}" for i in range(namespaces)]
        return cls(names, [(names[i % namespaces], f"pool-{i:04d}") for i in range(pools)],
                   [(names[i % namespaces], f"env-{i:05d}") for i in range(environments - pools)])

    @property
    def environments(self) -> int:
        return len(self.pools) + len(self.cloud)


def key_secret(name: str) -> str:
    return f"{name}-key"


def pool_manifests(namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The demo's sample self_hosted Environment and WorkerPool, renamed and moved to ``namespace``."""
    environment, pool = manifests(key_secret(name), max_workers=10)
    for body in (environment, pool):
        body["metadata"] = {"name": name, "namespace": namespace}
    environment["spec"]["name"] = f"fleet {namespace}/{name}"
    pool["spec"]["environmentRef"] = {"name": name}
    return environment, pool


def cloud_environment(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"name": f"fleet {namespace}/{name}", "config": {"type": "cloud"}}}


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def epoch(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Tracker:
    """What the fake apiserver's writes say about every Environment and WorkerPool (no list scans)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.environments: dict[tuple[str, str], tuple[bool, str | None, float | None]] = {}  # synced, id, last sync
        self.pools_ready: dict[tuple[str, str], bool] = {}

    async def follow_environments(self) -> None:
        async for change in self.kube.changes(ENVIRONMENTS):
            obj = change.object
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            status = obj.get("status") or {}
            synced = condition_true(obj, "Ready") and condition_true(obj, "Synced")
            self.environments[key] = (synced, status.get("id"), epoch(status.get("lastSyncTime")))

    async def follow_pools(self) -> None:
        async for change in self.kube.changes(WORKERPOOLS):
            obj = change.object
            self.pools_ready[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = condition_true(obj, "Ready")

    def synced(self) -> int:
        return sum(1 for synced, _, _ in self.environments.values() if synced)

    def ready_pools(self) -> int:
        return sum(self.pools_ready.values())

    def last_syncs(self) -> list[float]:
        return [at for _, _, at in self.environments.values() if at is not None]


async def wait_for(condition: Callable[[], bool], seconds: float, what: str, operator: OperatorProcess,
                   progress: Callable[[], str]) -> float:
    """Seconds until ``condition`` held; a line of progress every 30 s."""
    started = time.monotonic()
    said = started
    while not condition():
        operator.check()
        now = time.monotonic()
        if now - started > seconds:
            raise DemoFailed(f"timed out after {seconds:.0f} s waiting for {what} ({progress()})")
        if now - said >= 30:
            said = now
            print(f"fleet:   ... {progress()} after {now - started:.0f} s", flush=True)
        await asyncio.sleep(CHECK_EVERY)
    return time.monotonic() - started


async def set_up(fleet: Fleet, kube: Kube, emulator: EmulatorServer, tracker: Tracker, operator: OperatorProcess,
                 timeout: float) -> tuple[float, float]:
    """Every Environment synced, then every pool Ready; returns both durations."""
    for namespace, name in fleet.pools:
        environment, _ = pool_manifests(namespace, name)
        kube.create(ENVIRONMENTS, environment, namespace)
    for namespace, name in fleet.cloud:
        kube.create(ENVIRONMENTS, cloud_environment(namespace, name), namespace)
    total = fleet.environments
    environments_took = await wait_for(lambda: tracker.synced() >= total, timeout, "every Environment to sync",
                                       operator, lambda: f"{tracker.synced()}/{total} Environments synced")
    print(f"fleet: {total} Environments synced in {environments_took:.1f} s", flush=True)
    for namespace, name in fleet.pools:
        _, environment_id, _ = tracker.environments[(namespace, name)]
        assert environment_id is not None
        key = emulator.state.issue_environment_key(environment_id)
        kube.create(SECRETS, {"metadata": {"name": key_secret(name), "namespace": namespace},
                              "data": {"environment-key": base64.b64encode(key.encode()).decode()}}, namespace)
        _, pool = pool_manifests(namespace, name)
        kube.create(WORKERPOOLS, pool, namespace)
    pools = len(fleet.pools)
    pools_took = await wait_for(lambda: tracker.ready_pools() >= pools, timeout, "every WorkerPool to be Ready",
                                operator, lambda: f"{tracker.ready_pools()}/{pools} WorkerPools Ready")
    print(f"fleet: {pools} WorkerPools Ready in {pools_took:.1f} s", flush=True)
    return environments_took, pools_took


# ----- what is measured ------------------------------------------------------------------------------------


def kube_route(call: Any) -> str:
    resource = f"{call.resource}/{call.subresource}" if call.subresource else call.resource
    return f"{call.verb} {resource}"


@dataclasses.dataclass
class Window:
    seconds: float
    cpu_seconds: float
    rss_start: int
    rss_end: int
    peak_rss: int
    api: collections.Counter[str]
    kube: collections.Counter[str]
    log_lines: int
    bench_cpu_seconds: float
    load: tuple[float, float]

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.seconds

    def per_minute(self, count: float) -> float:
        return count * 60.0 / self.seconds

    def summary(self) -> str:
        return (f"operator CPU {100 * self.cpu_share:.1f}% of a core, RSS {self.rss_end / MIB:.0f} MiB, "
                f"{self.per_minute(self.api.total()):.0f} API requests/min ({self.api['work.poll'] / self.seconds:.0f} "
                f"polls/s), {self.per_minute(self.kube.total()):.1f} Kubernetes requests/min; this process "
                f"{100 * self.bench_cpu_seconds / self.seconds:.0f}% of a core")


async def idle_window(operator: OperatorProcess, emulator: EmulatorServer, kube: Kube, seconds: float) -> Window:
    pid = operator.process.pid
    api_before, calls_before = collections.Counter(emulator.requests), len(kube.calls)
    lines_before, load_before = log_lines(operator.log_path), load_average()
    rss_start, _ = memory(pid)
    bench_before, cpu_before, started = time.process_time(), cpu_seconds(pid), time.monotonic()
    while (remaining := started + seconds - time.monotonic()) > 0:
        operator.check()
        await asyncio.sleep(min(remaining, CHECK_EVERY))
    cpu_after, wall = cpu_seconds(pid), time.monotonic() - started
    bench_cpu = time.process_time() - bench_before
    rss_end, peak = memory(pid)
    api = collections.Counter(emulator.requests)
    api.subtract(api_before)
    kube_calls = collections.Counter(kube_route(call) for call in kube.calls[calls_before:])
    return Window(wall, cpu_after - cpu_before, rss_start, rss_end, peak, +api, kube_calls,
                  log_lines(operator.log_path) - lines_before, bench_cpu, (load_before, load_average()))


@dataclasses.dataclass
class DriftPass:
    environments: int
    interval: float
    restart_to_first: float
    first_to_last: float
    restart_to_last: float
    cpu_seconds: float  # operator CPU, first check -> last check
    idle_requests: float  # work.poll + work.stats, first check -> last check
    startup_cpu_seconds: float  # operator CPU, restart -> first check
    api: collections.Counter[str]  # restart -> pass seen over
    kube: collections.Counter[str]
    rss_after: int
    log_lines: int  # restart -> pass seen over

    @property
    def retrieves(self) -> int:
        return self.api["environments.retrieve"]

    @property
    def environment_writes(self) -> int:
        return sum(count for route, count in self.kube.items() if route.split()[1].startswith("environments"))


async def drift_pass(emulator: EmulatorServer, kube: Kube, tracker: Tracker, workdir: Path, *, interval: float,
                     timeout: float) -> tuple[DriftPass, OperatorProcess, Timeline, contextlib.AsyncExitStack]:
    """Restart the operator with ``interval``, and follow its pass over every (overdue) Environment."""
    total = len(tracker.environments)
    stack = contextlib.AsyncExitStack()
    api_before, calls_before = collections.Counter(emulator.requests), len(kube.calls)
    lines_before = log_lines(workdir / "operator.log")
    restart = time.time()
    operator = await stack.enter_async_context(operator_process(
        kube, emulator, workdir, namespaces=None, env={DRIFT_SETTING: f"{interval:g}"}))
    timeline = Timeline(operator.process.pid, emulator)
    sampler = asyncio.create_task(timeline.run())
    stack.callback(sampler.cancel)
    try:
        def rechecked() -> int:
            return sum(1 for at in tracker.last_syncs() if at > restart)

        await wait_for(lambda: rechecked() >= total, timeout, "every Environment to be re-read", operator,
                       lambda: f"{rechecked()}/{total} Environments re-read")
        await asyncio.sleep(1.5)  # one more timeline sample past the last check
        api = collections.Counter(emulator.requests)
        api.subtract(api_before)
        kube_calls = collections.Counter(kube_route(call) for call in kube.calls[calls_before:])
        checks = [at for at in tracker.last_syncs() if at > restart]
        first, last = min(checks), max(checks)
        result = DriftPass(
            environments=total, interval=interval, restart_to_first=first - restart, first_to_last=last - first,
            restart_to_last=last - restart, cpu_seconds=timeline.at(last, "cpu") - timeline.at(first, "cpu"),
            idle_requests=timeline.at(last, "idle_requests") - timeline.at(first, "idle_requests"),
            startup_cpu_seconds=timeline.at(first, "cpu"), api=+api, kube=kube_calls,
            rss_after=memory(operator.process.pid)[0], log_lines=log_lines(operator.log_path) - lines_before)
    except BaseException:
        await stack.aclose()
        raise
    return result, operator, timeline, stack


# ----- the report ------------------------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    columns = [row for row in rows if len(row) > 1]  # one-cell rows are headings, as wide as they like
    widths = [max(len(row[i]) for row in columns if i < len(row)) for i in range(max(map(len, columns)))]
    lines = []
    for row in rows:
        if len(row) == 1:
            lines.append(row[0])
            continue
        cells = [row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:],
                                                                                     strict=False))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def report(args: argparse.Namespace, fleet: Fleet, setup: tuple[float, float], windows: list[Window],
           drift: DriftPass, total_seconds: float) -> str:
    pools = len(fleet.pools)

    def row(label: str, value: Callable[[Window], float], fmt: str) -> list[str]:
        values = [value(w) for w in windows]
        return [label, *(format(v, fmt) for v in values), format(statistics.median(values), fmt)]

    def per_minute_of(counter: str, route: str) -> Callable[[Window], float]:
        return lambda w: w.per_minute(getattr(w, counter)[route])

    api_routes = sorted({route for w in windows for route in w.api})
    kube_routes = sorted({route for w in windows for route in w.kube})
    rows: list[list[str]] = [
        [f"== fleet footprint: {pools} WorkerPools (idle) across {len(fleet.namespaces)} namespaces, "
         f"{fleet.environments} Environments ({len(fleet.cloud)} cloud + {pools} self_hosted); "
         f"{os.cpu_count()} cores"],
        [f"setup: Environments synced in {setup[0]:.1f} s, WorkerPools Ready in {setup[1]:.1f} s; "
         f"whole run {total_seconds / 60:.1f} min"],
        ["", *(f"idle window {i + 1}" for i in range(len(windows))), "median"],
        row("window, s", lambda w: w.seconds, ".1f"),
        row("operator RSS at start, MiB", lambda w: w.rss_start / MIB, ".0f"),
        row("operator RSS at end, MiB", lambda w: w.rss_end / MIB, ".0f"),
        row("operator peak RSS so far, MiB", lambda w: w.peak_rss / MIB, ".0f"),
        row("operator CPU, % of one core", lambda w: 100 * w.cpu_share, ".1f"),
        row("Environments API requests/min", lambda w: w.per_minute(w.api.total()), ".0f"),
        *(row(f"  {route}", per_minute_of("api", route), ".1f") for route in api_routes),
        row("Kubernetes requests/min", lambda w: w.per_minute(w.kube.total()), ".1f"),
        *(row(f"  {route}", per_minute_of("kube", route), ".1f") for route in kube_routes),
        row("operator log lines/min", lambda w: w.per_minute(w.log_lines), ".1f"),
        row("polls/s per pool (full speed 1.11)", lambda w: w.api["work.poll"] / w.seconds / max(pools, 1), ".2f"),
        row("operator CPU per poll, ms (all idle CPU)",
            lambda w: 1000 * w.cpu_seconds / max(w.api["work.poll"], 1), ".2f"),
        row("operator CPU per pool, % of a core", lambda w: 100 * w.cpu_share / max(pools, 1), ".3f"),
        row("operator RSS per pool, MiB (end RSS / pools)", lambda w: w.rss_end / MIB / max(pools, 1), ".2f"),
        row("emulator+apiserver process CPU, % of a core", lambda w: 100 * w.bench_cpu_seconds / w.seconds, ".1f"),
        row("load average, 1 min, at end", lambda w: w.load[1], ".1f"),
    ]
    idle_share = statistics.median(w.cpu_share for w in windows)
    # The pools' own work during the pass, at window 1's CPU per poll or stats request: when the operator
    # is short of CPU its polls slow down, so a rate per second would overstate it.
    idle = windows[0]
    cpu_per_idle_request = idle.cpu_seconds / max(sum(idle.api[route] for route in IDLE_ROUTES), 1)
    net_cpu = max(drift.cpu_seconds - drift.idle_requests * cpu_per_idle_request, 0.0)
    pass_idle_rate = drift.idle_requests / max(drift.first_to_last, 1e-9) / max(pools, 1)
    per_check = drift.environments
    api_per_minute = statistics.median(w.per_minute(w.api.total()) for w in windows)
    kube_per_minute = statistics.median(w.per_minute(w.kube.total()) for w in windows)
    rows += [
        [""],
        [f"== drift pass: operator restarted with a {drift.interval:g} s drift interval, every Environment overdue"],
        ["restart -> first check, s", f"{drift.restart_to_first:.1f}"],
        ["first check -> last check (one pass), s", f"{drift.first_to_last:.1f}"],
        ["  by design the checks are spread over, s", f"{0.1 * drift.interval:.1f}"],
        ["restart -> every Environment re-read, s", f"{drift.restart_to_last:.1f}"],
        ["checks/s over the pass", f"{per_check / max(drift.first_to_last, 1e-9):.0f}"],
        ["operator CPU over the pass, s", f"{drift.cpu_seconds:.1f}"],
        ["  polls + stats per second per pool during it (idle: 1.21)", f"{pass_idle_rate:.2f}"],
        ["  net of the pools' polls and stats (window 1's CPU each), s", f"{net_cpu:.1f}"],
        ["  net per check, ms", f"{1000 * net_cpu / per_check:.2f}"],
        ["operator CPU restart -> first check, s", f"{drift.startup_cpu_seconds:.1f}"],
        ["environments.retrieve per Environment", f"{drift.retrieves / per_check:.2f}"],
        ["Kubernetes environments requests per Environment", f"{drift.environment_writes / per_check:.2f}"],
        ["operator log lines per Environment (restart included)", f"{drift.log_lines / per_check:.2f}"],
        ["operator RSS after the pass, MiB", f"{drift.rss_after / MIB:.0f}"],
        [""],
        [f"== steady state, estimated: idle medians + one pass per {args.steady_interval:g} s drift interval"],
        ["operator CPU, % of one core", f"{100 * (idle_share + net_cpu / args.steady_interval):.1f}"],
        ["Environments API requests/min", f"{api_per_minute + drift.retrieves * 60 / args.steady_interval:.0f}"],
        ["Kubernetes requests/min", f"{kube_per_minute + drift.environment_writes * 60 / args.steady_interval:.1f}"],
        ["operator RSS, MiB (largest seen in the windows)", f"{max(w.rss_end for w in windows) / MIB:.0f}"],
    ]
    return table(rows)


async def run(args: argparse.Namespace) -> int:
    fleet = Fleet.layout(pools=args.pools, namespaces=args.namespaces, environments=args.environments)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        return await measure(args, fleet, workdir, began)
    finally:
        if not args.keep_log:
            shutil.rmtree(workdir, ignore_errors=True)


async def measure(args: argparse.Namespace, fleet: Fleet, workdir: Path, began: float) -> int:
    print(f"fleet: {len(fleet.pools)} pools, {len(fleet.namespaces)} namespaces, {fleet.environments} "
          f"Environments; operator log {workdir / 'operator.log'}", flush=True)
    async with EmulatorServer(api_keys=[API_KEY]) as emulator, start_kube(workdir) as kube:
        for crd in all_crds().values():
            kube.install_crd(crd)
        for namespace in fleet.namespaces:
            kube.ensure_namespace(namespace)
        tracker = Tracker(kube)
        followers = [asyncio.create_task(tracker.follow_environments()), asyncio.create_task(tracker.follow_pools())]
        try:
            async with operator_process(kube, emulator, workdir, namespaces=None,
                                        env={DRIFT_SETTING: str(SETUP_DRIFT_INTERVAL)}) as operator:
                setup = await set_up(fleet, kube, emulator, tracker, operator, args.setup_timeout)
                await asyncio.sleep(args.settle)
                print(f"fleet: idle window 1 ({args.window:g} s)", flush=True)
                windows = [await idle_window(operator, emulator, kube, args.window)]
                print(f"fleet: idle window 1: {windows[0].summary()}", flush=True)
                # Every Environment must be overdue when the next operator starts (1.1 x: the largest jitter).
                overdue_at = max(tracker.last_syncs()) + 1.1 * args.drift_interval + 2
                if (wait := overdue_at - time.time()) > 0:
                    print(f"fleet: waiting {wait:.0f} s until every Environment is overdue for its drift check",
                          flush=True)
                    while time.time() < overdue_at:
                        operator.check()
                        await asyncio.sleep(min(CHECK_EVERY, max(overdue_at - time.time(), 0)))
            print(f"fleet: restarting the operator with a {args.drift_interval:g} s drift interval", flush=True)
            drift, operator, _, stack = await drift_pass(emulator, kube, tracker, workdir,
                                                         interval=args.drift_interval, timeout=args.setup_timeout)
            async with stack:
                print(f"fleet: drift pass over {drift.environments} Environments: {drift.first_to_last:.1f} s "
                      f"(restart -> first check {drift.restart_to_first:.1f} s, -> last {drift.restart_to_last:.1f} s"
                      f"); operator CPU {drift.cpu_seconds:.1f} s over the pass, {drift.startup_cpu_seconds:.1f} s "
                      "before it", flush=True)
                await asyncio.sleep(args.settle)
                print(f"fleet: idle window 2 ({args.window:g} s)", flush=True)
                windows.append(await idle_window(operator, emulator, kube, args.window))
                print(f"fleet: idle window 2: {windows[1].summary()}", flush=True)
                if windows[-1].api["environments.retrieve"]:
                    print(f"fleet: note: {windows[-1].api['environments.retrieve']} drift checks fell in idle "
                          f"window 2 (the window outlasted 0.9 x the drift interval after the pass)", flush=True)
        except DemoFailed as failure:
            print(f"fleet: failed: {failure}", flush=True)
            return 1
        finally:
            for follower in followers:
                follower.cancel()
    print(report(args, fleet, setup, windows, drift, time.monotonic() - began), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=500, help="idle WorkerPools, each on its self_hosted Environment")
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--environments", type=int, default=5000,
                        help="Environments in all, the pools' self_hosted ones included (default 5000)")
    parser.add_argument("--window", type=float, default=120.0, help="seconds of each idle window (default 120)")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds between Ready (or the pass) and a window: one stats interval and more")
    parser.add_argument("--drift-interval", type=float, default=300.0,
                        help="the restarted operator's drift interval (default 300, the shipped default)")
    parser.add_argument("--steady-interval", type=float, default=300.0,
                        help="the drift interval the steady-state estimate assumes (default 300)")
    parser.add_argument("--setup-timeout", type=float, default=1800.0)
    parser.add_argument("--keep-log", action="store_true", help="keep the operator's log (its path is printed)")
    args = parser.parse_args()
    if args.namespaces < 1 or not 0 <= args.pools <= args.environments:
        parser.error("need at least one namespace, and --environments >= --pools")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
