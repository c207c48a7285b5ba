"""Each part of the WorkerPool controller on its own, driven by fakes of its neighbours (no kopf, no apiserver, no API).

The parts are wired as ``PoolDispatcher`` wires them; the fakes stand in for the Kubernetes client, the
work queue, and, where a part has one, the neighbouring part.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from environments_operator.adapters.kube import KubeApiError, SecretKeyError
from environments_operator.adapters.work_api import ClaimedWork, WorkApiError
from environments_operator.domain.dispatch import ENVIRONMENT_KEY_UNAVAILABLE, EnvironmentEntry, WorkerPodView
from environments_operator.domain.pool_loop import BLOCKED_RETRY_SECONDS, STOP_RETRY_SECONDS
from environments_operator.domain.vocabulary import Backoff
from environments_operator.domain.worker_manifests import work_secret_name, worker_pod_name
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import WAKERS, PoolContext
from environments_operator.handlers.workerpool.item_dispatch import ItemDispatcher
from environments_operator.handlers.workerpool.lifecycle import OwedStop, WorkerLifecycle
from environments_operator.handlers.workerpool.loop import PoolDispatcher
from environments_operator.handlers.workerpool.pollers import PollerGroup
from environments_operator.handlers.workerpool.queue_access import QueueAccess
from environments_operator.handlers.workerpool.warm import WarmWorkers
from environments_operator.settings import load_settings

NS, POOL = "ns", "pool"
SPEC = WorkerPoolSpec.model_validate({
    "environmentId": "env_1", "environmentKeySecretRef": {"name": "key", "key": "k"}, "maxWorkers": 3,
    "startupTimeoutSeconds": 60,
})


class FakeKube:
    """Records what a part asks of Kubernetes; ``refuse`` makes creating a kind fail with that status."""

    def __init__(self) -> None:
        self.created: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.patched: list[tuple[str, str, dict[str, Any]]] = []
        self.refuse: dict[str, int] = {}
        self.secrets: list[dict[str, Any]] = []
        self.key_error: Exception | None = SecretKeyError("Secret ns/key has no key k")
        self.key_reads = 0

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind in self.refuse:
            raise KubeApiError(self.refuse[kind], "Forbidden", "exceeded quota")
        self.created.append((kind, body["metadata"]["name"]))
        return {**body, "metadata": {**body["metadata"], "uid": f"uid-{body['metadata']['name']}"}}

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name, "uid": f"uid-{name}"}} if kind == "Secret" else None

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patched.append((kind, name, patch))
        return {}

    async def delete_if_present(self, kind: str, namespace: str, name: str, **_: Any) -> None:
        self.deleted.append((kind, name))

    async def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return list(self.secrets)

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        self.key_reads += 1
        if self.key_error is not None:
            raise self.key_error
        return "sk-ant-envkey-test"


class FakeQueue:
    """A work queue that hands out ``items`` in order, then empty polls; records acks and stops."""

    def __init__(self, items: list[ClaimedWork] | None = None, *, poll_error: WorkApiError | None = None,
                 stop_error: WorkApiError | None = None) -> None:
        self.items = list(items or [])
        self.poll_error = poll_error
        self.stop_error = stop_error
        self.acked: list[str] = []
        self.stopped: list[str] = []
        self.polls = 0

    async def poll(self, *, block_ms: int, reclaim_older_than_ms: int) -> ClaimedWork | None:
        self.polls += 1
        await asyncio.sleep(0)
        if self.poll_error is not None:
            raise self.poll_error
        return self.items.pop(0) if self.items else None

    async def ack(self, work_id: str) -> None:
        self.acked.append(work_id)

    async def stop(self, work_id: str, *, force: bool) -> None:
        if self.stop_error is not None:
            raise self.stop_error
        self.stopped.append(work_id)


def session_item(work_id: str) -> ClaimedWork:
    return ClaimedWork(work_id=work_id, environment_id="env_1", work_type="session", session_id=f"s-{work_id}",
                       secret="tok")


def make_context(kube: FakeKube, pods: dict[tuple[str, str], list[WorkerPodView]] | None = None) -> PoolContext:
    settings = load_settings({})
    body: Any = {"metadata": {"namespace": NS, "name": POOL, "uid": "uid-1"}}
    ctx = PoolContext(body=body, logger=_logger(), kube=kube, settings=settings,  # type: ignore[arg-type]
                      pods=pods if pods is not None else {})  # type: ignore[arg-type]
    ctx.events = []  # type: ignore[attr-defined]
    ctx.event = lambda type_, reason, message: ctx.events.append(reason)  # type: ignore[attr-defined,method-assign]
    return ctx


def _logger() -> Any:
    import logging
    return logging.getLogger("test.workerpool.parts")


# ----- item dispatch ------------------------------------------------------------------------------


def no_queue(environment_id: str | None) -> None:
    return None


async def test_item_dispatch_creates_a_gated_pod_then_its_secret_then_acks_then_releases() -> None:
    kube, queue = FakeKube(), FakeQueue()
    ctx = make_context(kube)
    items = ItemDispatcher(ctx, WorkerLifecycle(ctx, queue_for=no_queue), WarmWorkers(ctx), last_dispatch_time=None)
    await items.dispatch(queue, SPEC, session_item("w1"), claimed_at=ctx.now())  # type: ignore[arg-type]
    assert kube.created == [("Pod", worker_pod_name("w1")), ("Secret", work_secret_name("w1"))]
    assert queue.acked == ["w1"]
    assert kube.patched == [("Pod", worker_pod_name("w1"), {"spec": {"schedulingGates": None}})]
    assert "w1" in ctx.created_unseen
    assert items.last_dispatch_time is not None
    assert items.backoff == Backoff()


async def test_item_dispatch_refused_pod_deletes_nothing_backs_off_and_posts_one_event() -> None:
    kube, queue = FakeKube(), FakeQueue()
    kube.refuse["Pod"] = 403
    ctx = make_context(kube)
    items = ItemDispatcher(ctx, WorkerLifecycle(ctx, queue_for=no_queue), WarmWorkers(ctx), last_dispatch_time=None)
    for work_id in ("w1", "w2"):
        await items.dispatch(queue, SPEC, session_item(work_id), claimed_at=ctx.now())  # type: ignore[arg-type]
    assert queue.acked == []
    assert kube.deleted == []  # a Secret of the same name may be another dispatch's
    assert items.backoff.attempts == 2 and items.backoff.paused_until > ctx.now()
    assert items.backoff.problem is not None and items.backoff.problem.reason == "PodCreationForbidden"
    assert ctx.events == ["DispatchFailed"]  # type: ignore[attr-defined]  # the second, same reason, is throttled


async def test_item_dispatch_acks_and_stops_items_that_are_not_sessions() -> None:
    kube, queue = FakeKube(), FakeQueue()
    ctx = make_context(kube)
    items = ItemDispatcher(ctx, WorkerLifecycle(ctx, queue_for=no_queue), WarmWorkers(ctx), last_dispatch_time=None)
    health = ClaimedWork(work_id="h1", environment_id="env_1", work_type="healthcheck", session_id=None, secret=None)
    await items.dispatch(queue, SPEC, health, claimed_at=ctx.now())  # type: ignore[arg-type]
    assert kube.created == [] and queue.acked == ["h1"] and queue.stopped == ["h1"]


# ----- lifecycle ----------------------------------------------------------------------------------


def pending_pod(work_id: str, *, age_seconds: float) -> WorkerPodView:
    return WorkerPodView(name=worker_pod_name(work_id), namespace=NS, pool=POOL, work_id=work_id, phase="Pending",
                         created_at=datetime.now(UTC) - timedelta(seconds=age_seconds), cause="ErrImagePull: nope")


async def test_lifecycle_force_stops_the_item_of_a_pod_past_its_startup_timeout_then_deletes_it() -> None:
    kube, queue = FakeKube(), FakeQueue()
    pod = pending_pod("w1", age_seconds=120)
    ctx = make_context(kube, {(NS, POOL): [pod]})
    ctx.spec = SPEC
    lifecycle = WorkerLifecycle(ctx, queue_for=lambda env: queue)  # type: ignore[arg-type,return-value]
    await lifecycle.act(ctx.views())
    assert ctx.events == ["WorkerStartTimeout"]  # type: ignore[attr-defined]
    assert ("Pod", pod.name) in kube.deleted and ("Secret", work_secret_name("w1")) in kube.deleted
    assert queue.stopped == ["w1"] and lifecycle.pending_stops == {}
    await lifecycle.act(ctx.views())  # reported once, not on every pass
    assert ctx.events == ["WorkerStartTimeout"]  # type: ignore[attr-defined]


async def test_lifecycle_keeps_owing_a_force_stop_until_it_gets_through() -> None:
    kube = FakeKube()
    queue: FakeQueue | None = None
    ctx = make_context(kube, {(NS, POOL): [pending_pod("w1", age_seconds=120)]})
    ctx.spec = SPEC
    lifecycle = WorkerLifecycle(ctx, queue_for=lambda env: queue)  # type: ignore[arg-type,return-value]
    await lifecycle.act(ctx.views())
    assert [owed.reason for owed in lifecycle.pending_stops.values()] == ["WorkerStartTimeout"]
    assert kube.deleted == []  # the pod is the durable record of the stop owed: kept until it went through
    assert lifecycle.stop_backoff.paused_until == pytest.approx(ctx.now() + STOP_RETRY_SECONDS, abs=0.5)
    queue = FakeQueue()
    lifecycle.stop_backoff = Backoff()
    await lifecycle.act(ctx.views())
    assert queue.stopped == ["w1"] and lifecycle.pending_stops == {}
    assert ("Pod", worker_pod_name("w1")) in kube.deleted


async def test_lifecycle_leaves_a_young_pending_pod_alone_and_says_when_to_look_again() -> None:
    kube = FakeKube()
    ctx = make_context(kube, {(NS, POOL): [pending_pod("w1", age_seconds=10)]})
    ctx.spec = SPEC
    lifecycle = WorkerLifecycle(ctx, queue_for=no_queue)
    await lifecycle.act(ctx.views())
    assert kube.deleted == [] and lifecycle.pending_stops == {}
    assert lifecycle.next_lifecycle_check == pytest.approx(50, abs=1)


# ----- queue access -------------------------------------------------------------------------------


async def test_queue_access_backs_off_an_unreadable_key_secret() -> None:
    kube = FakeKube()
    ctx = make_context(kube)
    replaced: list[bool] = []

    async def before_replacing() -> None:
        replaced.append(True)

    access = QueueAccess(ctx, environments={}, before_replacing=before_replacing)
    now = ctx.now()
    problem = await access.resolve(SPEC, now)
    assert problem is not None and problem.reason == ENVIRONMENT_KEY_UNAVAILABLE
    assert await access.resolve(SPEC, now + 0.1) == problem
    assert kube.key_reads == 1  # not read again before the backoff ends
    await access.resolve(SPEC, access.key_backoff.paused_until)
    assert kube.key_reads == 2 and access.key_backoff.attempts == 2
    assert access.queue is None and replaced == []


async def test_queue_access_resolves_an_environment_ref_from_the_index() -> None:
    ctx = make_context(FakeKube())

    async def before_replacing() -> None:
        pass

    entry = EnvironmentEntry(name="e", id=None, type="self_hosted", archived=False)
    access = QueueAccess(ctx, environments={(NS, "e"): [entry]}, before_replacing=before_replacing)
    spec = WorkerPoolSpec.model_validate({"environmentRef": {"name": "e"},
                                          "environmentKeySecretRef": {"name": "key", "key": "k"}})
    problem = await access.resolve(spec, ctx.now())
    assert problem is not None and problem.reason == "EnvironmentNotReady"


# ----- pollers ------------------------------------------------------------------------------------


class FakeAccess:
    def __init__(self, queue: FakeQueue) -> None:
        self.queue = queue
        self.rereads = 0

    def reread_key(self) -> None:
        self.rereads += 1


class FakeItems:
    def __init__(self) -> None:
        self.dispatched: list[str] = []
        self.backoff = Backoff()

    async def dispatch(self, queue: Any, spec: WorkerPoolSpec, item: ClaimedWork, claimed_at: float) -> None:
        self.dispatched.append(item.work_id)


async def _until_idle(pollers: PollerGroup, *, leave_one: bool) -> None:
    for _ in range(200):
        if len(pollers.pollers) <= (1 if leave_one else 0) and not pollers.polls_in_flight:
            return
        await asyncio.sleep(0)


async def test_pollers_hand_each_claimed_item_to_dispatch_and_shrink_back_to_one() -> None:
    queue = FakeQueue([session_item("w1"), session_item("w2")])
    ctx = make_context(FakeKube())
    ctx.spec = SPEC
    items = FakeItems()
    pollers = PollerGroup(ctx, FakeAccess(queue), items)  # type: ignore[arg-type]
    pollers.ensure_poller()
    for _ in range(50):
        await asyncio.sleep(0)
    assert items.dispatched == ["w1", "w2"]
    await _until_idle(pollers, leave_one=True)
    assert len(pollers.pollers) == 1  # an idle pool keeps one long-poll
    await pollers.stop()
    assert pollers.pollers == set()


async def test_pollers_pause_and_report_a_rejected_key() -> None:
    queue = FakeQueue(poll_error=WorkApiError("work.poll", 401, "invalid key", retryable=False))
    ctx = make_context(FakeKube())
    ctx.spec = SPEC
    access = FakeAccess(queue)
    pollers = PollerGroup(ctx, access, FakeItems())  # type: ignore[arg-type]
    pollers.ensure_poller()
    await _until_idle(pollers, leave_one=False)
    assert queue.polls == 1 and access.rereads == 1
    assert pollers.backoff.problem is not None and pollers.backoff.problem.reason == "EnvironmentKeyRejected"
    assert pollers.backoff.paused_until > ctx.now()
    pollers.ensure_poller()  # paused: no poll starts
    await asyncio.sleep(0)
    assert queue.polls == 1


async def test_pollers_do_not_poll_while_dispatch_is_paused() -> None:
    queue = FakeQueue([session_item("w1")])
    ctx = make_context(FakeKube())
    ctx.spec = SPEC
    items = FakeItems()
    items.backoff = Backoff(attempts=1, paused_until=ctx.now() + 60)
    pollers = PollerGroup(ctx, FakeAccess(queue), items)  # type: ignore[arg-type]
    pollers.ensure_poller()
    await asyncio.sleep(0)
    assert queue.polls == 0 and pollers.pollers == set()


# ----- the loop and status ------------------------------------------------------------------------


class StatusKube(FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[dict[str, Any]] = []

    async def patch_custom_status(self, group: str, version: str, plural: str, namespace: str, name: str,
                                  status: dict[str, Any]) -> None:
        self.statuses.append(status)


async def test_loop_reports_an_invalid_spec_and_looks_again_on_the_blocked_beat() -> None:
    kube = StatusKube()
    memo = {"kube": kube, "settings": load_settings({}), WAKERS: {}}
    body: Any = {"metadata": {"namespace": NS, "name": POOL, "uid": "u", "generation": 2}, "spec": {"maxWorkers": 0}}
    dispatcher = PoolDispatcher(body=body, memo=memo, logger=_logger(), environments={}, pods={})  # type: ignore[arg-type]
    events: list[tuple[str, str]] = []
    dispatcher.ctx.event = lambda type_, reason, message: events.append((type_, reason))  # type: ignore[method-assign]
    nap = await dispatcher.reconcile()
    assert nap == BLOCKED_RETRY_SECONDS
    (status,) = kube.statuses
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert status["observedGeneration"] == 2
    await dispatcher.reconcile()
    assert len(kube.statuses) == 1  # nothing changed: nothing written
    assert events == [("Warning", "InvalidSpec")]  # once, when the reason appeared


# ----- cleanup of a deleted pool -----------------------------------------------------------------------


class CleanupKube(FakeKube):
    """Lists the pool's pods and Secrets by kind."""

    def __init__(self, pods: list[dict[str, Any]]) -> None:
        super().__init__()
        self.pods = pods

    async def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return list(self.pods) if kind == "Pod" else list(self.secrets) if kind == "Secret" else []


class ClosingQueue(FakeQueue):
    closed = False

    async def aclose(self) -> None:
        self.closed = True


def worker_pod(work_id: str, phase: str) -> dict[str, Any]:
    return {"metadata": {"name": worker_pod_name(work_id), "namespace": NS,
                         "labels": {"managedagents.dev/worker-pool": POOL, "managedagents.dev/work-id": work_id}},
            "status": {"phase": phase}}


async def test_cleanup_force_stops_unfinished_and_owed_items_then_deletes_pods_and_secrets() -> None:
    from environments_operator.handlers.workerpool.cleanup import end_deleted_pool

    kube = CleanupKube([worker_pod("w-running", "Running"), worker_pod("w-done", "Succeeded")])
    kube.secrets = [{"metadata": {"name": work_secret_name("w-running")}}]
    queue = ClosingQueue()
    access: Any = type("Access", (), {"queue_for": lambda self, env: queue, "close": queue.aclose})()
    dispatcher: Any = type("Dispatcher", (), {"queue": queue, "access": access,
                                              "pending_stops": {"w-owed": OwedStop("WorkerFailed", "env_1")}})()
    patch: Any = type("Patch", (), {"status": {}})()
    await end_deleted_pool(name=POOL, namespace=NS, spec={}, status={}, patch=patch,  # type: ignore[arg-type]
                           memo={"kube": kube}, logger=_logger(), dispatcher=dispatcher, environments={})
    assert sorted(queue.stopped) == ["w-owed", "w-running"]  # never the item whose pod finished
    assert sorted(kube.deleted) == sorted([("Pod", worker_pod_name("w-running")), ("Pod", worker_pod_name("w-done")),
                                           ("Secret", work_secret_name("w-running"))])
    assert queue.closed
    (ready,) = patch.status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "Deleting")
    assert "2 worker pods removed; 2 work items force-stopped" in ready["message"]


async def test_queue_access_keeps_the_client_of_a_former_environment_while_needed_then_closes_it() -> None:
    kube = FakeKube()
    kube.key_error = None
    ctx = make_context(kube)

    async def before_replacing() -> None:
        pass

    access = QueueAccess(ctx, environments={}, before_replacing=before_replacing)
    assert await access.resolve(SPEC, ctx.now()) is None
    first = access.queue
    assert first is not None and access.queue_for("env_1") is first and access.queue_for(None) is first
    moved = SPEC.model_copy(update={"environmentId": "env_2"})
    assert await access.resolve(moved, ctx.now()) is None
    assert access.queue is not first and access.queue_for("env_1") is first  # kept for env_1's pods and stops
    await access.close_unused(in_use=set(), environments_needed={"env_1"})
    assert access.queue_for("env_1") is first
    await access.close_unused(in_use=set(), environments_needed=set())
    assert "env_1" not in access.retired  # closed once nothing needs it (no API key here to reach env_1)
    assert access.queue_for("env_1") is None
    await access.close()
