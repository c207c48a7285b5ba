"""What every part of one pool's controller shares: who the pool is, its clients, its wake-up flag, and its slots.

It owns the pool's identity, the kube client and settings, the pod index, the wake-up flag, the live spec
and blocker of the current pass (written by the loop only), and the count of occupied slots: the item
ids being dispatched right now and the pods created but not yet seen by the pod watch.

It may not decide anything (decisions are ``domain`` functions) nor talk to the work queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import kopf

from environments_operator import metrics
from environments_operator.adapters.kube import KubeApiError, KubeClient
from environments_operator.domain import dispatch
from environments_operator.domain.dispatch import Blocker, WorkerPodView
from environments_operator.domain.warm_workers import WarmPodView, warm_slots_taken
from environments_operator.domain.worker_manifests import PoolIdentity
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.settings import OperatorSettings

Logger = logging.Logger | logging.LoggerAdapter[Any]
PoolKey = tuple[str, str]

WAKERS = "workerpool_wakers"

# The objects made for a warm pod, all named after it (the Secret is its assignment).
WARM_POD_OBJECT_KINDS = ("RoleBinding", "Role", "ServiceAccount", "Secret")

# A pod we created is counted as ours until the pod watch shows it, at most this long.
CREATED_POD_VISIBLE_WITHIN_SECONDS = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


def pool_wakers(memo: Any) -> dict[PoolKey, asyncio.Event]:
    """The wake-up flag of each running pool loop, keyed by (namespace, name)."""
    wakers: dict[PoolKey, asyncio.Event] = memo[WAKERS]
    return wakers


class PoolContext:
    """One pool's identity, clients and shared slot count; the parts of its controller all hold the same one."""

    def __init__(self, *, body: kopf.Body, logger: Logger, kube: KubeClient, settings: OperatorSettings,
                 pods: kopf.Index[PoolKey, WorkerPodView],
                 warm_pods: kopf.Index[PoolKey, WarmPodView] | None = None) -> None:
        self.body = body
        self.logger = logger
        self.kube = kube
        self.settings = settings
        self.pods = pods
        self.warm_pods = warm_pods
        metadata = body.get("metadata") or {}
        self.namespace = str(metadata.get("namespace") or "")
        self.name = str(metadata.get("name") or "")
        self.identity = PoolIdentity(namespace=self.namespace, name=self.name, uid=str(metadata.get("uid") or ""))
        self.key: PoolKey = (self.namespace, self.name)
        self.wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        # Pollers read spec and blocker while a pass awaits: the loop replaces both only when known.
        self.spec: WorkerPoolSpec | None = None
        self.blocker: Blocker | None = None
        self.stopping = False
        self.dispatching: set[str] = set()  # work ids between claim and the end of their dispatch
        # work id -> when its pod was created, until the pod watch shows that pod
        self.created_unseen: dict[str, float] = {}
        # Pods the index still holds but a list of the pool's pods no longer has: deleted while the pod
        # watch was broken (kopf relists without producing deletions). (name, uid) pairs.
        self.ghosts: set[tuple[str, str]] = set()
        self.environment_id: str | None = None  # the environment the pool serves now (queue access sets it)
        # Warm pods created but not yet seen by the pod watch: name -> when created.
        self.warm_created_unseen: dict[str, float] = {}

    def now(self) -> float:
        return self.loop.time()

    def indexed_views(self) -> list[WorkerPodView]:
        """The pool's pods as the index holds them, ghosts included."""
        return list(self.pods.get(self.key, []))

    def views(self) -> list[WorkerPodView]:
        """The pool's pods: the index, less the pods a list showed are gone."""
        views = self.indexed_views()
        if not self.ghosts:
            return views
        return [view for view in views if (view.name, view.uid) not in self.ghosts]

    def warm_views(self) -> list[WarmPodView]:
        """The pool's unbound warm pods as the index holds them, less those a list showed are gone and those
        the item index holds already (a bound pod's event reaches the two indices one after the other)."""
        bound = {view.uid for view in self.indexed_views()}
        views = [view for view in (self.warm_pods.get(self.key, []) if self.warm_pods is not None else [])
                 if view.uid not in bound]
        seen = {view.name for view in views}
        now = self.now()
        for name, created_at in list(self.warm_created_unseen.items()):
            if name in seen or now - created_at > CREATED_POD_VISIBLE_WITHIN_SECONDS:
                del self.warm_created_unseen[name]
        return [view for view in views if (view.name, view.uid) not in self.ghosts]

    def namespace_views(self) -> Iterable[WorkerPodView]:
        for (namespace, _pool), store in self.pods.items():
            if namespace == self.namespace:
                yield from (view for view in store if (view.name, view.uid) not in self.ghosts)

    def occupied(self) -> int:
        now, views = self.now(), self.views()
        visible = {view.work_id for view in views}
        for work_id, created_at in list(self.created_unseen.items()):
            if work_id in visible or now - created_at > CREATED_POD_VISIBLE_WITHIN_SECONDS:
                del self.created_unseen[work_id]
        return self.item_slots(views) + warm_slots_taken(self.warm_views(), utcnow()) + len(self.warm_created_unseen)

    def item_slots(self, views: list[WorkerPodView] | None = None) -> int:
        """Slots items take: their unfinished pods, and the items being dispatched whose pods are not in view."""
        views = self.views() if views is None else views
        return dispatch.occupied_slots(dispatch.unfinished_work_ids(views, utcnow()),
                                       self.dispatching | set(self.created_unseen))

    def event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message)

    def worker_warning(self, reason: str, message: str) -> None:
        """A worker pod ended abnormally: a log line, a Warning Event, and the ``worker_lifecycle_total`` count."""
        self.logger.warning("%s", message)
        self.event("Warning", reason, message)
        metrics.WORKER_EVENTS.labels(namespace=self.namespace, pool=self.name, reason=reason).inc()

    async def delete_warm_objects(self, pod_name: str) -> None:
        """What was made for a warm pod (ServiceAccount, Role, RoleBinding, assignment Secret): all named after it."""
        await asyncio.gather(*(self.delete_quietly(kind, pod_name) for kind in WARM_POD_OBJECT_KINDS))

    async def delete_quietly(self, kind: str, name: str, *, uid: str | None = None,
                             grace_period_seconds: int | None = None) -> None:
        try:
            await self.kube.delete_if_present(kind, self.namespace, name, uid=uid,
                                              grace_period_seconds=grace_period_seconds)
        except KubeApiError as exc:
            self.logger.warning("deleting %s %s/%s failed: %s", kind, self.namespace, name, exc)
