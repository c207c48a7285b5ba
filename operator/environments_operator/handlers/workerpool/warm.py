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

from environments_operator.adapters.kube import KubeApiError
from environments_operator.domain import warm_workers
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.domain.warm_workers import WarmMemory, WarmPodView
from environments_operator.domain.worker_manifests import (
    build_warm_access,
    build_warm_pod,
    pool_selector,
    template_hash,
    warm_pod_name,
)
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import CREATED_POD_VISIBLE_WITHIN_SECONDS, PoolContext, utcnow

# A refused warm pod (a quota, a policy) is tried again after this long; warm pods are an optimisation,
# and items are served by fresh pods meanwhile.
CREATE_RETRY_SECONDS = 10.0
# The objects of a warm pod whose creation a crash interrupted are swept this often, once this old.
ACCESS_SWEEP_INTERVAL_SECONDS = 300.0
ORPHAN_ACCESS_GRACE_SECONDS = 60.0
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits


class WarmWorkers:
    """Keeps ``minWorkers`` warm pods ready within ``maxWorkers``, and lends one to each claimed item."""

    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx
        self.memory = WarmMemory()
        self.reserved: dict[str, tuple[str, str]] = {}  # work id -> (name, uid) of the warm pod its dispatch binds
        # Warm pods bound, which the item index does not show yet (the watch event is on its way, and the
        # two indices take it in one after the other): pod name -> (uid, work id, when bound). Never lent
        # again, never retired, never taken for vanished.
        self.bound_unseen: dict[str, tuple[str, str, float]] = {}
        self.create_paused_until = 0.0
        self.next_check_in: float | None = None
        self.creating: set[asyncio.Task[None]] = set()
        self.next_sweep_at = 0.0

    # ----- binding ----------------------------------------------------------------------------------

    def reserve(self, work_id: str) -> WarmPodView | None:
        """A ready warm pod for this item, kept from every other item until ``release_reservation``."""
        views = self.ctx.warm_views()
        retiring = {view.name for view in views if view.uid in self.memory.deleted}
        chosen = warm_workers.choose_warm_pod(views, self._taken(self.ctx.views()) | retiring)
        if chosen is not None:
            self.reserved[work_id] = (chosen.name, chosen.uid)
        return chosen

    def bound(self, work_id: str) -> None:
        """The item's reserved warm pod now carries its labels: it is the item's, whatever comes next."""
        reserved = self.reserved.pop(work_id, None)
        if reserved is not None:
            name, uid = reserved
            now = self.ctx.now()
            self.bound_unseen[name] = (uid, work_id, now)
            self.ctx.created_unseen[work_id] = now  # its slot is the item's until the item index shows the pod

    def release_reservation(self, work_id: str) -> None:
        """The item's dispatch is over; a warm pod reserved and not bound is free again."""
        if self.reserved.pop(work_id, None) is not None:
            self.ctx.wake.set()

    def _taken(self, item_views: list[WorkerPodView]) -> set[str]:
        """Warm pods being bound, or bound and not yet among the item pods: not idle, whatever the warm index says."""
        seen = {view.uid for view in item_views}
        now = self.ctx.now()
        self.bound_unseen = {name: (uid, work_id, at) for name, (uid, work_id, at) in self.bound_unseen.items()
                             if uid not in seen and now - at < CREATED_POD_VISIBLE_WITHIN_SECONDS}
        return {name for name, _uid in self.reserved.values()} | set(self.bound_unseen)

    # ----- keeping the warm set -------------------------------------------------------------------

    async def act(self, item_views: list[WorkerPodView], *, polls_in_flight: int) -> None:
        ctx = self.ctx
        spec = ctx.spec
        all_views = ctx.warm_views()
        if spec is None:
            self.next_check_in = None
            return
        suspended = ctx.blocker is not None and ctx.blocker.reason == "Suspended"
        min_workers = 0 if suspended or ctx.stopping else spec.minWorkers
        # A warm pod being bound, or bound and not yet seen so, is its item's pod: counted once, through its
        # item (being dispatched, or in ``created_unseen`` until the item index shows its pod).
        taken = self._taken(item_views)
        views = [view for view in all_views if view.name not in taken]
        plan = warm_workers.plan_warm(
            views, self.memory, now=utcnow(), min_workers=min_workers, max_workers=spec.maxWorkers,
            busy=ctx.item_slots(item_views), creating=len(ctx.warm_created_unseen), polls_in_flight=polls_in_flight,
            bound_uids={view.uid for view in item_views if view.warm} | {
                uid for uid, _work_id, _at in self.bound_unseen.values()} | {
                uid for _name, uid in self.reserved.values()},
            startup_timeout_seconds=spec.startupTimeoutSeconds,
            max_age_seconds=spec.warmMaxAgeSeconds, template_hash=template_hash(spec.template))
        self.next_check_in = plan.next_check_in
        actions = []
        for view, reason in plan.retire:
            message = warm_workers.retire_message(view, reason, startup_timeout_seconds=spec.startupTimeoutSeconds)
            if reason in ("failed", "start_timeout"):
                self._warn(warm_workers.WARM_WORKER_FAILED if reason == "failed"
                             else warm_workers.WARM_WORKER_START_TIMEOUT, message)
            else:
                ctx.logger.info("%s", message)
            actions.append(self.delete_warm(view.name, view.uid))
        for view in plan.vanished:
            self._warn(warm_workers.WARM_WORKER_VANISHED, warm_workers.vanished_message(view))
            actions.append(ctx.delete_warm_objects(view.name))
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

    async def sweep_access(self, now: float, item_views: list[WorkerPodView]) -> None:
        """Delete the ServiceAccounts (and the Roles, RoleBindings and Secrets named alike) of warm pods that
        do not exist: an operator that died between making them and making the pod left them behind."""
        ctx, spec = self.ctx, self.ctx.spec
        if now < self.next_sweep_at or spec is None:
            return
        self.next_sweep_at = now + ACCESS_SWEEP_INTERVAL_SECONDS
        try:
            accounts = await ctx.kube.list("ServiceAccount", ctx.namespace, pool_selector(ctx.name))
        except KubeApiError as exc:
            ctx.logger.warning("listing the pool's warm ServiceAccounts failed: %s", exc)
            return
        pods = {view.name for view in ctx.warm_views()} | {view.name for view in item_views} | set(
            ctx.warm_created_unseen) | self._taken(item_views)
        orphans = warm_workers.orphaned_warm_access(accounts, pods, now=utcnow(),
                                                    grace_seconds=ORPHAN_ACCESS_GRACE_SECONDS)
        if orphans:
            ctx.logger.info("deleting what was made for %d warm pods that do not exist", len(orphans))
            await asyncio.gather(*(ctx.delete_warm_objects(name) for name in orphans))

    def _start_creation(self, spec: WorkerPoolSpec) -> None:
        name = warm_pod_name(self.ctx.name, "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5)))
        self.ctx.warm_created_unseen[name] = self.ctx.now()
        task = asyncio.create_task(self._create(name, spec), name=f"workerpool-warm-{self.ctx.namespace}/{name}")
        self.creating.add(task)
        task.add_done_callback(self.creating.discard)

    async def _create(self, name: str, spec: WorkerPoolSpec) -> None:
        """ServiceAccount, Role and RoleBinding, then the pod; a refusal undoes what was made and pauses.

        A name already taken (AlreadyExists: five random characters met an earlier pod's) is given up
        without deleting anything: those objects are the other pod's.
        """
        ctx = self.ctx
        access = build_warm_access(ctx.identity, name)
        pod = build_warm_pod(ctx.identity, name, template=spec.template, default_image=ctx.settings.worker_image,
                             base_url=ctx.settings.worker_base_url, max_idle_seconds=spec.maxIdleSeconds)
        try:
            made = await asyncio.gather(*(ctx.kube.create(manifest["kind"], ctx.namespace, manifest)
                                          for manifest in access))
            if any(created is None for created in made) or await ctx.kube.create("Pod", ctx.namespace, pod) is None:
                ctx.warm_created_unseen.pop(name, None)
                ctx.logger.warning("warm worker pod name %s is taken; another is chosen", name)
                return
        except KubeApiError as exc:
            ctx.warm_created_unseen.pop(name, None)
            self.create_paused_until = ctx.now() + CREATE_RETRY_SECONDS
            message = f"creating warm worker pod {name} was refused ({exc}); retried in {CREATE_RETRY_SECONDS:g}s"
            self._warn(warm_workers.WARM_WORKER_CREATION_FAILED, message)
            await ctx.delete_warm_objects(name)
        finally:
            ctx.wake.set()

    async def stop(self) -> None:
        if self.creating:
            await asyncio.wait(set(self.creating))

    # ----- deleting -------------------------------------------------------------------------------

    async def delete_warm(self, name: str, uid: str | None) -> None:
        """Delete an idle warm pod and every object made for it."""
        await self.ctx.delete_quietly("Pod", name, uid=uid or None)
        await self.ctx.delete_warm_objects(name)

    def _warn(self, reason: str, message: str) -> None:
        self.ctx.worker_warning(reason, message)
