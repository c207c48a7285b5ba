"""Dispatch of one claimed work item: Secret, then Pod, then ack (DESIGN.md § "Dispatch must be exactly-once").

Names are deterministic, so AlreadyExists means "already dispatched" and only the ack follows. A refused
creation is not acknowledged (the item is offered again after the reclaim window), is reported
(``DispatchFailing``, an Event) and pauses polling with a backoff.

It owns that backoff (failures in a row, the failure, paused-until) and the time of the last dispatch.
It may not claim items (the pollers do) nor decide a pod's later life (the lifecycle part does; this
part asks it to delete a worker it must not keep).
"""

from __future__ import annotations

import contextlib

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError
from environments_operator.adapters.work_api import ClaimedWork, WorkApiError, WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.conditions import rfc3339
from environments_operator.domain.dispatch import DispatchFailure
from environments_operator.domain.pool_loop import (
    DISPATCH_BACKOFF_BASE_SECONDS,
    DISPATCH_BACKOFF_CAP_SECONDS,
    should_post_failure_event,
)
from environments_operator.domain.vocabulary import Backoff, backoff_seconds
from environments_operator.domain.worker_manifests import (
    WorkAssignment,
    build_work_secret,
    build_worker_pod,
    work_secret_name,
    worker_pod_name,
)
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext, utcnow
from environments_operator.handlers.workerpool.lifecycle import WorkerLifecycle


class ItemDispatcher:
    """Turns one claimed item into its Secret and Pod, acknowledges it, and backs off when Kubernetes refuses."""

    def __init__(self, ctx: PoolContext, lifecycle: WorkerLifecycle, *, last_dispatch_time: str | None) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle
        self.backoff = Backoff()  # of refused creations; its problem is what DispatchFailing reports
        self.last_dispatch_time = last_dispatch_time

    async def dispatch(self, queue: WorkQueue, spec: WorkerPoolSpec, item: ClaimedWork, claimed_at: float) -> None:
        """Secret, Pod, ack: exactly once per item, even across crashes (see the module docstring)."""
        ctx = self.ctx
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
            ctx.logger.warning("%s", message)
            ctx.event("Warning", "WorkItemUnservable", message)
            with contextlib.suppress(WorkApiError):
                await queue.stop(item.work_id, force=True)
            return
        work = WorkAssignment(work_id=item.work_id, environment_id=item.environment_id,
                              session_id=item.session_id, secret=item.secret)
        pod_name = worker_pod_name(item.work_id)
        kind, secret_created = "Secret", False
        try:
            secret_created = await ctx.kube.create_if_absent("Secret", ctx.namespace,
                                                             build_work_secret(ctx.identity, work))
            kind = "Pod"
            pod_created = await ctx.kube.create_if_absent("Pod", ctx.namespace, build_worker_pod(
                ctx.identity, work, template=spec.template, default_image=ctx.settings.worker_image,
                base_url=ctx.settings.worker_base_url, max_idle_seconds=spec.maxIdleSeconds))
        except KubeApiError as exc:
            if kind == "Pod" and secret_created:
                await ctx.delete_quietly("Secret", work_secret_name(item.work_id))
            self._on_dispatch_failure(dispatch.dispatch_failure(kind, exc.status, exc.reason, exc.message,
                                                                item.work_id))
            return
        if pod_created:
            self.lifecycle.memory.forget_pod(pod_name)
        elif dispatch.earlier_pod_ended(ctx.namespace_views(), pod_name):
            # Clear the way and leave the item unacknowledged: after the reclaim window it is offered
            # again and gets a fresh pod.
            ctx.logger.info("work item %s came back after its pod %s ended; it gets a fresh pod",
                            item.work_id, pod_name)
            await self.lifecycle.delete_worker(item.work_id, pod_name)
            return
        metrics.DISPATCH_LATENCY.labels(stage="pod_created").observe(ctx.now() - claimed_at)
        try:
            await queue.ack(item.work_id)
        except WorkApiError as exc:
            action = dispatch.after_failed_ack(status=exc.status, retryable=exc.retryable, pod_created=pod_created)
            if action == "offer_again":
                ctx.logger.warning("acknowledging work item %s failed; it will be offered again: %s",
                                   item.work_id, exc)
            elif action == "keep_pod":
                ctx.logger.info("work item %s was not acknowledged now (%s); its pod is kept", item.work_id, exc)
            else:
                ctx.logger.info("work item %s was not acknowledged (%s); its new pod is removed", item.work_id, exc)
                await self.lifecycle.delete_worker(item.work_id, pod_name)
            return
        metrics.DISPATCH_LATENCY.labels(stage="acked").observe(ctx.now() - claimed_at)
        ctx.logger.info("work item %s of session %s dispatched to pod %s/%s (pool %s)",
                        item.work_id, item.session_id, ctx.namespace, pod_name, ctx.name)
        metrics.ITEMS_DISPATCHED.labels(namespace=ctx.namespace, pool=ctx.name).inc()
        if pod_created:
            ctx.created_unseen[item.work_id] = ctx.now()
        self.last_dispatch_time = rfc3339(utcnow())
        if self.backoff.attempts:
            self.backoff = self.backoff.succeeded()
            ctx.wake.set()

    def _on_dispatch_failure(self, failure: DispatchFailure) -> None:
        ctx = self.ctx
        failures = self.backoff.attempts + 1
        pause = backoff_seconds(failures, base=DISPATCH_BACKOFF_BASE_SECONDS, cap=DISPATCH_BACKOFF_CAP_SECONDS)
        previous = self.backoff.problem
        new = previous is None or previous.reason != failure.reason
        self.backoff = self.backoff.failed(pause_until=ctx.now() + pause, problem=failure)
        ctx.logger.warning("%s (pausing dispatch for %.0fs)", failure.message, pause)
        if should_post_failure_event(failures=failures, reason_is_new=new):
            ctx.event("Warning", "DispatchFailed", failure.message)
        metrics.WORKER_EVENTS.labels(namespace=ctx.namespace, pool=ctx.name, reason="DispatchFailed").inc()
        ctx.wake.set()
