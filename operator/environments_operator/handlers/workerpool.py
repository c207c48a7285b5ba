"""kopf wiring of the WorkerPool controller, mode ``PerWorkItem``: one fresh worker pod per work item.

Composition:

- Two kopf **indices** keep what the dispatch loop reads on every pass in memory: the Environments of
  each namespace (``environmentRef`` resolves without an API call) and the worker pods of each pool
  (the pod watch is filtered server-side by the pool label). kopf fills every index before any
  daemon starts, so after a restart the loop's first capacity decision already counts every pod
  that survived it: the labelled pods *are* the durable state.
- One kopf **daemon** per WorkerPool runs ``PoolDispatcher``. Its loop re-reads the live spec, resolves
  the environment and its key, acts on pod lifecycle, keeps pollers running while there is capacity,
  and writes status. It sleeps until a deadline or until a pod, Environment or WorkerPool event wakes
  it (the pod index and ``on.event`` handlers set the pool's wake-up flag).
- **Pollers** claim items: one long-poll when idle; each claim starts one more poller while capacity
  is left (so a burst is served by pipelined pollers); an empty poll retires all but one. Each claimed
  item is dispatched as DESIGN.md § "Dispatch must be exactly-once" says: per-item Secret, then Pod
  (deterministic names), then ack; AlreadyExists means "already dispatched", so only the ack follows.
  A refused creation is not acknowledged (the item is offered again after the reclaim window), is
  reported (``DispatchFailing``, an Event) and pauses polling with a backoff.
- An **on.delete** handler ends a deleted pool: it waits for the daemon to stop (no pod can appear
  behind its back), force-stops the items of unfinished pods and those still owed a force-stop, and
  deletes the pool's pods and Secrets.

Every decision is a ``domain.dispatch`` function; this module performs the I/O and reports. It returns
nothing to kopf (kopf would store a return value in an undeclared status field) and posts Events
explicitly. The environment key is read into the ``WorkQueue`` client and nowhere else: it is never
logged, never put in an Event, a status, a pod or a Secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any

import kopf

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError, KubeClient, SecretKeyError
from environments_operator.adapters.work_api import ClaimedWork, WorkApiError, WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.common import GROUP, VERSION
from environments_operator.domain.conditions import rfc3339, set_condition
from environments_operator.domain.dispatch import Blocker, DispatchFailure, PodMemory, WorkerPodView
from environments_operator.domain.environment import PLURAL as ENVIRONMENTS
from environments_operator.domain.worker_manifests import (
    LABEL_MANAGED_BY,
    LABEL_WORKER_POOL,
    MANAGED_BY,
    PoolIdentity,
    WorkAssignment,
    build_work_secret,
    build_worker_pod,
    pool_selector,
    work_secret_name,
    worker_pod_name,
)
from environments_operator.domain.workerpool import PLURAL as WORKER_POOLS
from environments_operator.domain.workerpool import QueueStatus, WorkerPoolSpec, WorkerPoolStatus
from environments_operator.settings import OperatorSettings

Logger = logging.Logger | logging.LoggerAdapter[Any]
PoolKey = tuple[str, str]

WAKERS = "workerpool_wakers"
DISPATCHER, DISPATCH_TASK = "workerpool_dispatcher", "workerpool_dispatch_task"
WORKER_POD_LABELS: dict[str, Any] = {
    LABEL_MANAGED_BY: MANAGED_BY, LABEL_WORKER_POOL: kopf.PRESENT,
}

# Queue stats feed status only; at capacity (when the pool does not poll) they are the only signal
# of the backlog, so they are read more often then.
STATS_INTERVAL_SECONDS = 10.0
STATS_INTERVAL_AT_CAPACITY_SECONDS = 2.0
# Status is a summary, not a log: one write per second at most, however busy the pool is.
STATUS_MIN_INTERVAL_SECONDS = 1.0
# The key is re-read at once when the API rejects it; this catches a rotation the API still accepts.
KEY_REFRESH_SECONDS = 300.0
# Per-item Secrets normally go with their pods; the sweep only catches those a crash left behind.
SECRET_SWEEP_INTERVAL_SECONDS = 300.0
ORPHAN_SECRET_GRACE_SECONDS = 60.0
# A pod we created is counted as ours until the pod watch shows it, at most this long.
CREATED_POD_VISIBLE_WITHIN_SECONDS = 30.0
# At shutdown, dispatches already past their claim get this long to create their pod and ack.
DISPATCH_DRAIN_SECONDS = 10.0
# While blocked, the loop looks again this often (Secrets are read, not watched).
BLOCKED_RETRY_SECONDS = 5.0
# How long the loop lets wake-ups accumulate before a pass (a burst's pod events, one pass).
COALESCE_SECONDS = 0.02
# Upper bound of the loop's sleep: a missed wake-up costs at most this much.
MAX_NAP_SECONDS = 30.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _wakers(memo: Any) -> dict[PoolKey, asyncio.Event]:
    wakers: dict[PoolKey, asyncio.Event] = memo[WAKERS]
    return wakers


@kopf.on.startup()
async def start_workerpool_controller(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Only worker pods reach the operator: the watch is filtered by the apiserver, not in memory.
    settings.watching.label_selectors["v1", "pods"] = LABEL_WORKER_POOL
    memo[WAKERS] = {}


# Async, though they never await: kopf runs plain functions in a thread pool, a hop per event.
@kopf.index(GROUP, VERSION, ENVIRONMENTS)
async def workerpool_environments(
    name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[PoolKey, dispatch.EnvironmentEntry]:
    return {(namespace or "", name): dispatch.environment_entry(name, spec, status)}


@kopf.index("v1", "pods", labels=WORKER_POD_LABELS)
async def workerpool_pods(body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[PoolKey, WorkerPodView]:
    view = dispatch.worker_pod_view(body)
    if view is None:
        return {}
    # A new or changed pod may free capacity or need lifecycle action: wake its pool. Waking from here
    # spares kopf a second handler call per pod event; the loop coalesces wake-ups (the index is
    # updated right after this returns).
    _wake(memo, (view.namespace, view.pool))
    return {(view.namespace, view.pool): view}


def _deleted(type: str | None = None, **_: Any) -> bool:
    return type == "DELETED"


@kopf.on.event("v1", "pods", labels=WORKER_POD_LABELS, when=_deleted)
async def wake_pool_on_pod_deletion(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    view = dispatch.worker_pod_view(body)
    if view is not None:
        _wake(memo, (view.namespace, view.pool))


def _wake(memo: Any, key: PoolKey) -> None:
    waker = _wakers(memo).get(key)
    if waker is not None:
        waker.set()


@kopf.on.event(GROUP, VERSION, ENVIRONMENTS)
async def wake_pools_on_environment_event(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    for (pool_namespace, _name), waker in _wakers(memo).items():
        if pool_namespace == namespace:
            waker.set()


@kopf.on.event(GROUP, VERSION, WORKER_POOLS)
async def wake_pool_on_spec_event(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    _wake(memo, (namespace or "", name))


# The daemon exits on its own when stopped, once its in-flight dispatches are done; kopf cancels it only
# if that takes longer than the backoff.
@kopf.daemon(GROUP, VERSION, WORKER_POOLS, id="workerpool-dispatch", cancellation_backoff=60.0,
             cancellation_timeout=10.0)
async def serve_workerpool(
    body: kopf.Body, memo: Any, logger: Logger, stopped: kopf.DaemonStopped, **kwargs: Any
) -> None:
    # The indices arrive as keyword arguments named after their functions.
    dispatcher = PoolDispatcher(body=body, memo=memo, logger=logger, environments=kwargs["workerpool_environments"],
                                pods=kwargs["workerpool_pods"])
    # The object's memo is shared with its deletion handler, which waits for this task to end.
    memo[DISPATCHER], memo[DISPATCH_TASK] = dispatcher, asyncio.current_task()
    await dispatcher.run(stopped)


class PoolDispatcher:
    """The dispatch loop of one WorkerPool: its in-memory view, pollers, and what it reports."""

    def __init__(self, *, body: kopf.Body, memo: Any, logger: Logger,
                 environments: kopf.Index[PoolKey, dispatch.EnvironmentEntry],
                 pods: kopf.Index[PoolKey, WorkerPodView]) -> None:
        self.body = body
        self.logger = logger
        self.kube: KubeClient = memo["kube"]
        self.settings: OperatorSettings = memo["settings"]
        self.wakers = _wakers(memo)
        self.environments = environments
        self.pods = pods
        metadata = body.get("metadata") or {}
        self.namespace = str(metadata.get("namespace") or "")
        self.name = str(metadata.get("name") or "")
        self.identity = PoolIdentity(namespace=self.namespace, name=self.name, uid=str(metadata.get("uid") or ""))
        self.key: PoolKey = (self.namespace, self.name)
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()

        self.spec: WorkerPoolSpec | None = None
        self.blocker: Blocker | None = None
        self.environment_id: str | None = None
        self.queue: WorkQueue | None = None
        self._queue_credentials: tuple[str, str] | None = None  # (environment id, key); never logged
        self._key_read_at: float | None = None

        self.pollers: set[asyncio.Task[None]] = set()
        self.polling: set[asyncio.Task[None]] = set()  # the pollers inside a poll request right now
        self.dispatching: set[str] = set()
        self.created: dict[str, float] = {}  # work id -> when its pod was created, until the watch shows it
        self.stopping = False
        self.poll_failures = 0
        self.poll_problem: Blocker | None = None
        self.poll_paused_until = 0.0
        self.dispatch_failures = 0
        self.dispatch_failure: DispatchFailure | None = None
        self.dispatch_paused_until = 0.0
        self.key_failures = 0
        self.key_problem: Blocker | None = None
        self.key_retry_at = 0.0

        self.memory = PodMemory()
        self.pending_stops: dict[str, str] = {}  # work id -> why it must be stopped
        self.stop_retry_at = 0.0
        self.next_lifecycle_check: float | None = None
        self.next_sweep_at = 0.0

        self.queue_status: QueueStatus | None = None
        self.stats_at: float | None = None
        status = body.get("status") or {}
        self.last_dispatch_time: str | None = status.get("lastDispatchTime")
        self.conditions: list[dict[str, Any]] | None = status.get("conditions")
        self.composed_status: dict[str, Any] | None = None
        self.written_status: dict[str, Any] | None = None
        self.status_written_at = 0.0

    # ----- the loop ---------------------------------------------------------------------------------

    async def run(self, stopped: kopf.DaemonStopped) -> None:
        self.wakers[self.key] = self.wake
        try:
            while not stopped:
                self.wake.clear()
                try:
                    nap = await self.reconcile()
                except Exception:
                    # One failed pass must not end dispatch; the next pass starts from the indices again.
                    self.logger.exception("WorkerPool pass failed; retrying")
                    nap = 1.0
                await self._nap(nap, stopped)
                # Pod events come in bursts: let them settle into the index, and act on them together.
                await asyncio.sleep(COALESCE_SECONDS)
        finally:
            if self.wakers.get(self.key) is self.wake:
                del self.wakers[self.key]
            deleted = bool(stopped.reason and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED)
            await self.shutdown(deleted=deleted)

    async def _nap(self, seconds: float, stopped: kopf.DaemonStopped) -> None:
        if stopped or self.wake.is_set():
            return
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, min(seconds, MAX_NAP_SECONDS)),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def now(self) -> float:
        return self.loop.time()

    async def reconcile(self) -> float:
        """One pass; returns how long the loop may sleep unless woken."""
        now = self.now()
        previous = self.blocker
        # Pollers read self.spec and self.blocker while this pass awaits: replace both only when known.
        parsed = dispatch.parse_pool_spec(self.body.get("spec") or {})
        if isinstance(parsed, Blocker):
            self.spec, self.blocker = None, parsed
        else:
            blocker = await self._resolve(parsed, now)
            self.spec, self.blocker = parsed, blocker
        if self.blocker is not None:
            if previous is None or previous.reason != self.blocker.reason:
                self.logger.warning("WorkerPool cannot dispatch: %s", self.blocker.message)
            self._stop_polling()
        views = self.views()
        await self._lifecycle(views)
        if self.spec is not None and self.blocker is None:
            await self._sweep_secrets(now)
            self._ensure_poller()
        await self._refresh_stats(now)
        await self._write_status(views, now)
        return self._nap_length(now)

    def _nap_length(self, now: float) -> float:
        deadlines = [MAX_NAP_SECONDS]
        if self.stats_at is not None and self.queue is not None and self.blocker is None:
            deadlines.append(max(0.0, self.stats_at + self._stats_interval() - now))
        if self.next_lifecycle_check is not None:
            deadlines.append(self.next_lifecycle_check)
        if self.blocker is not None:
            # Environment and spec changes wake the loop; a Secret (not watched) is re-read on this beat.
            deadlines.append(max(self.key_retry_at - now, BLOCKED_RETRY_SECONDS))
        for until in (self.poll_paused_until, self.dispatch_paused_until):
            if until > now:
                deadlines.append(until - now)
        if self.pending_stops:
            deadlines.append(max(0.0, self.stop_retry_at - now))
        if self._status_dirty:
            deadlines.append(max(0.0, self.status_written_at + STATUS_MIN_INTERVAL_SECONDS - now))
        return min(deadlines)

    # ----- what the pool serves ---------------------------------------------------------------------

    async def _resolve(self, spec: WorkerPoolSpec, now: float) -> Blocker | None:
        """The environment from the index (no API call) and its key from the Secret (read when needed)."""
        resolved = dispatch.resolve_environment(spec, self.namespace, self.environments)
        if isinstance(resolved, Blocker):
            return resolved
        self.environment_id = resolved
        key_is_current = (
            self.queue is not None and self._queue_credentials is not None
            and self._queue_credentials[0] == resolved
            and self._key_read_at is not None and now - self._key_read_at < KEY_REFRESH_SECONDS
        )
        if key_is_current:
            return None
        if self.key_problem is not None and now < self.key_retry_at:
            return self.key_problem
        key = await _read_environment_key(self.kube, self.namespace, spec)
        if isinstance(key, Blocker):
            self.key_failures += 1
            self.key_retry_at = now + dispatch.backoff_seconds(self.key_failures, base=1.0, cap=30.0)
            self.key_problem = key
            return self.key_problem
        self.key_failures, self.key_problem = 0, None
        self._key_read_at = now
        if self._queue_credentials != (resolved, key):
            await self._replace_queue(resolved, key)
        return None

    async def _replace_queue(self, environment_id: str, key: str) -> None:
        await self._stop_pollers()
        if self.queue is not None:
            await self.queue.close()
        self.queue = WorkQueue(environment_id=environment_id, environment_key=key, base_url=self.settings.base_url,
                               worker_id=f"environments-operator/{self.namespace}/{self.name}")
        self._queue_credentials = (environment_id, key)
        self.poll_problem, self.poll_failures, self.poll_paused_until = None, 0, 0.0

    # ----- pods -------------------------------------------------------------------------------------

    def views(self) -> list[WorkerPodView]:
        return list(self.pods.get(self.key, []))

    def _namespace_views(self) -> Iterable[WorkerPodView]:
        for (namespace, _pool), store in self.pods.items():
            if namespace == self.namespace:
                yield from store

    def occupied(self) -> int:
        now, views = self.now(), self.views()
        visible = {view.work_id for view in views}
        for work_id, created_at in list(self.created.items()):
            if work_id in visible or now - created_at > CREATED_POD_VISIBLE_WITHIN_SECONDS:
                del self.created[work_id]
        return dispatch.occupied_slots(dispatch.unfinished_work_ids(views), self.dispatching | set(self.created))

    async def _lifecycle(self, views: list[WorkerPodView]) -> None:
        spec = self.spec
        startup_timeout = spec.startupTimeoutSeconds if spec else WorkerPoolSpec.model_fields[
            "startupTimeoutSeconds"].default
        ttl = spec.ttlSecondsAfterFinished if spec else WorkerPoolSpec.model_fields["ttlSecondsAfterFinished"].default
        plan = dispatch.plan_lifecycle(views, self.memory, now=_utcnow(), startup_timeout_seconds=startup_timeout,
                                       ttl_seconds_after_finished=ttl)
        self.next_lifecycle_check = plan.next_check_in
        actions: list[Coroutine[Any, Any, None]] = []
        for view in plan.timed_out:
            self._report(view, "WorkerStartTimeout", dispatch.start_timeout_message(view, startup_timeout))
            actions.append(self._delete_worker(view.work_id, view.name))
        for view in plan.failed:
            self._report(view, "WorkerFailed", dispatch.failed_message(view))
        for view in plan.vanished:
            self._report(view, "WorkerVanished", dispatch.vanished_message(view))
            actions.append(self._delete_quietly("Secret", work_secret_name(view.work_id)))
        for view in plan.expired:
            actions.append(self._delete_worker(view.work_id, view.name))
        if self.pending_stops and self.now() >= self.stop_retry_at:
            actions.append(self._stop_pending())
        if actions:
            await asyncio.gather(*actions)

    def _report(self, view: WorkerPodView, reason: str, message: str) -> None:
        """An abnormal end: the item must be stopped (no session left hanging), and people must know."""
        self.pending_stops[view.work_id] = reason
        self.logger.warning("%s", message)
        self._event("Warning", reason, message)
        metrics.WORKER_EVENTS.labels(namespace=self.namespace, pool=self.name, reason=reason).inc()

    async def _stop_pending(self) -> None:
        queue = self.queue
        if queue is None:
            self.stop_retry_at = self.now() + 5.0
            return

        async def stop(work_id: str) -> bool:
            try:
                await queue.stop(work_id, force=True)
            except WorkApiError as exc:
                self.logger.warning("force-stopping work item %s failed, will retry: %s", work_id, exc)
                return False
            return True

        work_ids = list(self.pending_stops)
        results = await asyncio.gather(*(stop(work_id) for work_id in work_ids))
        for work_id, done in zip(work_ids, results, strict=True):
            if done:
                self.pending_stops.pop(work_id, None)
        self.stop_retry_at = self.now() + (5.0 if self.pending_stops else 0.0)

    async def _delete_worker(self, work_id: str, pod_name: str) -> None:
        self.memory.deleted[pod_name] = _utcnow()
        await self._delete_quietly("Pod", pod_name)
        await self._delete_quietly("Secret", work_secret_name(work_id))

    async def _delete_quietly(self, kind: str, name: str) -> None:
        try:
            await self.kube.delete_if_present(kind, self.namespace, name)
        except KubeApiError as exc:
            self.logger.warning("deleting %s %s/%s failed: %s", kind, self.namespace, name, exc)

    async def _sweep_secrets(self, now: float) -> None:
        if now < self.next_sweep_at:
            return
        self.next_sweep_at = now + SECRET_SWEEP_INTERVAL_SECONDS
        try:
            secrets = await self.kube.list("Secret", self.namespace, pool_selector(self.name))
        except KubeApiError as exc:
            self.logger.warning("listing the pool's Secrets failed: %s", exc)
            return
        pod_names = {view.name for view in self._namespace_views()}
        orphans = dispatch.orphaned_secrets(secrets, pod_names, self.dispatching | set(self.created), now=_utcnow(),
                                            grace_seconds=ORPHAN_SECRET_GRACE_SECONDS)
        if orphans:
            self.logger.info("deleting %d per-item Secrets whose pods are gone", len(orphans))
            await asyncio.gather(*(self._delete_quietly("Secret", name) for name in orphans))

    # ----- pollers ----------------------------------------------------------------------------------

    def _may_poll(self) -> bool:
        now = self.now()
        return (
            not self.stopping and self.spec is not None and self.blocker is None and self.queue is not None
            and now >= self.poll_paused_until and now >= self.dispatch_paused_until
            and dispatch.can_start_poll(max_workers=self.spec.maxWorkers, occupied=self.occupied(),
                                        polling=len(self.polling))
        )

    def _ensure_poller(self) -> None:
        if not self.pollers and self._may_poll():
            self._start_poller()

    def _start_poller(self) -> None:
        task = asyncio.create_task(self._poller(), name=f"workerpool-poller-{self.namespace}/{self.name}")
        self.pollers.add(task)

    def _stop_polling(self) -> None:
        """Cancel the polls in flight; dispatches already past their claim finish on their own."""
        for task in list(self.polling):
            task.cancel()

    async def _stop_pollers(self) -> None:
        self._stop_polling()
        if self.pollers:
            _, pending = await asyncio.wait(set(self.pollers), timeout=DISPATCH_DRAIN_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self.pollers.clear()

    async def _poller(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while self._may_poll():
                queue, spec = self.queue, self.spec
                assert queue is not None and spec is not None
                self.polling.add(task)
                try:
                    item = await queue.poll(block_ms=spec.poll.blockMs,
                                            reclaim_older_than_ms=spec.poll.reclaimOlderThanMs)
                except WorkApiError as exc:
                    self._on_poll_error(exc)
                    return
                finally:
                    self.polling.discard(task)
                claimed_at = self.now()
                self._on_poll_success()
                if item is None:
                    if dispatch.poller_should_retire(pollers=len(self.pollers), poll_was_empty=True):
                        self.pollers.discard(task)  # at once, so that a sibling's check sees one fewer
                        return
                    continue
                self.dispatching.add(item.work_id)
                try:
                    if self.stopping:
                        return  # not acknowledged: offered again after the reclaim window
                    if dispatch.should_add_poller(max_workers=spec.maxWorkers, occupied=self.occupied(),
                                                  polling=len(self.polling), pollers=len(self.pollers)):
                        self._start_poller()
                    await self._dispatch(queue, spec, item, claimed_at)
                finally:
                    self.dispatching.discard(item.work_id)
        except Exception:
            # A bug must not silently shrink the pollers: say so, pause, and let the loop start afresh.
            # The item in hand, if any, was not acknowledged and is offered again after the reclaim window.
            self.logger.exception("a work-queue poller failed")
            self.poll_paused_until = max(self.poll_paused_until, self.now() + 1.0)
        finally:
            self.pollers.discard(task)
            self.wake.set()

    def _on_poll_success(self) -> None:
        if self.poll_failures or self.poll_problem:
            self.poll_failures, self.poll_problem = 0, None
            self.wake.set()

    def _on_poll_error(self, exc: WorkApiError) -> None:
        self.poll_failures += 1
        plan = dispatch.after_failed_poll(
            failures=self.poll_failures, status=exc.status, retryable=exc.retryable,
            credential_rejected=exc.credential_rejected, retry_after=exc.retry_after, api_message=exc.message,
            error=str(exc))
        self.poll_paused_until = max(self.poll_paused_until, self.now() + plan.pause_seconds)
        if plan.reread_key:
            self._key_read_at = None
        if plan.blocker is not None:
            self.poll_problem = plan.blocker
        if self.poll_failures == 1 or self.poll_problem is not None:
            self.logger.warning("polling the work queue failed (attempt %d, next in %.1fs): %s",
                                self.poll_failures, plan.pause_seconds, exc)
        self.wake.set()

    # ----- dispatch ---------------------------------------------------------------------------------

    async def _dispatch(self, queue: WorkQueue, spec: WorkerPoolSpec, item: ClaimedWork, claimed_at: float) -> None:
        """Secret, Pod, ack: exactly once per item, even across crashes (see the module docstring)."""
        if item.work_type != "session":
            # The SDK's worker acknowledges and stops such items (e.g. health checks) without running
            # anything; a pod for one would do exactly that, only slower.
            with contextlib.suppress(WorkApiError):
                await queue.ack(item.work_id)
                await queue.stop(item.work_id, force=True)
            return
        if not item.secret or not item.session_id:
            message = (f"work item {item.work_id} carries no per-item secret, and worker pods never get the "
                       "environment key; the item was force-stopped")
            self.logger.warning("%s", message)
            self._event("Warning", "WorkItemUnservable", message)
            with contextlib.suppress(WorkApiError):
                await queue.stop(item.work_id, force=True)
            return
        work = WorkAssignment(work_id=item.work_id, environment_id=item.environment_id,
                              session_id=item.session_id, secret=item.secret)
        pod_name = worker_pod_name(item.work_id)
        kind, secret_created = "Secret", False
        try:
            secret_created = await self.kube.create_if_absent("Secret", self.namespace,
                                                              build_work_secret(self.identity, work))
            kind = "Pod"
            pod_created = await self.kube.create_if_absent("Pod", self.namespace, build_worker_pod(
                self.identity, work, template=spec.template, default_image=self.settings.worker_image,
                base_url=self.settings.worker_base_url, max_idle_seconds=spec.maxIdleSeconds))
        except KubeApiError as exc:
            if kind == "Pod" and secret_created:
                await self._delete_quietly("Secret", work_secret_name(item.work_id))
            self._on_dispatch_failure(dispatch.dispatch_failure(kind, exc.status, exc.reason, exc.message,
                                                                item.work_id))
            return
        if pod_created:
            self.memory.forget_pod(pod_name)
        elif dispatch.earlier_pod_ended(self._namespace_views(), pod_name):
            # Clear the way and leave the item unacknowledged: after the reclaim window it is offered
            # again and gets a fresh pod.
            self.logger.info("work item %s came back after its pod %s ended; it gets a fresh pod",
                             item.work_id, pod_name)
            await self._delete_worker(item.work_id, pod_name)
            return
        metrics.DISPATCH_LATENCY.labels(stage="pod_created").observe(self.now() - claimed_at)
        try:
            await queue.ack(item.work_id)
        except WorkApiError as exc:
            action = dispatch.after_failed_ack(status=exc.status, retryable=exc.retryable, pod_created=pod_created)
            if action == "offer_again":
                self.logger.warning("acknowledging work item %s failed; it will be offered again: %s",
                                    item.work_id, exc)
            elif action == "keep_pod":
                self.logger.info("work item %s was not acknowledged now (%s); its pod is kept", item.work_id, exc)
            else:
                self.logger.info("work item %s was not acknowledged (%s); its new pod is removed", item.work_id, exc)
                await self._delete_worker(item.work_id, pod_name)
            return
        metrics.DISPATCH_LATENCY.labels(stage="acked").observe(self.now() - claimed_at)
        metrics.ITEMS_DISPATCHED.labels(namespace=self.namespace, pool=self.name).inc()
        if pod_created:
            self.created[item.work_id] = self.now()
        self.last_dispatch_time = rfc3339(_utcnow())
        if self.dispatch_failures:
            self.dispatch_failures, self.dispatch_failure = 0, None
            self.wake.set()

    def _on_dispatch_failure(self, failure: DispatchFailure) -> None:
        self.dispatch_failures += 1
        pause = dispatch.backoff_seconds(self.dispatch_failures, base=1.0, cap=60.0)
        self.dispatch_paused_until = max(self.dispatch_paused_until, self.now() + pause)
        new = self.dispatch_failure is None or self.dispatch_failure.reason != failure.reason
        self.dispatch_failure = failure
        self.logger.warning("%s (pausing dispatch for %.0fs)", failure.message, pause)
        if new or self.dispatch_failures % 10 == 1:
            self._event("Warning", "DispatchFailed", failure.message)
        metrics.WORKER_EVENTS.labels(namespace=self.namespace, pool=self.name, reason="DispatchFailed").inc()
        self.wake.set()

    # ----- reporting --------------------------------------------------------------------------------

    def _event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message)

    def _stats_interval(self) -> float:
        at_capacity = self.spec is not None and self.occupied() >= self.spec.maxWorkers
        return STATS_INTERVAL_AT_CAPACITY_SECONDS if at_capacity else STATS_INTERVAL_SECONDS

    async def _refresh_stats(self, now: float) -> None:
        if self.queue is None or self.blocker is not None or self.spec is None:
            return
        if self.stats_at is not None and now - self.stats_at < self._stats_interval():
            return
        self.stats_at = now
        try:
            self.queue_status = await self.queue.stats()
        except WorkApiError as exc:
            self.logger.debug("reading queue stats failed: %s", exc)
            return
        metrics.QUEUE_DEPTH.labels(namespace=self.namespace, pool=self.name).set(self.queue_status.depth or 0)

    @property
    def _status_dirty(self) -> bool:
        return self.composed_status is not None and self.composed_status != self.written_status

    def _compose_status(self, views: list[WorkerPodView]) -> dict[str, Any]:
        spec = self.spec
        max_workers = spec.maxWorkers if spec else WorkerPoolSpec.model_fields["maxWorkers"].default
        counts = dispatch.worker_counts(views)
        active = len(dispatch.unfinished_work_ids(views))
        for phase, count in counts.model_dump().items():
            metrics.WORKER_PODS.labels(namespace=self.namespace, pool=self.name, phase=phase).set(count)
        depth = self.queue_status.depth if self.queue_status else None
        generation = (self.body.get("metadata") or {}).get("generation")
        self.conditions = dispatch.pool_conditions(
            self.conditions, blocker=self.blocker or self.poll_problem, environment_id=self.environment_id,
            max_workers=max_workers, active=active, depth=depth, dispatch_failure=self.dispatch_failure,
            generation=generation, now=_utcnow())
        status = WorkerPoolStatus(
            environmentId=self.environment_id,
            observedGeneration=generation,
            queue=self.queue_status,
            workers=counts,
            desiredWorkers=dispatch.desired_workers(max_workers=max_workers, active=active, depth=depth),
            lastDispatchTime=dispatch.parse_time(self.last_dispatch_time),
        )
        composed = status.model_dump(mode="json", exclude_none=True)
        composed["conditions"] = self.conditions
        return composed

    async def _write_status(self, views: list[WorkerPodView], now: float) -> None:
        self.composed_status = self._compose_status(views)
        if not self._status_dirty or now - self.status_written_at < STATUS_MIN_INTERVAL_SECONDS:
            return
        status = self.composed_status
        try:
            await self.kube.patch_custom_status(GROUP, VERSION, WORKER_POOLS, self.namespace, self.name, status)
        except KubeApiError as exc:
            if exc.status != 404:  # a deleted pool needs no status
                self.logger.warning("writing WorkerPool status failed: %s", exc)
            return
        self.written_status = status
        self.status_written_at = now

    # ----- shutdown ---------------------------------------------------------------------------------

    async def shutdown(self, *, deleted: bool) -> None:
        """Stop dispatching: no poll in flight, every claimed item dispatched or left for reclaim.

        When the pool was deleted, the work queue client stays open for ``clean_up_workerpool``.
        """
        self.stopping = True
        with contextlib.suppress(Exception):
            await self._stop_pollers()
        if not deleted and self.queue is not None:
            with contextlib.suppress(Exception):
                await self.queue.close()


@kopf.on.delete(GROUP, VERSION, WORKER_POOLS, id="workerpool-cleanup")
async def clean_up_workerpool(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                              patch: kopf.Patch, memo: Any, logger: Logger, **kwargs: Any) -> None:
    """End the deleted pool's workers: force-stop their items, delete pods and Secrets.

    The items stopped are those of unfinished pods, and those of failed or vanished pods whose
    force-stop the dispatcher had not got through yet.

    Pods and per-item Secrets carry an owner reference to the pool, so a real cluster's garbage
    collector would delete them as well; deleting them here makes the cleanup independent of it, and
    stops the items while the environment key is still at hand. The dispatch daemon has been told to
    stop; waiting for it first means no pod can be created behind the cleanup's back.
    """
    namespace = namespace or ""
    task: asyncio.Task[None] | None = memo.get(DISPATCH_TASK)
    if task is not None and not task.done():
        await asyncio.wait({task})
    dispatcher: PoolDispatcher | None = memo.get(DISPATCHER)
    queue = dispatcher.queue if dispatcher is not None else None
    if queue is None:
        queue = await _cleanup_queue(spec, namespace, memo, logger, kwargs["workerpool_environments"])
    kube: KubeClient = memo["kube"]
    try:
        selector = pool_selector(name)
        pods = await kube.list("Pod", namespace, selector)
        views = [view for view in (dispatch.worker_pod_view(pod) for pod in pods) if view is not None]
        to_stop = {view.work_id for view in views if not view.finished}
        to_stop |= set(dispatcher.pending_stops) if dispatcher is not None else set()
        if queue is not None:
            work_queue = queue

            async def stop(work_id: str) -> None:
                try:
                    await work_queue.stop(work_id, force=True)
                except WorkApiError as exc:
                    logger.warning("force-stopping work item %s failed (its lease will expire): %s", work_id, exc)

            await asyncio.gather(*(stop(work_id) for work_id in sorted(to_stop)))
        summary = (f"{len(views)} worker pods removed; "
                   f"{len(to_stop) if queue is not None else 0} work items force-stopped")
        logger.info("WorkerPool deleted: %s", summary)
        await asyncio.gather(*(kube.delete_if_present("Pod", namespace, view.name) for view in views))
        secrets = await kube.list("Secret", namespace, selector)
        await asyncio.gather(*(kube.delete_if_present("Secret", namespace, str(secret["metadata"]["name"]))
                               for secret in secrets))
    finally:
        if queue is not None:
            await queue.close()
    metrics.forget_pool(namespace, name)
    # Say what happened; this write is also the event on which kopf sees the daemon gone and releases
    # the finalizer at once (it would otherwise wait out the daemon's cancellation backoff).
    patch.status["conditions"] = set_condition(
        list(status.get("conditions") or []), type=dispatch.CONDITION_READY, status="False", reason="Deleting",
        message=f"the WorkerPool is being deleted: {summary}", observed_generation=None, now=_utcnow())


async def _cleanup_queue(spec: kopf.Spec, namespace: str, memo: Any, logger: Logger,
                         environments: kopf.Index[PoolKey, dispatch.EnvironmentEntry]) -> WorkQueue | None:
    """A work queue client for a pool whose dispatcher is not running (e.g. deleted while the operator was down).

    It resolves the environment and its key as the dispatch loop does (same index, same Secret read).
    """
    settings: OperatorSettings = memo["settings"]
    parsed = dispatch.parse_pool_spec(spec)
    if isinstance(parsed, Blocker):
        problem = parsed
    else:
        resolved = dispatch.resolve_environment(parsed, namespace, environments)
        if isinstance(resolved, Blocker):
            problem = resolved
        else:
            key = await _read_environment_key(memo["kube"], namespace, parsed)
            if not isinstance(key, Blocker):
                return WorkQueue(environment_id=resolved, environment_key=key, base_url=settings.base_url,
                                 worker_id=f"environments-operator/{namespace}/cleanup")
            problem = key
    logger.warning("the work items of the deleted pool's unfinished pods cannot be force-stopped (%s); "
                   "their leases will expire instead", problem.message)
    return None


async def _read_environment_key(kube: KubeClient, namespace: str, spec: WorkerPoolSpec) -> str | Blocker:
    """The environment key from ``environmentKeySecretRef``, or why it cannot be read (never the key itself)."""
    ref = spec.environmentKeySecretRef
    try:
        return await kube.read_secret_key(namespace, ref.name, ref.key)
    except (SecretKeyError, KubeApiError) as exc:
        detail = str(exc) if isinstance(exc, SecretKeyError) else (
            f"reading Secret {namespace}/{ref.name} failed: {exc.status} {exc.reason}")
        return Blocker("EnvironmentKeyUnavailable", f"environmentKeySecretRef: {detail}")
