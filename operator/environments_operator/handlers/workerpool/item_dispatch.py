"""Dispatch of one claimed work item (DESIGN.md § "Dispatch must be exactly-once"): Pod, Secret, ack, release.

1. the Pod, behind the scheduling gate ``SCHEDULING_GATE``: it exists, but no kubelet may start it;
   or, when the pool has a ready warm pod, that pod, bound to the item (``bind_patch``: the per-item
   labels and annotations); it runs, and waits for its assignment;
2. the per-item Secret, owned by that Pod (it goes with the pod, and belongs to exactly one pool; for a
   warm pod it is the durable copy of the item's secret, which the pod cannot read). For a warm pod
   steps 1 and 2 go together: each is durable on its own, and a dispatch that stops between them
   meets the bound pod when the item comes back;
3. the ack;
4. the release: the gate is removed (a warm pod: its assignment Secret is written), and only now can
   the worker start. A worker therefore never runs on an item it does not hold (a slow ack, a lease
   lost while the pod still looks Running).

Names are deterministic, so a second dispatch of the item meets its pod (AlreadyExists) and decides by
``domain.dispatch.existing_pod_action``: a gated pod is served (the steps go on from where they
stopped), a released pod that has not ended is left alone, an ended one is cleared for a fresh pod. A
refused creation is not acknowledged (the item is offered again after the reclaim window), is reported
(``DispatchFailing``, an Event) and pauses polling with a backoff.

It owns that backoff (failures in a row, the failure, paused-until) and the time of the last dispatch.
It may not claim items (the pollers do) nor decide a pod's later life (the lifecycle part does; this
part asks it to delete a worker it must not keep).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError
from environments_operator.adapters.work_api import ClaimedWork, WorkApiError, WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.conditions import rfc3339
from environments_operator.domain.dispatch import DispatchFailure, ExistingPodAction, WorkerPodView
from environments_operator.domain.pool_loop import (
    DISPATCH_BACKOFF_BASE_SECONDS,
    DISPATCH_BACKOFF_CAP_SECONDS,
    should_post_failure_event,
)
from environments_operator.domain.vocabulary import Backoff, backoff_seconds
from environments_operator.domain.warm_workers import WarmPodView
from environments_operator.domain.worker_manifests import (
    ANNOTATION_WORKER_POOL,
    JSON,
    PoolIdentity,
    WorkAssignment,
    bind_patch,
    build_work_secret,
    build_worker_pod,
    placement_metadata,
    work_secret_name,
)
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext, utcnow
from environments_operator.handlers.workerpool.lifecycle import WorkerLifecycle
from environments_operator.handlers.workerpool.session_start import SESSION_STARTS
from environments_operator.handlers.workerpool.warm import WarmWorkers


@dataclass
class _Step:
    """Which object a dispatch is writing: a refusal is named after it (``dispatch_failure``)."""

    kind: str = "Pod"


class ItemDispatcher:
    """Turns one claimed item into its Secret and Pod, acknowledges it, and backs off when Kubernetes refuses."""

    def __init__(self, ctx: PoolContext, lifecycle: WorkerLifecycle, warm: WarmWorkers, *,
                 last_dispatch_time: str | None,
                 placement_queue: Callable[[], WorkQueue | None] = lambda: None) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle
        self.warm = warm
        self.placement_queue = placement_queue  # the API-key client that records where items run
        self.background: set[asyncio.Task[None]] = set()
        self.backoff = Backoff()  # of refused creations; its problem is what DispatchFailing reports
        self.last_dispatch_time = last_dispatch_time

    async def dispatch(self, queue: WorkQueue, spec: WorkerPoolSpec, item: ClaimedWork, claimed_at: float) -> None:
        """Pod (gated), Secret, ack, release: exactly once per item, even across crashes (see the module docstring)."""
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
                       "environment key; the item is being force-stopped")
            ctx.logger.warning("%s", message)
            ctx.event("Warning", dispatch.WORK_ITEM_UNSERVABLE, message)
            with contextlib.suppress(WorkApiError):
                await queue.stop(item.work_id, force=True)
            return
        await self.lifecycle.before_redelivery(item.work_id)
        work = WorkAssignment(work_id=item.work_id, environment_id=item.environment_id,
                              session_id=item.session_id, secret=item.secret)
        try:
            view = await self._pod_and_secret(spec, work)
        finally:
            self.warm.release_reservation(work.work_id)
        if view is None:
            return
        metrics.DISPATCH_LATENCY.labels(stage="pod_created").observe(ctx.now() - claimed_at)
        try:
            await queue.ack(item.work_id)
        except WorkApiError as exc:
            action = dispatch.after_failed_ack(status=exc.status, retryable=exc.retryable)
            if action == "offer_again":
                ctx.logger.warning("acknowledging work item %s failed; it will be offered again: %s",
                                   item.work_id, exc)
            elif action == "ask_state":
                ctx.logger.info("acknowledging work item %s was refused (%s); its state decides", item.work_id, exc)
                await self.lifecycle.settle_unreleased(view, queue)
            else:
                ctx.logger.info("work item %s was not acknowledged (%s); its pod, never released, is removed",
                                item.work_id, exc)
                await self.lifecycle.delete_worker(view)
            return
        metrics.DISPATCH_LATENCY.labels(stage="acked").observe(ctx.now() - claimed_at)
        SESSION_STARTS.claimed(ctx.namespace, ctx.name, item.work_id, claimed_at)  # before: gated pods cannot run
        if not await self.lifecycle.release(view, work):
            return
        metrics.DISPATCH_LATENCY.labels(stage="released").observe(ctx.now() - claimed_at)
        ctx.logger.info("work item %s of session %s dispatched to pod %s/%s (pool %s)",
                        item.work_id, item.session_id, ctx.namespace, view.name, ctx.name)
        metrics.ITEMS_DISPATCHED.labels(namespace=ctx.namespace, pool=ctx.name).inc()
        self._record_placement(item.work_id, view)
        self.last_dispatch_time = rfc3339(utcnow())
        if self.backoff.attempts:
            self.backoff = self.backoff.succeeded()
            ctx.wake.set()

    async def _pod_and_secret(self, spec: WorkerPoolSpec, work: WorkAssignment) -> WorkerPodView | None:
        """Steps 1 and 2: the item's pod (still gated) and its Secret; None if the item is not to be served now."""
        step = _Step()
        try:
            bound = self._bound_warm_pod(work.work_id)
            if bound is not None:  # an earlier dispatch bound a warm pod to it
                if await self._existing_pod_action(bound, work) != "serve":
                    return None
                step.kind = "Secret"
                await self._write_secret(bound.name, bound.uid, bound.pool, work)
                return bound
            warm = self.warm.reserve(work.work_id)
            if warm is not None:
                view = await self._bind(warm, work, step)
                if view is not None:
                    return view
            return await self._fresh_pod_and_secret(spec, work, step)
        except KubeApiError as exc:
            # Nothing is deleted here: the Secret may be in use by another dispatch of the same item (the
            # sweep removes orphans), and a gated pod runs nothing (the lifecycle clears it if it stays).
            self._on_dispatch_failure(dispatch.dispatch_failure(step.kind, exc.status, exc.reason, exc.message,
                                                                work.work_id))
            return None

    async def _bind(self, warm: WarmPodView, work: WorkAssignment, step: _Step) -> WorkerPodView | None:
        """Bind the item to a ready warm pod, and write its Secret; None if the pod went or changed meanwhile
        (the item then gets a fresh pod)."""
        ctx = self.ctx
        patch = bind_patch(ctx.identity, work, resource_version=warm.resource_version)
        bound_now, secret_written = await asyncio.gather(
            ctx.kube.merge_patch("Pod", ctx.namespace, warm.name, patch),
            self._write_secret(warm.name, warm.uid, warm.pool, work), return_exceptions=True)
        if isinstance(bound_now, KubeApiError) and bound_now.status in (404, 409):
            # The warm pod went away (deleted, evicted) or changed (bound by another dispatch) before it
            # could be bound: the Secret written for it goes.
            await ctx.delete_quietly("Secret", work_secret_name(work.work_id))
            if bound_now.status == 404:
                await ctx.delete_warm_objects(warm.name)
            return None
        if isinstance(bound_now, BaseException):
            raise bound_now
        self.warm.bound(work.work_id)
        if isinstance(secret_written, BaseException):
            step.kind = "Secret"
            raise secret_written
        return dispatch.WorkerPodView(
            name=warm.name, namespace=warm.namespace, pool=warm.pool, work_id=work.work_id, phase=warm.phase,
            uid=warm.uid, environment_id=work.environment_id, session_id=work.session_id, warm=True,
            created_at=warm.created_at)

    async def _fresh_pod_and_secret(self, spec: WorkerPoolSpec, work: WorkAssignment, step: _Step
                                    ) -> WorkerPodView | None:
        """The item's own gated pod, created now (or found from an earlier dispatch), and its Secret."""
        step.kind = "Pod"
        pod = await self._gated_pod(spec, work)
        if pod is None:
            return None
        step.kind = "Secret"
        metadata = pod["metadata"]
        pool = (metadata.get("annotations") or {}).get(ANNOTATION_WORKER_POOL) or self.ctx.name
        await self._write_secret(str(metadata["name"]), str(metadata["uid"]), str(pool), work)
        view = dispatch.worker_pod_view(pod)
        assert view is not None  # built with the contract labels
        return view

    def _bound_warm_pod(self, work_id: str) -> WorkerPodView | None:
        return next((view for view in self.ctx.namespace_views() if view.warm and view.work_id == work_id), None)

    async def _existing_pod_action(self, view: WorkerPodView, work: WorkAssignment) -> ExistingPodAction:
        action = dispatch.existing_pod_action(view)
        if action == "clear":
            # Clear the way and leave the item unacknowledged: offered again, it gets a fresh pod.
            self.ctx.logger.info("work item %s came back after its pod %s ended; it gets a fresh pod",
                                 work.work_id, view.name)
            await self.lifecycle.delete_worker(view)
        elif action == "leave":
            self.ctx.logger.debug("work item %s came back while its released pod %s has not ended; left to it",
                                  work.work_id, view.name)
        return action

    async def _gated_pod(self, spec: WorkerPoolSpec, work: WorkAssignment) -> JSON | None:
        """The item's pod, still gated: created now, or found from an earlier dispatch; None if not to serve now."""
        ctx = self.ctx
        manifest = build_worker_pod(ctx.identity, work, template=spec.template, default_image=ctx.settings.worker_image,
                                    base_url=ctx.settings.worker_base_url, max_idle_seconds=spec.maxIdleSeconds)
        created = await ctx.kube.create("Pod", ctx.namespace, manifest)
        if created is not None:
            ctx.created_unseen[work.work_id] = ctx.now()
            return created
        existing = await ctx.kube.get("Pod", ctx.namespace, manifest["metadata"]["name"])
        view = dispatch.worker_pod_view(existing) if existing is not None else None
        if existing is None or view is None:
            return None  # gone again already, or not ours: offered again, and decided then
        if await self._existing_pod_action(view, work) != "serve":
            return None
        return existing

    async def _write_secret(self, pod_name: str, pod_uid: str, pod_pool: str, work: WorkAssignment) -> None:
        """The item's Secret, owned by its pod, holding this delivery's ``secret``.

        An existing Secret with another payload is replaced: the pod is still gated, so nothing has read
        it, and a re-delivered item's secret is the one the API honours now.
        """
        ctx = self.ctx
        # The pod may be another pool's of this namespace (one environment served by two pools): the Secret
        # is labelled with the pod's pool, so that pool's cleanup and sweep are the ones that see it.
        owner_pool = PoolIdentity(namespace=ctx.namespace, name=pod_pool, uid="")
        manifest = build_work_secret(owner_pool, work, pod_uid=pod_uid, pod_name=pod_name)
        if await ctx.kube.create("Secret", ctx.namespace, manifest) is not None:
            return
        name = manifest["metadata"]["name"]
        existing = await ctx.kube.get("Secret", ctx.namespace, name)
        if existing is not None and existing.get("data") == manifest["data"] and \
                existing["metadata"].get("ownerReferences") == manifest["metadata"]["ownerReferences"]:
            return
        if existing is not None:
            await ctx.kube.delete_if_present("Secret", ctx.namespace, name, uid=existing["metadata"]["uid"])
        if await ctx.kube.create("Secret", ctx.namespace, manifest) is None:
            raise KubeApiError(409, "AlreadyExists", f"the Secret {name} was recreated concurrently")

    def _record_placement(self, work_id: str, view: WorkerPodView) -> None:
        """Write where the item runs into its metadata, in the background: off the dispatch's critical path."""
        queue = self.placement_queue()
        if queue is None:
            return
        metadata = placement_metadata(view.namespace or self.ctx.namespace, view.name, view.pool)

        async def record() -> None:
            try:
                await queue.update_metadata(work_id, metadata)
            except WorkApiError as exc:
                self.ctx.logger.info("recording where work item %s runs failed: %s", work_id, exc)

        task = asyncio.create_task(record(), name=f"workerpool-placement-{work_id}")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _on_dispatch_failure(self, failure: DispatchFailure) -> None:
        ctx = self.ctx
        failures = self.backoff.attempts + 1
        pause = backoff_seconds(failures, base=DISPATCH_BACKOFF_BASE_SECONDS, cap=DISPATCH_BACKOFF_CAP_SECONDS)
        previous = self.backoff.problem
        new = previous is None or previous.reason != failure.reason
        self.backoff = self.backoff.failed(pause_until=ctx.now() + pause, problem=failure)
        ctx.logger.warning("%s (pausing dispatch for %.0fs)", failure.message, pause)
        if should_post_failure_event(failures=failures, reason_is_new=new):
            ctx.event("Warning", dispatch.DISPATCH_FAILED, failure.message)
        metrics.WORKER_EVENTS.labels(namespace=ctx.namespace, pool=ctx.name, reason=dispatch.DISPATCH_FAILED).inc()
        ctx.wake.set()
