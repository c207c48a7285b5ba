"""Pod lifecycle of one pool: startup timeout, failed and vanished pods, owed force-stops, TTL, the Secret sweep.

It owns what the pool remembers about its pods (``PodMemory``), the force-stops it still owes the work
queue (each through the environment its pod's annotation names, which may no longer be the pool's),
when it must look at the pods again, and when it last swept the per-item Secrets. What to do
with each pod is decided by ``domain.worker_lifecycle.plan_lifecycle``; this part acts on the plan and reports.

It may not poll, dispatch or write status, and it creates nothing: it only deletes pods and Secrets,
releases the gate of pods whose item is acknowledged, and force-stops items.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from environments_operator.adapters.kube import KubeApiError
from environments_operator.adapters.work_api import WorkApiError, WorkQueue
from environments_operator.domain import worker_lifecycle
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.domain.pool_loop import STOP_RETRY_SECONDS
from environments_operator.domain.vocabulary import Backoff, backoff_seconds
from environments_operator.domain.worker_lifecycle import UNRELEASED_CHECK_AFTER_SECONDS, PodMemory
from environments_operator.domain.worker_manifests import (
    ASSIGNMENT_WORK_ID,
    WORK_SECRET_KEY,
    WorkAssignment,
    assigned_patch,
    build_assignment_secret,
    pool_selector,
    release_patch,
    work_secret_name,
)
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext, utcnow

# Removing the gate is one small patch; a few quick tries ride out a blip before a later pass retries.
RELEASE_ATTEMPTS = 3

# Per-item Secrets normally go with their pods; the sweep only catches those a crash left behind.
SECRET_SWEEP_INTERVAL_SECONDS = 300.0
ORPHAN_SECRET_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class OwedStop:
    """A force-stop the pool owes the work queue: why, through which environment, and what waits for it."""

    reason: str
    environment_id: str | None
    # The pod to delete once the stop went through (a timed-out pod is the durable record of its debt).
    then_delete: WorkerPodView | None = None
    # Owed only to the delivery the pod held (a failed or vanished pod): an item offered again since is
    # served by a fresh pod instead (``worker_lifecycle.owed_stop_action``).
    this_delivery_only: bool = False
    pod_uid: str = ""  # the pod whose end put the item in debt


class WorkerLifecycle:
    """Acts on the pool's pods as ``plan_lifecycle`` says, and owes the work queue a force-stop per abnormal end."""

    def __init__(self, ctx: PoolContext, *, queue_for: Callable[[str | None], WorkQueue | None]) -> None:
        self.ctx = ctx
        self.queue_for = queue_for
        self.memory = PodMemory()
        self.pending_stops: dict[str, OwedStop] = {}  # work id -> the stop owed
        # Owed force-stops are retried on a fixed beat (STOP_RETRY_SECONDS); attempts counts the failed rounds.
        self.stop_backoff = Backoff()
        self.stops_in_flight: dict[str, asyncio.Event] = {}  # work id -> set when its stop call is over
        self.next_lifecycle_check: float | None = None
        self.next_sweep_at = 0.0
        self.next_relist_at = 0.0
        self.force_deleted: set[str] = set()  # uids of pods force-deleted (reported once)
        self.unreleased_checked_at: dict[str, float] = {}  # pod uid -> when its item's state was last read

    async def act(self, views: list[WorkerPodView]) -> None:
        ctx = self.ctx
        spec = ctx.spec
        startup_timeout = spec.startupTimeoutSeconds if spec else WorkerPoolSpec.model_fields[
            "startupTimeoutSeconds"].default
        ttl = spec.ttlSecondsAfterFinished if spec else WorkerPoolSpec.model_fields["ttlSecondsAfterFinished"].default
        plan = worker_lifecycle.plan_lifecycle(views, self.memory, now=utcnow(), in_flight=set(ctx.dispatching),
                                               startup_timeout_seconds=startup_timeout, ttl_seconds_after_finished=ttl)
        self.next_lifecycle_check = plan.next_check_in
        actions: list[Coroutine[Any, Any, None]] = []
        for view in plan.timed_out:
            message = worker_lifecycle.start_timeout_message(view, startup_timeout)
            self._report_and_owe_stop(view, worker_lifecycle.WORKER_START_TIMEOUT, message, then_delete=True)
        for view in plan.failed:
            self._report_and_owe_stop(view, worker_lifecycle.WORKER_FAILED, worker_lifecycle.failed_message(view),
                                      this_delivery_only=True)
        for view in plan.vanished:
            self._report_and_owe_stop(view, worker_lifecycle.WORKER_VANISHED, worker_lifecycle.vanished_message(view),
                                      this_delivery_only=True)
            actions.append(ctx.delete_quietly("Secret", work_secret_name(view.work_id)))
            if view.warm:
                actions.append(ctx.delete_warm_objects(view.name))
        for view in plan.expired:
            if view.work_id not in self.pending_stops:  # a failed pod stays until its item is stopped
                actions.append(self.delete_worker(view))
        now = ctx.now()
        for view in plan.unreleased:
            if now - self.unreleased_checked_at.get(view.uid, -UNRELEASED_CHECK_AFTER_SECONDS) \
                    >= UNRELEASED_CHECK_AFTER_SECONDS:
                self.unreleased_checked_at[view.uid] = now
                actions.append(self.settle_unreleased(view))
        live = {view.uid for view in views}
        self.unreleased_checked_at = {uid: at for uid, at in self.unreleased_checked_at.items() if uid in live}
        for view in plan.stuck_terminating:
            if view.uid not in self.force_deleted:
                self.force_deleted.add(view.uid)
                self._report(view, worker_lifecycle.WORKER_FORCE_DELETED,
                             worker_lifecycle.stuck_terminating_message(view))
            actions.append(ctx.delete_quietly("Pod", view.name, uid=view.uid, grace_period_seconds=0))
        self.force_deleted &= {view.uid for view in views}
        if self.pending_stops and ctx.now() >= self.stop_backoff.paused_until:
            actions.append(self._stop_pending())
        if actions:
            await asyncio.gather(*actions)

    async def settle_unreleased(self, view: WorkerPodView, queue: WorkQueue | None = None) -> None:
        """A gated pod whose dispatch is over: release it, wait, or delete it, as its item's state says."""
        spec = self.ctx.spec
        startup_timeout = spec.startupTimeoutSeconds if spec else WorkerPoolSpec.model_fields[
            "startupTimeoutSeconds"].default
        queue = queue or self.queue_for(view.environment_id)
        if queue is None:
            return
        try:
            state = await queue.state(view.work_id)
        except WorkApiError as exc:
            self.ctx.logger.debug("reading the state of work item %s failed: %s", view.work_id, exc)
            return
        age = (utcnow() - view.created_at).total_seconds() if view.created_at else 0.0
        action = worker_lifecycle.unreleased_pod_action(state, age_seconds=age, startup_timeout_seconds=startup_timeout,
                                                        warm=view.warm)
        if action == "release":
            self.ctx.logger.info("work item %s is acknowledged but its pod %s was never released; releasing it",
                                 view.work_id, view.name)
            await self.release(view)
        elif action == "delete":
            if state == "queued":
                self._report(view, worker_lifecycle.WORKER_NEVER_RELEASED,
                             worker_lifecycle.abandoned_message(view, startup_timeout))
            else:
                self.ctx.logger.info("deleting gated pod %s: its work item %s is %s", view.name, view.work_id,
                                     state or "gone")
            await self.delete_worker(view)

    async def release(self, view: WorkerPodView, work: WorkAssignment | None = None) -> bool:
        """Remove our scheduling gate from an acknowledged item's pod (a warm pod: write its assignment):
        from here its worker may start."""
        ctx = self.ctx
        pod_name = view.name
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                if view.warm:
                    return await self._assign(view, work)
                await ctx.kube.merge_patch("Pod", ctx.namespace, pod_name, release_patch(view.scheduling_gates))
                return True
            except KubeApiError as exc:
                if exc.status == 404:
                    return False
                if attempt == RELEASE_ATTEMPTS:
                    # The item is acknowledged and its pod gated: ``settle_unreleased`` releases it later.
                    ctx.logger.warning("releasing pod %s/%s failed; retried later: %s", ctx.namespace, pod_name, exc)
                    return False
                await asyncio.sleep(backoff_seconds(attempt, base=0.2, cap=2.0))
        return False

    async def _assign(self, view: WorkerPodView, work: WorkAssignment | None) -> bool:
        """A bound warm pod's release: its assignment Secret, then the annotation that says it was written.

        The item's secret comes from the dispatch, or (a dispatch that stopped after the ack) from the
        per-item Secret it wrote first. A pod whose assignment exists already is only annotated.
        """
        ctx = self.ctx
        if work is None:
            secret = await ctx.kube.get("Secret", ctx.namespace, work_secret_name(view.work_id))
            payload = _decoded((secret or {}).get("data") or {}, WORK_SECRET_KEY)
            if payload is None or not view.environment_id or not view.session_id:
                ctx.logger.warning("work item %s is bound to warm pod %s, but its Secret or annotations are gone; "
                                   "the pod is deleted and the item force-stopped", view.work_id, view.name)
                self._owe_stop(view, "AssignmentLost")
                await self.delete_worker(view)
                return False
            work = WorkAssignment(work_id=view.work_id, environment_id=view.environment_id,
                                  session_id=view.session_id, secret=payload)
        created = await ctx.kube.create("Secret", ctx.namespace, build_assignment_secret(
            ctx.identity, work, pod_name=view.name, pod_uid=view.uid))
        if created is None:  # written before (a dispatch that stopped after it): it must be this item's
            existing = await ctx.kube.get("Secret", ctx.namespace, view.name)
            assigned_to = _decoded((existing or {}).get("data") or {}, ASSIGNMENT_WORK_ID)
            if assigned_to != work.work_id:
                ctx.logger.error("warm pod %s already holds the assignment of work item %s, not %s; the latter is "
                                 "force-stopped", view.name, assigned_to, work.work_id)
                self._owe_stop(view, "AssignmentTaken")
                return False
        await ctx.kube.merge_patch("Pod", ctx.namespace, view.name, assigned_patch())
        return True

    def _owe_stop(self, view: WorkerPodView, reason: str) -> None:
        """An acknowledged item that no worker will serve: it is stopped (no session left hanging)."""
        self.pending_stops[view.work_id] = OwedStop(reason, view.environment_id or self.ctx.environment_id)

    def _report(self, view: WorkerPodView, reason: str, message: str) -> None:
        self.ctx.worker_warning(reason, message)

    def _report_and_owe_stop(self, view: WorkerPodView, reason: str, message: str, *,
                             then_delete: bool = False, this_delivery_only: bool = False) -> None:
        """An abnormal end: the item must be stopped (no session left hanging), and people must know."""
        self.pending_stops[view.work_id] = OwedStop(reason, view.environment_id or self.ctx.environment_id,
                                                    view if then_delete else None, this_delivery_only, view.uid)
        self._report(view, reason, message)

    async def before_redelivery(self, work_id: str) -> None:
        """The item was claimed again: a stop owed to its earlier delivery no longer is, and one in flight
        is waited for (it may have landed: the ack is then refused, and the item's state decides)."""
        in_flight = self.stops_in_flight.get(work_id)
        if in_flight is not None:
            await in_flight.wait()
        owed = self.pending_stops.get(work_id)
        if owed is not None and owed.this_delivery_only:
            del self.pending_stops[work_id]

    async def _stop_pending(self) -> None:
        async def stop(work_id: str, owed: OwedStop) -> bool:
            queue = self.queue_for(owed.environment_id)
            if queue is None:
                return False
            done = self.stops_in_flight[work_id] = asyncio.Event()
            try:
                return await stop_through(queue, work_id, owed)
            finally:
                done.set()
                if self.stops_in_flight.get(work_id) is done:
                    del self.stops_in_flight[work_id]

        async def stop_through(queue: WorkQueue, work_id: str, owed: OwedStop) -> bool:
            if owed.this_delivery_only:
                if work_id in self.ctx.dispatching:
                    return False  # decided once that dispatch is over (it may be binding the very pod that ended)
                if await self._offered_again(queue, work_id, owed.pod_uid):
                    self.ctx.logger.info("work item %s was offered again after its pod ended; a fresh pod serves "
                                         "it, so it is not stopped", work_id)
                    return True
            try:
                await queue.stop(work_id, force=True)  # 404 and 409 (gone, already stopped) count as done
            except WorkApiError as exc:
                self.ctx.logger.warning("force-stopping work item %s failed, will retry: %s", work_id, exc)
                return False
            if owed.then_delete is not None:
                await self.delete_worker(owed.then_delete)
            return True

        owed = dict(self.pending_stops)
        results = await asyncio.gather(*(stop(work_id, debt) for work_id, debt in owed.items()))
        for work_id, done in zip(owed, results, strict=True):
            if done and self.pending_stops.get(work_id) is owed[work_id]:
                del self.pending_stops[work_id]
        if self.pending_stops:
            self.stop_backoff = self.stop_backoff.failed(pause_until=self.ctx.now() + STOP_RETRY_SECONDS, problem=None)
        else:
            self.stop_backoff = Backoff()

    async def _offered_again(self, queue: WorkQueue, work_id: str, pod_uid: str) -> bool:
        """Whether the item is a new delivery now: another pod serves it, or it is queued again
        (``owed_stop_action``). A state that cannot be read (a client holding only the API key, which
        ``work.list`` refuses; an outage) counts as not: the stop goes out."""
        if any(view.work_id == work_id and view.uid != pod_uid and not view.finished for view in self.ctx.views()):
            return True
        try:
            state = await queue.state(work_id)
        except WorkApiError as exc:
            self.ctx.logger.debug("reading the state of work item %s failed: %s", work_id, exc)
            return False
        return worker_lifecycle.owed_stop_action(state, dispatching=False) == "drop"

    async def delete_worker(self, view: WorkerPodView) -> None:
        """Delete this pod and its Secret, and only those: a newer pod of the same name (the item came back
        and got a fresh pod) and that pod's Secret are left alone."""
        ctx = self.ctx
        self.memory.deleted[worker_lifecycle.pod_key(view)] = utcnow()
        await ctx.delete_quietly("Pod", view.name, uid=view.uid or None)
        name = work_secret_name(view.work_id)
        try:
            secret = await ctx.kube.get("Secret", ctx.namespace, name)
        except KubeApiError as exc:
            ctx.logger.warning("reading Secret %s/%s failed: %s", ctx.namespace, name, exc)
            return
        if secret is not None and worker_lifecycle.secret_belongs_to(secret, view.uid):
            await ctx.delete_quietly("Secret", name, uid=str(secret["metadata"].get("uid") or "") or None)
        if view.warm:
            await ctx.delete_warm_objects(view.name)

    async def relist_pods(self, now: float) -> None:
        """List the pool's pods now and then: an indexed pod the list lacks was deleted unseen.

        kopf removes an index entry only on a DELETED event; a watch that resumes with 410 Gone (or after
        a peering pause) relists without producing any, so without this such a pod would hold its slot,
        and its item and Secret, until a restart.
        """
        ctx = self.ctx
        if now < self.next_relist_at:
            return
        self.next_relist_at = now + ctx.settings.pod_relist_seconds
        indexed = self._indexed(ctx)
        try:
            pods = await ctx.kube.list("Pod", ctx.namespace, pool_selector(ctx.name))
        except KubeApiError as exc:
            ctx.logger.warning("listing the pool's pods failed: %s", exc)
            return
        listed = {(str(pod["metadata"]["name"]), str(pod["metadata"].get("uid") or "")) for pod in pods}
        still_indexed = self._indexed(ctx)
        # Only pods indexed before the list began can be judged by it; one that left the index is no ghost.
        ghosts = (indexed - listed) & still_indexed
        new = ghosts - ctx.ghosts
        if new:
            ctx.logger.warning("%d worker pods are gone though the pod watch never said so (e.g. a watch "
                               "resumed with 410 Gone); treating them as deleted: %s", len(new),
                               ", ".join(sorted(name for name, _uid in new)))
        ctx.ghosts = (ctx.ghosts & still_indexed) | ghosts

    @staticmethod
    def _indexed(ctx: PoolContext) -> set[tuple[str, str]]:
        """(name, uid) of every pod the indices hold for the pool, item pods and unbound warm pods."""
        warm = list(ctx.warm_pods.get(ctx.key, [])) if ctx.warm_pods is not None else []
        return {(view.name, view.uid) for view in ctx.indexed_views()} | {(view.name, view.uid) for view in warm}

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


def _decoded(data: dict[str, str], key: str) -> str | None:
    try:
        return base64.b64decode(data[key], validate=True).decode("utf-8") or None
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
