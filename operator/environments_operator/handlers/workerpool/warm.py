"""Warm workers of one pool (``spec.minWorkers``): keeps them, replaces them, and hands them to items.

It creates each warm pod with its ServiceAccount, Role and RoleBinding (those first: a real apiserver
refuses a pod whose ServiceAccount does not exist), retires idle ones as ``domain.warm_workers.plan_warm``
says (too many, too old, an older template, failed, never ready), reports the abnormal ends, and
deletes the objects made for a warm pod once the pod is gone. ``reserve`` hands the item dispatcher a
ready warm pod (``choose_warm_pod``) and keeps it from every other item and from retirement until that
dispatch is over; binding itself (labels, Secret, ack, assignment) is the item dispatcher's.

It owns the warm pods' memory, the reservations, and the backoff of failed creations. It may not poll,
acknowledge, or touch an item's pod: a bound warm pod is the lifecycle part's, like any item's pod.
"""

from __future__ import annotations

import asyncio
import secrets
import string

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError
from environments_operator.domain import warm_workers
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.domain.warm_workers import WarmMemory, WarmPodView
from environments_operator.domain.worker_manifests import (
    build_warm_access,
    build_warm_pod,
    template_hash,
    warm_pod_name,
)
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext, utcnow
from environments_operator.handlers.workerpool.lifecycle import WARM_POD_OBJECT_KINDS

# A refused warm pod (a quota, a policy) is tried again after this long; warm pods are an optimisation,
# and items are served by fresh pods meanwhile.
CREATE_RETRY_SECONDS = 10.0
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class WarmWorkers:
    """Keeps ``minWorkers`` warm pods ready within ``maxWorkers``, and lends one to each claimed item."""

    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx
        self.memory = WarmMemory()
        self.reserved: dict[str, str] = {}  # work id -> the warm pod its dispatch binds
        self.create_paused_until = 0.0
        self.next_check_in: float | None = None
        self.creating: set[asyncio.Task[None]] = set()

    # ----- binding ----------------------------------------------------------------------------------

    def reserve(self, work_id: str) -> WarmPodView | None:
        """A ready warm pod for this item, kept from every other item until ``release_reservation``."""
        retiring = {view.name for view in self.ctx.warm_views() if view.uid in self.memory.deleted}
        chosen = warm_workers.choose_warm_pod(self.ctx.warm_views(), set(self.reserved.values()) | retiring)
        if chosen is not None:
            self.reserved[work_id] = chosen.name
        return chosen

    def release_reservation(self, work_id: str) -> None:
        if self.reserved.pop(work_id, None) is not None:
            self.ctx.wake.set()

    # ----- keeping the warm set -------------------------------------------------------------------

    async def act(self, item_views: list[WorkerPodView], *, polls_in_flight: int) -> None:
        ctx = self.ctx
        spec = ctx.spec
        views = ctx.warm_views()
        if spec is None:
            self.next_check_in = None
            return
        suspended = ctx.blocker is not None and ctx.blocker.reason == "Suspended"
        min_workers = 0 if suspended or ctx.stopping else spec.minWorkers
        reserved = set(self.reserved.values())
        plan = warm_workers.plan_warm(
            views, self.memory, now=utcnow(), min_workers=min_workers, max_workers=spec.maxWorkers,
            # An item being bound is counted once: its warm pod is still in the warm view.
            busy=max(0, ctx.item_slots(item_views) - len(self.reserved)) + len(ctx.warm_created_unseen),
            polls_in_flight=polls_in_flight,
            bound_uids={view.uid for view in item_views if view.warm},
            reserved=reserved, startup_timeout_seconds=spec.startupTimeoutSeconds,
            max_age_seconds=spec.warmMaxAgeSeconds, template_hash=template_hash(spec.template))
        self.next_check_in = plan.next_check_in
        actions = []
        for view, reason in plan.retire:
            message = warm_workers.retire_message(view, reason, startup_timeout_seconds=spec.startupTimeoutSeconds)
            if reason in ("failed", "start_timeout"):
                self._report(warm_workers.WARM_WORKER_FAILED if reason == "failed"
                             else warm_workers.WARM_WORKER_START_TIMEOUT, message)
            else:
                ctx.logger.info("%s", message)
            actions.append(self.delete_warm(view.name, view.uid))
        for view in plan.vanished:
            self._report(warm_workers.WARM_WORKER_VANISHED, warm_workers.vanished_message(view))
            actions.append(self.delete_access(view.name))
        for view in plan.stuck_terminating:
            actions.append(ctx.delete_quietly("Pod", view.name, uid=view.uid, grace_period_seconds=0))
        if actions:
            await asyncio.gather(*actions)
        if plan.create and ctx.blocker is None and not ctx.stopping and ctx.now() >= self.create_paused_until:
            for _ in range(plan.create):
                self._start_creation(spec)
        elif plan.create and ctx.now() < self.create_paused_until:
            retry_in = self.create_paused_until - ctx.now()
            self.next_check_in = retry_in if self.next_check_in is None else min(self.next_check_in, retry_in)

    def _start_creation(self, spec: WorkerPoolSpec) -> None:
        name = warm_pod_name(self.ctx.name, "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5)))
        self.ctx.warm_created_unseen[name] = self.ctx.now()
        task = asyncio.create_task(self._create(name, spec), name=f"workerpool-warm-{self.ctx.namespace}/{name}")
        self.creating.add(task)
        task.add_done_callback(self.creating.discard)

    async def _create(self, name: str, spec: WorkerPoolSpec) -> None:
        """ServiceAccount, Role and RoleBinding, then the pod; a refusal undoes what was made and pauses."""
        ctx = self.ctx
        access = build_warm_access(ctx.identity, name)
        pod = build_warm_pod(ctx.identity, name, template=spec.template, default_image=ctx.settings.worker_image,
                             base_url=ctx.settings.worker_base_url, max_idle_seconds=spec.maxIdleSeconds)
        try:
            await asyncio.gather(*(ctx.kube.create(manifest["kind"], ctx.namespace, manifest) for manifest in access))
            await ctx.kube.create("Pod", ctx.namespace, pod)
        except KubeApiError as exc:
            ctx.warm_created_unseen.pop(name, None)
            self.create_paused_until = ctx.now() + CREATE_RETRY_SECONDS
            message = f"creating warm worker pod {name} was refused ({exc}); retried in {CREATE_RETRY_SECONDS:g}s"
            self._report(warm_workers.WARM_WORKER_CREATION_FAILED, message)
            await self.delete_access(name)
        finally:
            ctx.wake.set()

    async def stop(self) -> None:
        if self.creating:
            await asyncio.wait(set(self.creating))

    # ----- deleting -------------------------------------------------------------------------------

    async def delete_warm(self, name: str, uid: str | None) -> None:
        """Delete an idle warm pod and every object made for it."""
        await self.ctx.delete_quietly("Pod", name, uid=uid or None)
        await self.delete_access(name)

    async def delete_access(self, name: str) -> None:
        """The ServiceAccount, Role, RoleBinding and assignment Secret of a warm pod that is gone or going."""
        await asyncio.gather(*(self.ctx.delete_quietly(kind, name) for kind in WARM_POD_OBJECT_KINDS))

    def _report(self, reason: str, message: str) -> None:
        ctx = self.ctx
        ctx.logger.warning("%s", message)
        ctx.event("Warning", reason, message)
        metrics.WORKER_EVENTS.labels(namespace=ctx.namespace, pool=ctx.name, reason=reason).inc()
