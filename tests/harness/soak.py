"""A soak of the WorkerPool controller under faults: many items, a seeded fault schedule, three invariants.

Used by ``tests/e2e/test_workerpool_soak.py`` (short, in the suite) and ``tests/bench/bench_soak.py``
(long, a script). Given a ``WorkerPoolWorld`` (fake apiserver, emulator, the real operator), ``run_soak``:

1. creates one pool and enqueues ``items`` work items over ``enqueue_seconds``, in random batches;
2. meanwhile injects faults at random times, from an RNG seeded with ``seed``:

   - **Environments API** (the emulator's fault rules, for the whole injection phase, each with a rate, on
     ``work.poll``, ``work.ack``, ``work.heartbeat`` and ``work.stop``): 5xx, 429 with ``retry-after``,
     dropped connections (before the request takes effect, and, on ack and stop, after it did), added
     latency; and now and then a burst (the same route failing several times in a row);
   - **pods** (this module plays the kubelet and the workers; see below): pods that fail (before or after
     their worker's first heartbeat), vanish (Pending or Running), or hang in Pending (ImagePullBackOff);
   - **pod watches answered with 410**: the pod watches are held, broken, pods move on meanwhile, the
     history is compacted, and the resumed watches get 410 Gone (kopf relists);
   - **held and slow Kubernetes calls**: a pod or Secret create, or a pod patch (the release), held for a
     while (answered before or after it is applied), a slow pod create (``Kube.delay``), a failed one (500);
   - **operator crashes**: the operator killed abruptly at random times, and sometimes while a held create
     is committed but not yet answered; restarted each time;

3. stops injecting, clears every fault, and drains: waits until every item is stopped;
4. checks the invariants and returns the figures (``SoakResult``).

**Workers.** Pods here are not processes (10,000 real workers would take hours): ``SoakCluster`` plays the
kubelet and the worker in each pod. A released pod runs (``Kubelet.run``), its worker reads the item's
sessions token from the per-item Secret the operator wrote (a pod released without it would fail to
start: an anomaly), heartbeats the item through the emulator's HTTP API with that token (so the API
faults reach it, and it retries them as the SDK would), works a little, force-stops the item (as the SDK
does once the session is idle) and the pod succeeds. A pod with a fault does what the fault says instead.
Terminating pods (``graceful_pod_deletion`` is on) are finished 50 ms after their deletion.

**The invariants**, over every item, at the end of the drain:

- **lost**: an item whose work was dropped: either not stopped at the end while no pod of it exists (an
  acked item with no pod is never offered again; a queued one with no pod after the drain was forgotten),
  or stopped although it was never served and none of its pods was given a fault (the operator ended the
  session's turn without cause);
- **served twice**: an item two different pods of which reached Running (two workers ran on it; no fault
  here expires a lease, so a second worker can only come from a second dispatch), or that had two
  Running pods at once, or whose pod reached Running while the item was still queued (a worker ran on an
  item nobody had acknowledged);
- **hanging**: an item not stopped at the end of the drain that still has a pod (Pending, Running, or
  finished with its item left open).

An item is **served** when a worker's heartbeat on it succeeded and the same worker's stop went through
(or found it stopped). Every item not served must have been stopped by the operator after a fault on
one of its pods; lost and hanging together cover every item that is neither.

**Figures**: dispatch latency (enqueue → the first successful ack's arrival at the emulator), p50 and
p99; time to drain (end of injection → every item stopped); RSS of the operator at start and end. With
the in-process operator (``OperatorRunner``, a thread of this process) that is this whole process's RSS,
which also holds the fake apiserver's full history, the emulator's items and every killed operator's
frozen event loop (kept on purpose, see ``tests/harness/operator.py``); ``rss_of`` says whose it is.

The run is seeded (fault schedule, rates, pod fates in order of release), not replayable: thread
scheduling and the emulator's random IDs differ from run to run. ``SoakResult.events`` is the schedule
that was actually applied, with times, for a report.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import aiohttp

from environments_operator.devcluster.kube import PODS, SECRETS, Kube
from environments_operator.devcluster.kubelet import GatedPodError, Kubelet, gated, waits_for_kubelet
from environments_operator.domain.worker_manifests import ANNOTATION_WORK_ID, work_secret_name
from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import enqueue_sessions, sessions_token

log = logging.getLogger("tests.soak")

API_ROUTES = ("work.poll", "work.ack", "work.heartbeat", "work.stop")



class Operator(Protocol):
    """What the soak needs of the operator: the in-process ``OperatorRunner`` or a process wrapper."""

    starts: int

    def kill(self) -> None: ...
    async def start(self) -> None: ...
    @property
    def running(self) -> bool: ...


class World(Protocol):
    kube: Kube
    kubelet: Kubelet
    emulator: EmulatorServer
    operator: Operator
    namespace: str

    @property
    def environment(self) -> Any: ...
    def create_pool(self, name: str = "pool", **overrides: Any) -> dict[str, Any]: ...


# ----- configuration -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultMix:
    """Rates and intervals of every fault; ``FaultMix.none()`` turns them all off."""

    # Environments API, per request on each of API_ROUTES (poll: the operator's long-polls).
    api_5xx: float = 0.03
    api_429: float = 0.02
    api_429_retry_after_ms: tuple[int, int] = (50, 500)
    api_drop: float = 0.01
    api_drop_after: float = 0.01  # ack and stop only: applied, then the connection drops
    api_latency: float = 0.2
    api_latency_ms: tuple[int, int] = (5, 60)
    api_burst_every: tuple[float, float] = (4.0, 10.0)  # one route failing `times` in a row
    # A network blip on ack: the next few acks take effect and their answers are lost (each ack is
    # retried by the operator, so only a run of them makes one fail for good).
    ack_lost_every: tuple[float, float] | None = (6.0, 14.0)
    # Pods, per released pod (the rest are served).
    pod_fail_running: float = 0.04
    pod_fail_start: float = 0.02
    pod_vanish_running: float = 0.03
    pod_vanish_pending: float = 0.02
    pod_hang_pending: float = 0.03
    # The lease runs out while the pod still looks Running (a partition, its node unreachable): the item
    # is offered again while the old worker runs on; its next heartbeat is refused, and it exits 0.
    pod_lease_lost: float = 0.03
    # Kubernetes, seconds between episodes (None: never).
    watch_410_every: tuple[float, float] | None = (5.0, 12.0)
    hold_every: tuple[float, float] | None = (3.0, 8.0)
    hold_seconds: tuple[float, float] = (0.3, 4.0)
    delay_every: tuple[float, float] | None = (6.0, 15.0)
    kube_error_every: tuple[float, float] | None = (6.0, 15.0)
    kill_every: tuple[float, float] | None = (5.0, 12.0)
    kill_while_held: float = 0.3  # share of holds (applied first) that end with a crash
    # Whether a pod may vanish where the operator can miss it: while it is down (killed, or started but
    # not watching yet), while its pod watch is broken, or shortly before it crashes (before the
    # force-stop it owes the vanished pod's item went through). Off by default: the operator then never
    # force-stops the item, which stays ``starting`` for ever if its worker never heartbeat (lost), or is
    # served again once its lease runs out (90 s) if it did: a known defect, see the README's "Soak".
    # Off, a pod vanishes only while the operator watches, and no crash follows until its item is stopped.
    unnoticed_vanish: bool = False
    # Unless unnoticed_vanish: how long a pod exists, and the operator has been watching (since its last
    # start or resumed watch), before the pod may vanish: long enough for a pass of the pool to have seen
    # it. 3 s suffice for the suite's few hundred items; under the long soak's load a pass can take longer
    # (2 of 10,000 items were lost with 3 s), so the benchmark waits 10 s.
    notice_seconds: float = 3.0
    # Crashes happen only in this first share of the enqueue phase (so that the last operator start
    # serves the rest, and its memory at start and end can be compared).
    kills_until: float = 1.0

    @classmethod
    def none(cls) -> FaultMix:
        return cls(api_5xx=0, api_429=0, api_drop=0, api_drop_after=0, api_latency=0, api_burst_every=(1e9, 1e9),
                   ack_lost_every=None,
                   pod_fail_running=0, pod_fail_start=0, pod_vanish_running=0, pod_vanish_pending=0,
                   pod_hang_pending=0, pod_lease_lost=0, watch_410_every=None, hold_every=None, delay_every=None,
                   kube_error_every=None, kill_every=None)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


@dataclasses.dataclass
class SoakConfig:
    items: int = 250
    seed: int = 1
    enqueue_seconds: float = 25.0
    max_workers: int = 40
    # Must exceed the 10 s after which a gated pod whose dispatch ended (a crash between ack and release)
    # is looked at again: the operator counts the startup timeout from the pod's creation.
    startup_timeout_seconds: int = 20
    # Well above the few seconds a lease-lost item takes to get a fresh pod: with 2 s, the TTL cleanup
    # of its previous pod can delete the fresh pod's Secret (a known defect, see the README's "Soak").
    ttl_seconds_after_finished: int = 30
    drain_timeout: float = 120.0
    faults: FaultMix = dataclasses.field(default_factory=FaultMix)
    # Worker timings (seconds): release -> Running, heartbeat -> stop.
    run_after: tuple[float, float] = (0.02, 0.2)
    work_for: tuple[float, float] = (0.05, 0.5)
    # Drop what the harness records (API requests, Kubernetes calls, debug logs) once read, so that a long
    # soak's memory is the operator's and the simulated cluster's, not the test record's.
    prune_records: bool = False
    rss_of: Callable[[], int] | None = None  # bytes; default: this process
    rss_label: str = "this process (the operator runs in a thread of it)"
    progress: Callable[[str], None] | None = None


# ----- records --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PodRecord:
    uid: str
    name: str
    work_id: str
    fate: str = "serve"
    released_at: float | None = None
    ran_at: float | None = None
    ended_at: float | None = None
    item_state_at_run: str | None = None
    heartbeat_ok: bool = False
    served: bool = False
    note: str = ""


@dataclasses.dataclass
class ItemRecord:
    work_id: str
    enqueued_at: float
    acked_at: float | None = None
    acks_ok: int = 0
    pods: list[PodRecord] = dataclasses.field(default_factory=list)

    @property
    def served(self) -> bool:
        return any(p.served for p in self.pods)

    @property
    def faulted(self) -> bool:
        """Whether the soak gave one of its pods a fault (its fate, or API faults its worker gave up on).

        A pod that could not start for the operator's own doing (released without its Secret) or whose
        worker found its item already stopped is no fault of the soak's: such an item, stopped unserved,
        counts as lost."""
        return any(p.fate != "serve" or p.note.startswith("worker gave up") for p in self.pods)


@dataclasses.dataclass
class SoakResult:
    config: SoakConfig
    lost: list[str]
    served_twice: list[str]
    hanging: list[str]
    anomalies: list[str]
    dispatch_p50: float | None
    dispatch_p99: float | None
    drain_seconds: float | None
    total_seconds: float
    rss_start: int
    rss_end: int
    rss_samples: list[tuple[float, int]]
    operator_starts: int
    served: int
    stopped_after_fault: int
    fates: Counter[str]
    api_faults_fired: Counter[str]
    episodes: Counter[str]
    events: list[tuple[float, str]]
    redelivered: list[str]  # items served again after their first worker died unnoticed (lease expiry)
    details: dict[str, str]
    latencies: list[tuple[float, float]]  # (enqueued, seconds after the soak began; enqueue -> acked)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.served_twice or self.hanging)

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.0f} ms"

        lines = [
            f"items: {self.config.items} (seed {self.config.seed}); served {self.served}, "
            f"stopped after a pod fault {self.stopped_after_fault}",
            f"items lost: {len(self.lost)}; served twice: {len(self.served_twice)}; "
            f"left hanging: {len(self.hanging)}",
            f"dispatch latency (enqueue -> acked): p50 {ms(self.dispatch_p50)}, p99 {ms(self.dispatch_p99)}",
            f"time to drain: {'-' if self.drain_seconds is None else f'{self.drain_seconds:.1f} s'}; "
            f"total {self.total_seconds:.1f} s",
            f"RSS ({self.config.rss_label}): start {self.rss_start / 2**20:.0f} MiB, "
            f"end {self.rss_end / 2**20:.0f} MiB",
            f"operator starts: {self.operator_starts}; pod fates: {dict(self.fates)}",
            f"API fault rules fired: {dict(self.api_faults_fired)}",
            f"fault episodes: {dict(self.episodes)}",
            f"served again by a fresh pod after its lease ran out: {len(self.redelivered)}",
        ]
        if self.anomalies:
            lines.append(f"anomalies ({len(self.anomalies)}): {self.anomalies[:10]}")
        shown = [*self.lost, *self.served_twice, *self.hanging, *(a.split(":")[0] for a in self.anomalies)]
        for work_id in list(dict.fromkeys(shown))[:10]:
            lines.append(f"  {work_id}: {self.details.get(work_id, '')}")
        return "\n".join(lines)


def wall() -> str:
    """Wall-clock time as the operator's log lines show it, to line events up with them."""
    now = time.time()
    return f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d}"


def process_rss() -> int:
    return rss_of_pid(os.getpid())


def rss_of_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


# ----- the kubelet and the workers ------------------------------------------------------------------------


class SoakCluster:
    """Plays the kubelet and the worker of every pod of the pool (see the module docstring)."""

    def __init__(self, world: World, config: SoakConfig, rng: random.Random, items: dict[str, ItemRecord],
                 anomalies: list[str], clock: Callable[[], float], crash_lock: asyncio.Lock) -> None:
        self.world = world
        self.crash_lock = crash_lock  # held by crashes and watch breaks
        self.vanished_open: set[str] = set()  # work ids whose pod vanished, not stopped yet
        self.disrupted_until = 0.0  # when the operator last (re)started watching: a start or a resumed watch
        self.kube = world.kube
        self.kubelet = world.kubelet
        self.config = config
        self.rng = rng
        self.items = items
        self.anomalies = anomalies
        self.clock = clock
        self.injecting = True
        self.operator_up = asyncio.Event()  # started, watching, and its pod index filled
        self.operator_up.set()
        self.pods: dict[str, PodRecord] = {}  # uid -> record
        self.running: dict[str, set[str]] = {}  # work id -> uids of its pods Running now
        self.fates: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._terminating: set[str] = set()
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200),
                                           timeout=aiohttp.ClientTimeout(total=15))
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._watch(ready))
        await ready.wait()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.anomalies.append(f"harness: {task.exception()!r}")
            log.error("soak cluster task failed", exc_info=task.exception())

    async def _watch(self, ready: asyncio.Event) -> None:
        changes = self.kube.changes(PODS)
        iterator = aiter(changes)
        first = asyncio.ensure_future(anext(iterator))
        await asyncio.sleep(0)  # the generator is now subscribed at the current end of the history
        ready.set()
        pending: asyncio.Future[Any] | None = first
        while True:
            change = await pending if pending is not None else await anext(iterator)
            pending = None
            pod = change.object
            meta = pod["metadata"]
            uid = meta["uid"]
            if change.type == "DELETED":
                record = self.pods.get(uid)
                if record is not None and record.ended_at is None:
                    record.ended_at = self.clock()
                    self.running.get(record.work_id, set()).discard(uid)
                continue
            if waits_for_kubelet(pod) and uid not in self._terminating:
                self._terminating.add(uid)
                self._spawn(self._finish_termination(meta["name"], uid))
            if gated(pod) or meta.get("deletionTimestamp") or uid in self.pods:
                continue
            if (pod.get("status") or {}).get("phase", "Pending") != "Pending":
                continue
            work_id = (meta.get("annotations") or {}).get(ANNOTATION_WORK_ID, "")
            record = PodRecord(uid, meta["name"], work_id, fate=self._fate(), released_at=self.clock())
            self.pods[uid] = record
            self.fates[record.fate] += 1
            item = self.items.get(work_id)
            if item is None:
                self.anomalies.append(f"pod {meta['name']} for unknown work item {work_id}")
            else:
                item.pods.append(record)
            self._spawn(self._pod(record))

    def _fate(self) -> str:
        if not self.injecting:
            return "serve"
        mix = self.config.faults
        roll = self.rng.random()
        for fate, rate in (("fail_running", mix.pod_fail_running), ("fail_start", mix.pod_fail_start),
                           ("vanish_running", mix.pod_vanish_running), ("vanish_pending", mix.pod_vanish_pending),
                           ("hang_pending", mix.pod_hang_pending), ("lease_lost", mix.pod_lease_lost)):
            if roll < rate:
                return fate
            roll -= rate
        return "serve"

    async def _finish_termination(self, name: str, uid: str) -> None:
        await asyncio.sleep(0.05)
        pod = self.kube.get(PODS, name, self.world.namespace)
        if pod is not None and pod["metadata"]["uid"] == uid and waits_for_kubelet(pod):
            self.kubelet.finish_termination(name, self.world.namespace)

    def _current(self, record: PodRecord) -> dict[str, Any] | None:
        pod = self.kube.get(PODS, record.name, self.world.namespace)
        if pod is None or pod["metadata"]["uid"] != record.uid or pod["metadata"].get("deletionTimestamp"):
            return None
        return pod

    def _end(self, record: PodRecord) -> None:
        if record.ended_at is None:
            record.ended_at = self.clock()
        self.running.get(record.work_id, set()).discard(record.uid)

    async def _pod(self, record: PodRecord) -> None:
        namespace = self.world.namespace
        await asyncio.sleep(self.rng.uniform(*self.config.run_after))
        if self._current(record) is None:
            self._end(record)
            return
        if record.fate == "vanish_pending":
            await self._vanish(record)
            self._end(record)
            return
        if record.fate == "hang_pending":
            self.kubelet.image_pull_backoff(record.name, namespace)
            return  # the operator's startup timeout ends it
        secret = self.kube.get(SECRETS, work_secret_name(record.work_id), namespace)
        if secret is None:
            self.anomalies.append(f"{record.work_id}: pod {record.name} released without its Secret")
            record.note = "released without its Secret"
            self.kubelet.waiting(record.name, namespace, "CreateContainerConfigError",
                                 f'secret "{work_secret_name(record.work_id)}" not found')
            return
        token = sessions_token(base64.b64decode(secret["data"]["work-secret"]).decode())
        state = self.world.emulator.state.work[record.work_id].state
        try:
            self.kubelet.run(record.name, namespace)
        except (LookupError, GatedPodError):
            self._end(record)
            return
        record.ran_at = self.clock()
        record.item_state_at_run = str(state)
        others = self.running.setdefault(record.work_id, set())
        if others:
            self.anomalies.append(f"{record.work_id}: pod {record.uid} Running while {sorted(others)} still run")
        others.add(record.uid)
        if record.fate == "fail_start":
            await asyncio.sleep(0.02)
            self._finish(record, exit_code=1)
            return
        beat = await self._call(record, "heartbeat", token)
        if beat is None:
            record.note = "worker gave up on its heartbeat"
            self._finish(record, exit_code=1)
            return
        status, body = beat
        if status == 200 and body.get("lease_extended"):
            record.heartbeat_ok = True
        else:
            record.note = f"heartbeat answered {status} {body.get('state') or body.get('error', {}).get('message')}"
            self._finish(record, exit_code=0)  # the SDK gives the item up; the worker exits 0
            return
        last_beat = str(body.get("last_heartbeat") or "")
        await asyncio.sleep(self.rng.uniform(*self.config.work_for))
        if record.fate == "lease_lost":
            with contextlib.suppress(ValueError):  # already stopped, or queued again: nothing to expire
                self.world.emulator.state.expire_lease(record.work_id)
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))  # offered again meanwhile, while this pod runs
            again = await self._call(record, "heartbeat", token, expected=last_beat)
            if again is None or again[0] != 200 or not again[1].get("lease_extended"):
                record.note = f"lease lost; next heartbeat answered {again[0] if again else 'nothing'}"
                self._finish(record, exit_code=0)  # the SDK gives the item up; the worker exits 0
                return
            record.note = "lease lost, yet the next heartbeat was accepted"
            self.anomalies.append(f"{record.work_id}: {record.note} ({again[1]})")
        if record.fate == "fail_running":
            self._finish(record, exit_code=137)
            return
        if record.fate == "vanish_running":
            await self._vanish(record)
            self._end(record)
            return
        stop = await self._call(record, "stop", token)
        if stop is None:
            record.note = "worker gave up on its stop"
            self._finish(record, exit_code=1)
            return
        if stop[0] in (200, 409):
            record.served = True
        else:
            record.note = f"stop answered {stop[0]}"
        self._finish(record, exit_code=0)

    async def _vanish(self, record: PodRecord) -> None:
        """The pod disappears (as a node loss or someone's ``kubectl delete --force`` would have it).

        Unless ``unnoticed_vanish``, only where the operator cannot miss it: while it runs and watches,
        once the pod has existed ``notice_seconds`` and the operator's last start or watch resumption is
        that long ago (so that a pass of its pool has seen the pod), and with no crash or watch break
        at the same time (the crash lock). ``vanishes_noticed`` then holds off crashes until the item
        is stopped.
        """
        if self.config.faults.unnoticed_vanish:
            if self._current(record) is not None:
                self.kubelet.vanish(record.name, self.world.namespace)
            return
        while True:
            await self.operator_up.wait()
            notice = self.config.faults.notice_seconds
            due = max((record.released_at or 0.0) + notice, self.disrupted_until + notice)
            if self.clock() < due:
                await asyncio.sleep(due - self.clock())
                continue
            async with self.crash_lock:  # no crash, no broken watch meanwhile
                if not self.operator_up.is_set() or self.clock() < self.disrupted_until + notice:
                    continue
                if self._current(record) is not None:
                    self.kubelet.vanish(record.name, self.world.namespace)
                    self.vanished_open.add(record.work_id)
                return

    async def vanishes_noticed(self, timeout: float = 30.0) -> None:
        """Until the item of every pod that vanished is stopped (the operator acted on each vanish)."""
        deadline = self.clock() + timeout
        work = self.world.emulator.state.work
        while self.clock() < deadline:
            self.vanished_open = {w for w in self.vanished_open if str(work[w].state) != "stopped"}
            if not self.vanished_open:
                return
            await asyncio.sleep(0.1)

    def _finish(self, record: PodRecord, *, exit_code: int) -> None:
        if self._current(record) is not None:
            pod = self.kube.get(PODS, record.name, self.world.namespace) or {}
            if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                if exit_code == 0:
                    self.kubelet.succeed(record.name, self.world.namespace)
                elif exit_code == 137:
                    self.kubelet.fail(record.name, self.world.namespace, exit_code=137, reason="OOMKilled")
                else:
                    self.kubelet.fail(record.name, self.world.namespace, exit_code=exit_code)
        self._end(record)

    async def _call(self, record: PodRecord, verb: str, token: str,
                    expected: str | None = None) -> tuple[int, dict[str, Any]] | None:
        """The worker's heartbeat (with ``expected_last_heartbeat``, as the SDK sends it) or force-stop with
        its sessions token, retried as the SDK retries (5xx, 429 after its retry-after, dropped
        connections), for at most a minute. A heartbeat whose answer was lost is retried without the
        precondition (the first attempt may have moved the stored heartbeat on)."""
        assert self._http is not None
        env_id = self.world.environment.id
        url = f"{self.world.emulator.base_url}/v1/environments/{env_id}/work/{record.work_id}/{verb}"
        params = {"desired_ttl_seconds": "90"} if verb == "heartbeat" else {}
        if verb == "heartbeat" and expected is not None:
            params["expected_last_heartbeat"] = expected
        body = {"force": True} if verb == "stop" else {}
        deadline = self.clock() + 60
        attempt = 0
        while self.clock() < deadline:
            attempt += 1
            pause = min(0.05 * 2 ** attempt, 2.0) * self.rng.uniform(0.5, 1.0)
            try:
                async with self._http.post(url, params=params, json=body,
                                           headers={"Authorization": f"Bearer {token}"}) as response:
                    status = response.status
                    text = await response.text()
                    retry_after = response.headers.get("retry-after-ms")
            except (aiohttp.ClientError, TimeoutError):
                params.pop("expected_last_heartbeat", None)
                await asyncio.sleep(pause)
                continue
            if status == 429 or status >= 500:
                await asyncio.sleep(max(pause, int(retry_after) / 1000 if retry_after else 0))
                continue
            try:
                parsed = json.loads(text) if text else {}
            except ValueError:
                parsed = {}
            return status, parsed if isinstance(parsed, dict) else {}
        return None


# ----- fault episodes --------------------------------------------------------------------------------------


class Faults:
    """The fault schedule: background API rules, and episodes at random intervals until ``stop()``."""

    def __init__(self, world: World, config: SoakConfig, rng: random.Random, events: list[tuple[float, str]],
                 clock: Callable[[], float], restart: Callable[[str], Coroutine[Any, Any, None]],
                 cluster: SoakCluster) -> None:
        self.world = world
        self.kube = world.kube
        self.config = config
        self.mix = config.faults
        self.rng = rng
        self.events = events
        self.clock = clock
        self.restart = restart
        self.cluster = cluster
        self.crash_lock = cluster.crash_lock  # crashes, watch breaks and (noticed) vanishes do not overlap
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.started = clock()
        self.fired: Counter[str] = Counter()  # API fault rules, by route and effect: how often they fired
        self.episodes: Counter[str] = Counter()

    def note(self, text: str, kind: str | None = None) -> None:
        self.events.append((self.clock(), f"{wall()} {text}"))
        if kind:
            self.episodes[kind] += 1
        log.info("soak: %s", text)

    def start(self) -> None:
        self.started = self.clock()
        mix = self.mix
        rules: list[dict[str, Any]] = []
        for route in API_ROUTES:
            if mix.api_5xx:
                rules.append({"route": route, "effect": "error", "status": 503, "rate": mix.api_5xx})
                rules.append({"route": route, "effect": "error", "status": 500, "rate": mix.api_5xx / 3})
            if mix.api_429:
                rules.append({"route": route, "effect": "error", "status": 429, "rate": mix.api_429,
                              "retry_after_ms": self.rng.randint(*mix.api_429_retry_after_ms)})
            if mix.api_drop:
                rules.append({"route": route, "effect": "drop", "rate": mix.api_drop})
            if mix.api_drop_after and route in ("work.ack", "work.stop"):
                rules.append({"route": route, "effect": "drop", "when": "after", "rate": mix.api_drop_after})
            if mix.api_latency:
                rules.append({"route": route, "effect": "latency", "rate": mix.api_latency,
                              "latency_ms": self.rng.randint(*mix.api_latency_ms)})
        if rules:
            self.world.emulator.faults.add({"seed": self.config.seed, "faults": rules})
            self.note(f"API fault rules on: {len(rules)}")
        episodes: list[tuple[tuple[float, float] | None, Callable[[], Coroutine[Any, Any, None]]]] = [
            (mix.api_burst_every if mix.api_burst_every[0] < 1e8 else None, self.api_burst),
            (mix.ack_lost_every, self.ack_lost),
            (mix.watch_410_every, self.watch_410),
            (mix.hold_every, self.hold),
            (mix.delay_every, self.delay),
            (mix.kube_error_every, self.kube_error),
            (mix.kill_every, self.kill),
        ]
        for every, episode in episodes:
            if every is not None:
                self._tasks.append(asyncio.create_task(self._every(every, episode)))

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for rule in self.world.emulator.faults.rules:
            self._count(rule)
        self.world.emulator.faults.clear()
        self.kube.clear_faults()
        self.note("every fault cleared")

    async def _every(self, every: tuple[float, float], episode: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.rng.uniform(*every))
            if self._stopping.is_set():
                return
            await episode()
            self._prune_matchers()

    def _prune_matchers(self) -> None:
        server = self.kube.server
        for matchers in (server.faults, server.delays):
            matchers[:] = [m for m in matchers if m.times is None or m.hits < m.times]

    async def _sleep(self, low: float, high: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.rng.uniform(low, high))

    async def _window(self, rule: dict[str, Any], text: str, kind: str) -> None:
        """A fault rule for a short window (1-3 s, and at most its ``times``): a blip lasts a while, however
        few requests arrive meanwhile (a rule left until its ``times`` ran out would fail every later
        request while the operator backs off, and keep it backing off)."""
        (added,) = self.world.emulator.faults.add({"faults": [rule]})
        self.note(text, kind)
        await self._sleep(1.0, 3.0)
        with contextlib.suppress(ValueError):
            self.world.emulator.faults.rules.remove(added)
        self._count(added)

    def _count(self, rule: Any) -> None:
        kind = rule.effect if rule.effect != "error" else str(rule.status)
        self.fired[f"{rule.route} {kind}{' after' if rule.when == 'after' else ''}"] += rule.fired

    async def api_burst(self) -> None:
        route = self.rng.choice(API_ROUTES)
        times = self.rng.randint(2, 6)
        if self.rng.random() < 0.5:
            rule = {"route": route, "effect": "error", "status": 429, "times": times,
                    "retry_after_ms": self.rng.randint(*self.mix.api_429_retry_after_ms)}
        else:
            rule = {"route": route, "effect": "error", "status": self.rng.choice([500, 502, 503, 504]),
                    "times": times}
        await self._window(rule, f"API burst: {route} {rule['status']} (up to {times} requests)", "api burst")

    async def ack_lost(self) -> None:
        times = self.rng.randint(4, 8)
        await self._window({"route": "work.ack", "effect": "drop", "when": "after", "times": times},
                           f"API blip: acks applied, their answers dropped (up to {times})", "ack answers lost")

    async def watch_410(self) -> None:
        """Pod watches held and broken, pods move on meanwhile, history compacted: the resumed watches
        get 410 Gone and kopf relists, seeing no DELETED event for what went meanwhile."""
        async with self.crash_lock:
            hold = self.kube.hold("watch", PODS, apply_first=False, times=None)
            broken = self.kube.break_watches(PODS)
            await self._sleep(0.3, 3.0)
            self.kube.compact(PODS)
            hold.times = 0  # no more watches are held; those waiting are released into the 410
            hold.release()
            self.kube.server.holds.remove(hold)
            self.cluster.disrupted_until = self.clock()
            self.note(f"pod watches broken ({broken}), held, compacted: resumed watches get 410", "watch 410")

    async def hold(self) -> None:
        verb, resource = self.rng.choice([("create", PODS), ("create", PODS), ("create", SECRETS),
                                          ("patch", PODS)])
        apply_first = self.rng.random() < 0.5
        hold = self.kube.hold(verb, resource, apply_first=apply_first, times=1)
        try:
            await asyncio.wait_for(hold.arrived.wait(), 10.0)
        except TimeoutError:
            hold.times = 0
            hold.release()
            self.kube.server.holds.remove(hold)
            return
        crash = apply_first and verb == "create" and self.rng.random() < self.mix.kill_while_held \
            and self.may_crash()
        self.note(f"held {verb} {resource.plural} ({'applied' if apply_first else 'not applied'}"
                  f"{', then the operator crashes' if crash else ''})", f"held {verb} {resource.plural}")
        if crash:
            self.episodes["operator crash while a create is held"] += 1
            async with self.crash_lock:
                if not self.mix.unnoticed_vanish:
                    await self.cluster.vanishes_noticed()
                await self.restart(f"while a {verb} {resource.plural} was held")
                hold.release()
        else:
            await self._sleep(*self.mix.hold_seconds)
            hold.release()
        self.kube.server.holds.remove(hold)

    async def delay(self) -> None:
        seconds = round(self.rng.uniform(0.5, 3.0), 2)
        times = self.rng.randint(1, 5)
        self.kube.delay("create", PODS, seconds, times=times)
        self.note(f"next {times} pod creates delayed {seconds} s", "slow pod create")

    async def kube_error(self) -> None:
        verb, resource = self.rng.choice([("create", PODS), ("create", SECRETS), ("patch", PODS), ("delete", PODS)])
        code = self.rng.choice([500, 503, 429])
        self.kube.fail(verb, resource, code=code, times=1)
        self.note(f"next {verb} {resource.plural} fails {code}", f"failed {verb} {resource.plural}")

    def may_crash(self) -> bool:
        return self.clock() - self.started < self.mix.kills_until * self.config.enqueue_seconds

    async def kill(self) -> None:
        if not self.may_crash():
            return
        async with self.crash_lock:
            if not self.mix.unnoticed_vanish:
                await self.cluster.vanishes_noticed()
            self.episodes["operator crash"] += 1
            await self.restart("at a random point")


# ----- the soak --------------------------------------------------------------------------------------------


class _Harvest:
    """Reads acks out of the recorded API requests (and drops the records, if asked)."""

    def __init__(self, world: World, items: dict[str, ItemRecord], prune: bool) -> None:
        self.world = world
        self.items = items
        self.prune = prune
        self.position = 0
        self.open: list[Any] = []  # requests not answered yet when last read
        self.responses: list[Any] = getattr(world, "responses", [])

    def run(self) -> None:
        responses = self.responses
        end = len(responses)
        fresh = self.open + responses[self.position:end]
        self.open = [r for r in fresh if r.status is None]
        for record in fresh:
            if record.status != 200 or record.method != "POST" or not record.path.endswith("/ack"):
                continue
            item = self.items.get(record.path.split("/")[-2])
            if item is not None:
                item.acks_ok += 1
                if item.acked_at is None or record.at < item.acked_at:
                    item.acked_at = record.at
        if self.prune:
            del responses[:end]
            self.position = 0
        else:
            self.position = end

    def prune_kube_and_logs(self) -> None:
        if not self.prune:
            return
        self.world.kube.calls.clear()
        logs = getattr(self.world.operator, "logs", None)
        if isinstance(logs, list):
            logs[:] = [r for r in logs if r.levelno >= logging.WARNING][-5000:]


async def run_soak(world: World, config: SoakConfig) -> SoakResult:
    """Run the soak described in the module docstring on ``world``; returns the figures and findings."""
    loop = asyncio.get_running_loop()
    clock = loop.time
    rng = random.Random(config.seed)
    items: dict[str, ItemRecord] = {}
    anomalies: list[str] = []
    events: list[tuple[float, str]] = []
    rss_of = config.rss_of or process_rss
    say = config.progress or (lambda text: None)
    started = clock()
    world.kube.graceful_pod_deletion = True

    cluster = SoakCluster(world, config, random.Random(rng.random()), items, anomalies, clock, asyncio.Lock())
    await cluster.start()

    async def restart(why: str) -> None:
        cluster.operator_up.clear()
        world.operator.kill()
        events.append((clock(), f"{wall()} operator killed {why}"))
        log.info("soak: operator killed %s", why)
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # down for a moment
        await world.operator.start()
        events.append((clock(), f"{wall()} operator started again"))
        cluster.disrupted_until = clock()
        await asyncio.sleep(1.0)  # watching: its first pod list is in its index
        cluster.operator_up.set()

    faults = Faults(world, config, random.Random(rng.random()), events, clock, restart, cluster)
    harvest = _Harvest(world, items, config.prune_records)
    world.create_pool(maxWorkers=config.max_workers, startupTimeoutSeconds=config.startup_timeout_seconds,
                      ttlSecondsAfterFinished=config.ttl_seconds_after_finished)
    await asyncio.sleep(0.5)  # the pool's first pass
    rss_start = rss_of()
    rss_samples = [(0.0, rss_start)]
    faults.start()

    # Enqueue in random batches over enqueue_seconds.
    enqueued = 0
    enqueue_started = clock()
    last_report = clock()
    while enqueued < config.items:
        elapsed = clock() - enqueue_started
        due = config.items if elapsed >= config.enqueue_seconds else \
            int(config.items * elapsed / config.enqueue_seconds)
        batch = min(config.items - enqueued, max(0, due - enqueued) + (rng.randint(0, 3) if rng.random() < 0.3 else 0))
        if batch:
            now = clock()
            for item in enqueue_sessions(world.emulator, world.environment.id, batch):
                items[item.id] = ItemRecord(item.id, now)
            enqueued += batch
        await asyncio.sleep(rng.uniform(0.02, 0.3))
        harvest.run()
        if clock() - last_report >= 10:
            last_report = clock()
            if not cluster.crash_lock.locked():  # an operator start reads the Kubernetes calls
                harvest.prune_kube_and_logs()
            rss_samples.append((clock() - started, rss_of()))
            say(_progress(items, cluster, world, clock() - started, rss_samples[-1][1]))
    await faults.stop()
    cluster.injecting = False
    if not world.operator.running:
        await world.operator.start()
    cluster.operator_up.set()
    injection_over = clock()
    events.append((injection_over, f"{wall()} injection over; {enqueued} items enqueued"))

    # Drain: every item stopped.
    def open_items() -> list[str]:
        work = world.emulator.state.work
        return [w for w in items if str(work[w].state) != "stopped"]

    deadline = injection_over + config.drain_timeout
    drained_at: float | None = None
    while clock() < deadline:
        harvest.run()
        if not open_items():
            drained_at = clock()
            break
        await asyncio.sleep(0.2)
        if clock() - last_report >= 10:
            last_report = clock()
            if not cluster.crash_lock.locked():  # an operator start reads the Kubernetes calls
                harvest.prune_kube_and_logs()
            rss_samples.append((clock() - started, rss_of()))
            say(_progress(items, cluster, world, clock() - started, rss_samples[-1][1]))
    # Let the last pods finish and be cleaned up, so the end RSS is a settled one.
    await asyncio.sleep(3.0 if drained_at else 0)
    harvest.run()
    harvest.prune_kube_and_logs()
    rss_end = rss_of()
    rss_samples.append((clock() - started, rss_end))
    await cluster.stop()

    result = _judge(world, config, items, cluster, anomalies, events)
    latencies = [i.acked_at - i.enqueued_at for i in items.values() if i.acked_at is not None]
    return SoakResult(
        config=config, lost=result["lost"], served_twice=result["served_twice"], hanging=result["hanging"],
        anomalies=anomalies, dispatch_p50=statistics.median(latencies) if latencies else None,
        dispatch_p99=percentile(latencies, 0.99), drain_seconds=None if drained_at is None else
        drained_at - injection_over, total_seconds=clock() - started, rss_start=rss_start, rss_end=rss_end,
        rss_samples=rss_samples, operator_starts=world.operator.starts,
        served=sum(1 for i in items.values() if i.served),
        stopped_after_fault=sum(1 for i in items.values() if not i.served and i.faulted),
        fates=cluster.fates, api_faults_fired=faults.fired, episodes=faults.episodes, events=events,
        redelivered=result["redelivered"], details=result["details"],
        latencies=sorted((i.enqueued_at - started, i.acked_at - i.enqueued_at) for i in items.values()
                         if i.acked_at is not None))


def _progress(items: dict[str, ItemRecord], cluster: SoakCluster, world: World, elapsed: float, rss: int) -> str:
    states = Counter(str(world.emulator.state.work[w].state) for w in items)
    return (f"[{elapsed:6.1f} s] items {len(items)}: {dict(states)}; pods seen {len(cluster.pods)}; "
            f"operator starts {world.operator.starts}; RSS {rss / 2**20:.0f} MiB")


def _judge(world: World, config: SoakConfig, items: dict[str, ItemRecord], cluster: SoakCluster,
           anomalies: list[str], events: list[tuple[float, str]]) -> dict[str, Any]:
    work = world.emulator.state.work
    pods_now: dict[str, list[dict[str, Any]]] = {}
    for pod in world.kube.list(PODS, world.namespace):
        work_id = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_WORK_ID, "")
        pods_now.setdefault(work_id, []).append(pod)
    lost, twice, hanging, redelivered = [], [], [], []
    details: dict[str, str] = {}
    for work_id, item in items.items():
        state = str(work[work_id].state)
        ran = sorted((p for p in item.pods if p.ran_at is not None), key=lambda p: p.ran_at or 0)
        # A second worker is a double serve unless every earlier one had died of a fault (vanished, failed)
        # before the later pod was released: then the item came back by its lease, as it is meant to.
        double = any(p.item_state_at_run == "queued" for p in ran)
        for earlier, later in itertools.pairwise(ran):
            died_first = earlier.fate != "serve" and earlier.ended_at is not None \
                and later.released_at is not None and earlier.ended_at <= later.released_at
            if died_first and not earlier.served:
                redelivered.append(work_id)
            else:
                double = True
        if double:
            twice.append(work_id)
        if state != "stopped":
            (hanging if pods_now.get(work_id) else lost).append(work_id)
        elif not item.served and not item.faulted:
            lost.append(work_id)
        if work_id in lost or work_id in twice or work_id in hanging or work_id in redelivered:
            details[work_id] = (
                f"state {state}; successful acks {item.acks_ok}; pods: "
                + "; ".join(f"{p.name} uid {p.uid[:8]} fate {p.fate}, released {_t(p.released_at)}, "
                            f"ran {_t(p.ran_at)} (item {p.item_state_at_run}), ended {_t(p.ended_at)}, "
                            f"heartbeat {'ok' if p.heartbeat_ok else 'no'}, served {p.served} {p.note}"
                            for p in item.pods)
                + "; in the apiserver now: "
                + (", ".join(f"{p['metadata']['uid'][:8]} {(p.get('status') or {}).get('phase')}"
                             f"{' gated' if gated(p) else ''}"
                             f"{' deleting' if p['metadata'].get('deletionTimestamp') else ''}"
                             for p in pods_now.get(work_id, [])) or "no pod"))
    for anomaly in anomalies:
        work_id = anomaly.split(":")[0]
        if "still run" in anomaly and work_id not in twice:
            twice.append(work_id)
        if work_id in details:
            details[work_id] += "; history: " + history(world.kube, work_id)
        elif work_id in items:
            item = items[work_id]
            details[work_id] = (f"state {work[work_id].state}; pods: " + "; ".join(
                f"{p.name} uid {p.uid[:8]} fate {p.fate}, released {_t(p.released_at)}, ran {_t(p.ran_at)}, "
                f"ended {_t(p.ended_at)}, served {p.served} {p.note}" for p in item.pods)
                + "; history: " + history(world.kube, work_id))
    return {"lost": lost, "served_twice": twice, "hanging": hanging, "redelivered": redelivered,
            "details": details}


def history(kube: Kube, work_id: str) -> str:
    """Every change of the item's pods and Secret in the apiserver, in order (revision, what, which)."""
    from environments_operator.domain.worker_manifests import worker_pod_name

    pod, secret = worker_pod_name(work_id), work_secret_name(work_id)
    lines = []
    for resource, name in ((PODS, pod), (SECRETS, secret)):
        for change in kube.server._changes.get(resource.key, []):
            obj = change.object
            if obj["metadata"]["name"] != name:
                continue
            what = f"{resource.kind} {change.type} uid {obj['metadata'].get('uid', '')[:8]}"
            if resource is PODS:
                what += (f" {(obj.get('status') or {}).get('phase', '-')}{' gated' if gated(obj) else ''}"
                         f"{' deleting' if obj['metadata'].get('deletionTimestamp') else ''}")
            lines.append((change.revision, what))
    return ", ".join(f"r{revision} {what}" for revision, what in sorted(lines))


def _t(moment: float | None) -> str:
    if moment is None:
        return "-"
    at = time.time() - (asyncio.get_running_loop().time() - moment)
    return f"{time.strftime('%H:%M:%S', time.localtime(at))}.{int(at % 1 * 1000):03d}"


def log_lines_about(logs: Any, work_ids: list[str], limit: int = 40) -> list[str]:
    """The operator's log lines that name one of ``work_ids`` (or its pod), for a defect report."""
    from environments_operator.domain.worker_manifests import worker_pod_name

    needles = [*work_ids, *(worker_pod_name(w) for w in work_ids)]
    lines = []
    for record in logs:
        message = record.getMessage()
        if any(n in message for n in needles):
            lines.append(f"{time.strftime('%H:%M:%S', time.localtime(record.created))}"
                         f".{int(record.msecs):03d} {record.levelname} {record.name}: {message}")
    return lines[-limit:]
