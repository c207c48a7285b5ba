"""The dispatch loop of one WorkerPool, and its status.

Each pass re-reads the live spec, resolves the environment and its key (queue access), acts on pod
lifecycle, keeps pollers running while there is capacity, reads queue stats, and writes status. It
sleeps until a deadline or until a pod, Environment or WorkerPool event wakes it.

It owns the pass itself, the queue stats, and the status it composed and last wrote. It composes the
other parts (``PoolContext`` they share, ``QueueAccess``, ``WorkerLifecycle``, ``ItemDispatcher``,
``PollerGroup``) and may not do their work itself: it neither polls, nor creates pods, nor stops items.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError, KubeClient
from environments_operator.adapters.work_api import WorkApiError, WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.common import GROUP, VERSION
from environments_operator.domain.dispatch import Blocker, WorkerPodView
from environments_operator.domain.pool_loop import (
    FAILED_PASS_RETRY_SECONDS,
    MAX_NAP_SECONDS,
    STATUS_MIN_INTERVAL_SECONDS,
    NapInputs,
    nap_length,
    stats_interval,
)
from environments_operator.domain.vocabulary import parse_time
from environments_operator.domain.warm_workers import WarmPodView
from environments_operator.domain.workerpool import PLURAL as WORKER_POOLS
from environments_operator.domain.workerpool import QueueStatus, WorkerPoolSpec, WorkerPoolStatus
from environments_operator.handlers.workerpool.context import Logger, PoolContext, PoolKey, pool_wakers, utcnow
from environments_operator.handlers.workerpool.item_dispatch import ItemDispatcher
from environments_operator.handlers.workerpool.lifecycle import OwedStop, WorkerLifecycle
from environments_operator.handlers.workerpool.pollers import PollerGroup
from environments_operator.handlers.workerpool.queue_access import QueueAccess
from environments_operator.handlers.workerpool.warm import WarmWorkers
from environments_operator.settings import OperatorSettings

# How long the loop lets wake-ups accumulate before a pass (a burst's pod events, one pass).
COALESCE_SECONDS = 0.02


class PoolDispatcher:
    """The dispatch loop of one WorkerPool: composes its parts, runs the passes, and writes status."""

    def __init__(self, *, body: kopf.Body, memo: Any, logger: Logger,
                 environments: kopf.Index[PoolKey, dispatch.EnvironmentEntry],
                 pods: kopf.Index[PoolKey, WorkerPodView],
                 warm_pods: kopf.Index[PoolKey, WarmPodView] | None = None) -> None:
        kube: KubeClient = memo["kube"]
        settings: OperatorSettings = memo["settings"]
        self.ctx = ctx = PoolContext(body=body, logger=logger, kube=kube, settings=settings, pods=pods,
                                     warm_pods=warm_pods)
        self.wakers = pool_wakers(memo)
        self.access = QueueAccess(ctx, environments=environments, before_replacing=self._before_replacing_queue)
        self.lifecycle = WorkerLifecycle(ctx, queue_for=self.access.queue_for)
        self.warm = WarmWorkers(ctx)
        status = body.get("status") or {}
        self.items = ItemDispatcher(ctx, self.lifecycle, self.warm, last_dispatch_time=status.get("lastDispatchTime"),
                                    placement_queue=self.access.api_key_queue)
        self.pollers = PollerGroup(ctx, self.access, self.items)

        self.queue_status: QueueStatus | None = None
        self.stats_at: float | None = None
        self.conditions: list[dict[str, Any]] | None = status.get("conditions")
        self.composed_status: dict[str, Any] | None = None
        self.written_status: dict[str, Any] | None = None
        self.status_keys: set[str] = set(status)  # the fields the stored status has
        self.status_written_at = 0.0

    @property
    def queue(self) -> WorkQueue | None:
        return self.access.queue

    @property
    def pending_stops(self) -> dict[str, OwedStop]:
        return self.lifecycle.pending_stops

    async def _before_replacing_queue(self) -> None:
        await self.pollers.stop()
        self.pollers.reset_backoff()

    # ----- the loop ---------------------------------------------------------------------------------

    async def run(self, stopped: kopf.DaemonStopped) -> None:
        ctx = self.ctx
        self.wakers[ctx.key] = ctx.wake
        try:
            while not stopped:
                ctx.wake.clear()
                try:
                    nap = await self.reconcile()
                except Exception:
                    # One failed pass must not end dispatch; the next pass starts from the indices again.
                    ctx.logger.exception("WorkerPool pass failed; retrying")
                    nap = FAILED_PASS_RETRY_SECONDS
                await self._nap(nap, stopped)
                # Pod events come in bursts: let them settle into the index, and act on them together.
                await asyncio.sleep(COALESCE_SECONDS)
        finally:
            if self.wakers.get(ctx.key) is ctx.wake:
                del self.wakers[ctx.key]
            deleted = bool(stopped.reason and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED)
            await self.shutdown(deleted=deleted)

    async def _nap(self, seconds: float, stopped: kopf.DaemonStopped) -> None:
        wake = self.ctx.wake
        if stopped or wake.is_set():
            return
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, min(seconds, MAX_NAP_SECONDS)),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def reconcile(self) -> float:
        """One pass; returns how long the loop may sleep unless woken."""
        ctx = self.ctx
        now = ctx.now()
        previous = ctx.blocker
        # Pollers read ctx.spec and ctx.blocker while this pass awaits: replace both only when known.
        parsed = dispatch.parse_pool_spec(ctx.body.get("spec") or {})
        if isinstance(parsed, Blocker):
            ctx.spec, ctx.blocker = None, parsed
        else:
            # Resolved even while suspended: the running pods' items may still need stopping.
            blocker = await self.access.resolve(parsed, now)
            if blocker is None and parsed.suspend:
                blocker = dispatch.suspended_blocker()
            ctx.spec, ctx.blocker = parsed, blocker
        if ctx.blocker is not None:
            if previous is None or previous.reason != ctx.blocker.reason:
                level = logging.INFO if ctx.blocker.reason == dispatch.SUSPENDED else logging.WARNING
                ctx.logger.log(level, "WorkerPool cannot dispatch: %s", ctx.blocker.message)
            self.pollers.cancel_polls()
        await self.lifecycle.relist_pods(now)
        views = ctx.views()
        await self.lifecycle.act(views)
        await self.warm.act(views, polls_in_flight=len(self.pollers.polls_in_flight))
        if ctx.spec is not None and ctx.blocker is None:
            await self.lifecycle.sweep_secrets(now)
            await self.warm.sweep_access(now, views)
            self.pollers.ensure_poller()
        await self.access.close_unused(
            in_use=self.pollers.queues_in_use(),
            environments_needed={v.environment_id for v in views if v.environment_id} | {
                stop.environment_id for stop in self.lifecycle.pending_stops.values() if stop.environment_id})
        await self._refresh_stats(now)
        await self._write_status(views, now)
        return self._nap_length(now)

    def _nap_length(self, now: float) -> float:
        blocked = self.ctx.blocker is not None
        stats_due = self.stats_at is not None and self.access.queue is not None and not blocked
        return nap_length(NapInputs(
            now=now,
            stats_due_at=self.stats_at + self._stats_interval() if stats_due and self.stats_at is not None else None,
            lifecycle_check_in=_earliest(self.lifecycle.next_lifecycle_check, self.warm.next_check_in),
            key_retry_at=self.access.key_backoff.paused_until if blocked else None,
            poll_paused_until=self.pollers.backoff.paused_until,
            dispatch_paused_until=self.items.backoff.paused_until,
            stop_retry_at=self.lifecycle.stop_backoff.paused_until if self.lifecycle.pending_stops else None,
            relist_at=self.lifecycle.next_relist_at,
            status_write_due_at=self.status_written_at + STATUS_MIN_INTERVAL_SECONDS if self._status_dirty else None,
        ))

    # ----- reporting --------------------------------------------------------------------------------

    def _stats_interval(self) -> float:
        spec = self.ctx.spec
        if spec is None:
            return stats_interval(max_workers=None, occupied=0)
        return stats_interval(max_workers=spec.maxWorkers, occupied=self.ctx.occupied())

    async def _refresh_stats(self, now: float) -> None:
        ctx, queue = self.ctx, self.access.queue
        suspended = ctx.blocker is not None and ctx.blocker.reason == dispatch.SUSPENDED
        if queue is None or (ctx.blocker is not None and not suspended) or ctx.spec is None:
            return  # a suspended pool still shows its backlog
        if self.stats_at is not None and now - self.stats_at < self._stats_interval():
            return
        self.stats_at = now
        try:
            self.queue_status = await queue.stats()
        except WorkApiError as exc:
            ctx.logger.debug("reading queue stats failed: %s", exc)
            return
        metrics.QUEUE_DEPTH.labels(namespace=ctx.namespace, pool=ctx.name).set(self.queue_status.depth or 0)

    @property
    def _status_dirty(self) -> bool:
        return self.composed_status is not None and self.composed_status != self.written_status

    def _compose_status(self, views: list[WorkerPodView]) -> dict[str, Any]:
        ctx = self.ctx
        spec = ctx.spec
        max_workers = spec.maxWorkers if spec else WorkerPoolSpec.model_fields["maxWorkers"].default
        counts = dispatch.worker_counts(views, ctx.warm_views())
        active = len(dispatch.unfinished_work_ids(views, utcnow()))
        for phase, count in counts.model_dump().items():
            metrics.WORKER_PODS.labels(namespace=ctx.namespace, pool=ctx.name, phase=phase).set(count)
        depth = self.queue_status.depth if self.queue_status else None
        generation = (ctx.body.get("metadata") or {}).get("generation")
        previous = self.conditions
        self.conditions = dispatch.pool_conditions(
            self.conditions, blocker=ctx.blocker or self.pollers.backoff.problem,
            environment_id=self.access.environment_id, max_workers=max_workers, active=active, depth=depth,
            dispatch_failure=self.items.backoff.problem, generation=generation, now=utcnow())
        event = dispatch.ready_event(previous, self.conditions)
        if event is not None:
            ctx.event(*event)
        status = WorkerPoolStatus(
            environmentId=self.access.environment_id,
            observedGeneration=generation,
            queue=self.queue_status,
            workers=counts,
            desiredWorkers=dispatch.desired_workers(max_workers=max_workers, active=active, depth=depth),
            lastDispatchTime=parse_time(self.items.last_dispatch_time),
        )
        metrics.observe_pool_size(ctx.namespace, ctx.name, max_workers, status.desiredWorkers)
        composed = status.model_dump(mode="json", exclude_none=True)
        composed["conditions"] = self.conditions
        return composed

    async def _write_status(self, views: list[WorkerPodView], now: float) -> None:
        ctx = self.ctx
        self.composed_status = self._compose_status(views)
        if not self._status_dirty or now - self.status_written_at < STATUS_MIN_INTERVAL_SECONDS:
            return
        status = self.composed_status
        # A merge patch keeps what it does not name: a field that no longer applies (environmentId under
        # EnvironmentNotFound, queue figures of a queue no longer read) is cleared by naming it null.
        patch = {**dict.fromkeys(self.status_keys - status.keys()), **status}
        try:
            await ctx.kube.patch_custom_status(GROUP, VERSION, WORKER_POOLS, ctx.namespace, ctx.name, patch)
        except KubeApiError as exc:
            if exc.status != 404:  # a deleted pool needs no status
                ctx.logger.warning("writing WorkerPool status failed: %s", exc)
            return
        self.written_status = status
        self.status_keys = set(status)
        self.status_written_at = now

    # ----- shutdown ---------------------------------------------------------------------------------

    async def shutdown(self, *, deleted: bool) -> None:
        """Stop dispatching: no poll in flight, every claimed item dispatched or left for reclaim.

        When the pool was deleted, the work queue client stays open for ``clean_up_workerpool``.
        """
        self.ctx.stopping = True
        with contextlib.suppress(Exception):
            await self.pollers.stop(drain_dispatches=True)
        with contextlib.suppress(Exception):
            await self.warm.stop()
        if not deleted:
            with contextlib.suppress(Exception):
                await self.access.close()


def _earliest(*deadlines: float | None) -> float | None:
    known = [deadline for deadline in deadlines if deadline is not None]
    return min(known) if known else None
