"""The poller group of one pool: the tasks that claim work items, their polls in flight, and the poll backoff.

One long-poll runs when the pool is idle; each claim starts one more poller while capacity is left (so
a burst is served by pipelined pollers); an empty poll retires all but one. Whether a poll may start,
grow or retire is a ``domain.dispatch`` decision. Each claimed item goes to the item dispatcher in a
task of its own, and its poller polls again at once: a slow or hung Kubernetes call holds up that one
item, never the pool's polling. An item claimed again while its dispatch is still running (the reclaim
window ran out under a slow call) is left to that dispatch.

It owns the poller tasks, the subset of them inside a poll request, the dispatch tasks (each with the
client its item came through), and the backoff of failed polls.
It may not create pods or Secrets, nor read the environment key: a rejected key is reported to the
queue access part, which re-reads it.
"""

from __future__ import annotations

import asyncio
import random

from environments_operator import metrics
from environments_operator.adapters.work_api import ClaimedWork, WorkApiError, WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.pool_loop import POLLER_CRASH_PAUSE_SECONDS, may_poll
from environments_operator.domain.vocabulary import Backoff
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext, utcnow
from environments_operator.handlers.workerpool.item_dispatch import ItemDispatcher
from environments_operator.handlers.workerpool.queue_access import QueueAccess

# At shutdown, dispatches already past their claim get this long to create their pod and ack.
DISPATCH_DRAIN_SECONDS = 10.0


class PollerGroup:
    """Keeps pollers running while the pool has capacity, and pauses them after failed polls."""

    def __init__(self, ctx: PoolContext, access: QueueAccess, items: ItemDispatcher) -> None:
        self.ctx = ctx
        self.access = access
        self.items = items
        self.pollers: set[asyncio.Task[None]] = set()
        self.polls_in_flight: set[asyncio.Task[None]] = set()  # the pollers inside a poll request right now
        self.dispatches: dict[asyncio.Task[None], WorkQueue] = {}  # one per claimed item, until it ends
        self.backoff = Backoff()  # of failed polls; its problem is what Ready reports meanwhile

    def queues_in_use(self) -> set[int]:
        return {id(queue) for queue in self.dispatches.values()}

    def reset_backoff(self) -> None:
        self.backoff = Backoff()

    def _may_poll(self) -> bool:
        ctx = self.ctx
        spec, now = ctx.spec, ctx.now()
        return may_poll(
            stopping=ctx.stopping, max_workers=spec.maxWorkers if spec else None, blocked=ctx.blocker is not None,
            has_queue=self.access.queue is not None, now=now, poll_paused_until=self.backoff.paused_until,
            dispatch_paused_until=self.items.backoff.paused_until, occupied=ctx.occupied(),
            polls_in_flight=len(self.polls_in_flight))

    def ensure_poller(self) -> None:
        if not self.pollers and self._may_poll():
            self._start_poller()

    def _start_poller(self) -> None:
        task = asyncio.create_task(self._poller(), name=f"workerpool-poller-{self.ctx.namespace}/{self.ctx.name}")
        self.pollers.add(task)

    def cancel_polls(self) -> None:
        """Cancel the polls in flight; dispatches already past their claim finish on their own."""
        for task in list(self.polls_in_flight):
            task.cancel()

    async def stop(self, *, drain_dispatches: bool = False) -> None:
        """End the pollers; with ``drain_dispatches`` (shutdown) the dispatches too, after a grace."""
        self.cancel_polls()
        tasks = set(self.pollers) | (set(self.dispatches) if drain_dispatches else set())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=DISPATCH_DRAIN_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self.pollers.clear()

    async def _poller(self) -> None:
        ctx = self.ctx
        task = asyncio.current_task()
        assert task is not None
        try:
            while self._may_poll():
                queue, spec = self.access.queue, ctx.spec
                assert queue is not None and spec is not None
                self.polls_in_flight.add(task)
                try:
                    item = await queue.poll(block_ms=spec.poll.blockMs,
                                            reclaim_older_than_ms=spec.poll.reclaimOlderThanMs)
                except WorkApiError as exc:
                    self._on_poll_error(exc)
                    return
                finally:
                    self.polls_in_flight.discard(task)
                claimed_at = ctx.now()
                self._on_poll_success()
                if item is None:
                    if dispatch.poller_should_retire(pollers=len(self.pollers), poll_was_empty=True):
                        self.pollers.discard(task)  # at once, so that a sibling's check sees one fewer
                        return
                    continue
                if item.work_id in ctx.dispatching:
                    continue  # claimed again while its dispatch is still at work: that dispatch acks it
                if ctx.stopping:
                    return  # not acknowledged: offered again after the reclaim window
                self._observe_queue_wait(item)
                if dispatch.should_add_poller(max_workers=spec.maxWorkers, occupied=ctx.occupied() + 1,
                                              polling=len(self.polls_in_flight), pollers=len(self.pollers)):
                    self._start_poller()
                self._start_dispatch(queue, spec, item, claimed_at)
        except Exception:
            # A bug must not silently shrink the pollers: say so, pause, and let the loop start afresh.
            # The item in hand, if any, was not acknowledged and is offered again after the reclaim window.
            ctx.logger.exception("a work-queue poller failed")
            self.backoff = self.backoff.paused_at_least_until(ctx.now() + POLLER_CRASH_PAUSE_SECONDS)
        finally:
            self.pollers.discard(task)
            ctx.wake.set()

    def _observe_queue_wait(self, item: ClaimedWork) -> None:
        """created_at → this claim (a redelivered item's wait counts from its creation again)."""
        if item.created_at is not None:
            waited = (utcnow() - item.created_at).total_seconds()
            metrics.QUEUE_WAIT.labels(namespace=self.ctx.namespace, pool=self.ctx.name).observe(max(0.0, waited))

    def _start_dispatch(self, queue: WorkQueue, spec: WorkerPoolSpec, item: ClaimedWork, claimed_at: float) -> None:
        ctx = self.ctx
        ctx.dispatching.add(item.work_id)
        task = asyncio.create_task(self._dispatch(queue, spec, item, claimed_at),
                                   name=f"workerpool-dispatch-{ctx.namespace}/{ctx.name}/{item.work_id}")
        self.dispatches[task] = queue

    async def _dispatch(self, queue: WorkQueue, spec: WorkerPoolSpec, item: ClaimedWork, claimed_at: float) -> None:
        ctx = self.ctx
        try:
            await self.items.dispatch(queue, spec, item, claimed_at)
        except Exception:
            # The item was not acknowledged, or its pod not released: it comes back (after the reclaim
            # window, or when the lifecycle finds its gated pod), and is decided afresh.
            ctx.logger.exception("dispatching work item %s failed", item.work_id)
        finally:
            ctx.dispatching.discard(item.work_id)
            task = asyncio.current_task()
            if task is not None:
                self.dispatches.pop(task, None)
            ctx.wake.set()

    def _on_poll_success(self) -> None:
        if self.backoff.failing:
            self.backoff = self.backoff.succeeded()
            self.ctx.wake.set()

    def _on_poll_error(self, exc: WorkApiError) -> None:
        failures = self.backoff.attempts + 1
        plan = dispatch.after_failed_poll(
            failures=failures, status=exc.status, retryable=exc.retryable,
            credential_rejected=exc.credential_rejected, retry_after=exc.retry_after, api_message=exc.message,
            error=str(exc), jitter=random.random())  # noqa: S311 (spreading retries, not a secret)
        self.backoff = self.backoff.failed(pause_until=self.ctx.now() + plan.pause_seconds, problem=plan.blocker)
        if plan.reread_key:
            self.access.reread_key()
        if failures == 1 or self.backoff.problem is not None:
            self.ctx.logger.warning("polling the work queue failed (attempt %d, next in %.1fs): %s",
                                    failures, plan.pause_seconds, exc)
        self.ctx.wake.set()
