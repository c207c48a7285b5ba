"""Pod lifecycle of one pool: startup timeout, failed and vanished pods, owed force-stops, TTL, the Secret sweep.

It owns what the pool remembers about its pods (``PodMemory``), the force-stops it still owes the work
queue, when it must look at the pods again, and when it last swept the per-item Secrets. What to do
with each pod is decided by ``domain.worker_lifecycle.plan_lifecycle``; this part acts on the plan and reports.

It may not poll, dispatch or write status, and it creates nothing: it only deletes pods and Secrets
and force-stops items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError
from environments_operator.adapters.work_api import WorkApiError, WorkQueue
from environments_operator.domain import worker_lifecycle
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.domain.pool_loop import STOP_RETRY_SECONDS
from environments_operator.domain.vocabulary import Backoff
from environments_operator.domain.worker_lifecycle import PodMemory
from environments_operator.domain.worker_manifests import pool_selector, work_secret_name
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext, utcnow

# Per-item Secrets normally go with their pods; the sweep only catches those a crash left behind.
SECRET_SWEEP_INTERVAL_SECONDS = 300.0
ORPHAN_SECRET_GRACE_SECONDS = 60.0


class WorkerLifecycle:
    """Acts on the pool's pods as ``plan_lifecycle`` says, and owes the work queue a force-stop per abnormal end."""

    def __init__(self, ctx: PoolContext, *, queue: Callable[[], WorkQueue | None]) -> None:
        self.ctx = ctx
        self.queue = queue
        self.memory = PodMemory()
        self.pending_stops: dict[str, str] = {}  # work id -> why it must be stopped
        # Owed force-stops are retried on a fixed beat (STOP_RETRY_SECONDS); attempts counts the failed rounds.
        self.stop_backoff = Backoff()
        self.next_lifecycle_check: float | None = None
        self.next_sweep_at = 0.0

    async def act(self, views: list[WorkerPodView]) -> None:
        spec = self.ctx.spec
        startup_timeout = spec.startupTimeoutSeconds if spec else WorkerPoolSpec.model_fields[
            "startupTimeoutSeconds"].default
        ttl = spec.ttlSecondsAfterFinished if spec else WorkerPoolSpec.model_fields["ttlSecondsAfterFinished"].default
        plan = worker_lifecycle.plan_lifecycle(views, self.memory, now=utcnow(),
                                               startup_timeout_seconds=startup_timeout, ttl_seconds_after_finished=ttl)
        self.next_lifecycle_check = plan.next_check_in
        actions: list[Coroutine[Any, Any, None]] = []
        for view in plan.timed_out:
            message = worker_lifecycle.start_timeout_message(view, startup_timeout)
            self._report_and_owe_stop(view, "WorkerStartTimeout", message)
            actions.append(self.delete_worker(view.work_id, view.name))
        for view in plan.failed:
            self._report_and_owe_stop(view, "WorkerFailed", worker_lifecycle.failed_message(view))
        for view in plan.vanished:
            self._report_and_owe_stop(view, "WorkerVanished", worker_lifecycle.vanished_message(view))
            actions.append(self.ctx.delete_quietly("Secret", work_secret_name(view.work_id)))
        for view in plan.expired:
            actions.append(self.delete_worker(view.work_id, view.name))
        if self.pending_stops and self.ctx.now() >= self.stop_backoff.paused_until:
            actions.append(self._stop_pending())
        if actions:
            await asyncio.gather(*actions)

    def _report_and_owe_stop(self, view: WorkerPodView, reason: str, message: str) -> None:
        """An abnormal end: the item must be stopped (no session left hanging), and people must know."""
        ctx = self.ctx
        self.pending_stops[view.work_id] = reason
        ctx.logger.warning("%s", message)
        ctx.event("Warning", reason, message)
        metrics.WORKER_EVENTS.labels(namespace=ctx.namespace, pool=ctx.name, reason=reason).inc()

    async def _stop_pending(self) -> None:
        queue = self.queue()
        if queue is None:
            self.stop_backoff = self.stop_backoff.failed(pause_until=self.ctx.now() + STOP_RETRY_SECONDS, problem=None)
            return

        async def stop(work_id: str) -> bool:
            try:
                await queue.stop(work_id, force=True)
            except WorkApiError as exc:
                self.ctx.logger.warning("force-stopping work item %s failed, will retry: %s", work_id, exc)
                return False
            return True

        work_ids = list(self.pending_stops)
        results = await asyncio.gather(*(stop(work_id) for work_id in work_ids))
        for work_id, done in zip(work_ids, results, strict=True):
            if done:
                self.pending_stops.pop(work_id, None)
        if self.pending_stops:
            self.stop_backoff = self.stop_backoff.failed(pause_until=self.ctx.now() + STOP_RETRY_SECONDS, problem=None)
        else:
            self.stop_backoff = Backoff()

    async def delete_worker(self, work_id: str, pod_name: str) -> None:
        self.memory.deleted[pod_name] = utcnow()
        await self.ctx.delete_quietly("Pod", pod_name)
        await self.ctx.delete_quietly("Secret", work_secret_name(work_id))

    async def sweep_secrets(self, now: float) -> None:
        ctx = self.ctx
        if now < self.next_sweep_at:
            return
        self.next_sweep_at = now + SECRET_SWEEP_INTERVAL_SECONDS
        try:
            secrets = await ctx.kube.list("Secret", ctx.namespace, pool_selector(ctx.name))
        except KubeApiError as exc:
            ctx.logger.warning("listing the pool's Secrets failed: %s", exc)
            return
        pod_names = {view.name for view in ctx.namespace_views()}
        orphans = worker_lifecycle.orphaned_secrets(secrets, pod_names, ctx.dispatching | set(ctx.created_unseen),
                                            now=utcnow(), grace_seconds=ORPHAN_SECRET_GRACE_SECONDS)
        if orphans:
            ctx.logger.info("deleting %d per-item Secrets whose pods are gone", len(orphans))
            await asyncio.gather(*(ctx.delete_quietly("Secret", name) for name in orphans))
