"""The end of a deleted WorkerPool: force-stop its workers' items, delete its pods, Secrets and warm pods' RBAC.

It owns nothing between calls. It reads the dispatcher the daemon left behind (its work queue client
and the force-stops it still owed); when there is none, it resolves the environment and its key as
the loop does (same index, same Secret read). It may not create anything.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from environments_operator import metrics
from environments_operator.adapters.kube import KubeClient
from environments_operator.adapters.work_api import WorkApiError, WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.conditions import set_condition
from environments_operator.domain.dispatch import Blocker
from environments_operator.domain.worker_manifests import pool_selector
from environments_operator.handlers.workerpool.context import Logger, PoolKey, utcnow
from environments_operator.handlers.workerpool.loop import PoolDispatcher
from environments_operator.handlers.workerpool.queue_access import read_environment_key
from environments_operator.handlers.workerpool.session_start import SESSION_STARTS
from environments_operator.settings import OperatorSettings


async def end_deleted_pool(*, name: str, namespace: str, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch,
                           memo: Any, logger: Logger, dispatcher: PoolDispatcher | None,
                           environments: kopf.Index[PoolKey, dispatch.EnvironmentEntry]) -> None:
    """Force-stop the items of unfinished pods and those still owed a force-stop; delete pods and Secrets.

    Each item is stopped through the environment its pod names (which may not be the pool's any more).
    Items of pods that are still gated are not stopped: no worker ever ran them, and one still queued
    is served by another pool, if any.
    """
    fallback = dispatcher.queue if dispatcher is not None else None
    own_fallback = fallback is None
    if fallback is None:
        fallback = await _cleanup_queue(spec, namespace, memo, logger, environments)
    kube: KubeClient = memo["kube"]

    def queue_for(environment_id: str | None) -> WorkQueue | None:
        if dispatcher is not None:
            found = dispatcher.access.queue_for(environment_id)
            if found is not None:
                return found
        if fallback is not None and environment_id in (None, fallback.environment_id):
            return fallback
        return None

    try:
        selector = pool_selector(name)
        pods = await kube.list("Pod", namespace, selector)
        views = [view for view in (dispatch.worker_pod_view(pod) for pod in pods) if view is not None]
        to_stop = {view.work_id: view.environment_id for view in views if not view.finished and not view.gated}
        if dispatcher is not None:
            to_stop |= {work_id: owed.environment_id for work_id, owed in dispatcher.pending_stops.items()}
        stopped = 0

        async def stop(work_id: str, environment_id: str | None) -> None:
            nonlocal stopped
            queue = queue_for(environment_id)
            if queue is None:
                logger.warning("work item %s cannot be force-stopped: no client for environment %s (its lease "
                               "will expire)", work_id, environment_id)
                return
            try:
                await queue.stop(work_id, force=True)
                stopped += 1
            except WorkApiError as exc:
                logger.warning("force-stopping work item %s failed (its lease will expire): %s", work_id, exc)

        await asyncio.gather(*(stop(work_id, env) for work_id, env in sorted(to_stop.items())))
        summary = f"{len(pods)} worker pods removed; {stopped} work items force-stopped"
        logger.info("WorkerPool deleted: %s", summary)
        # Every labelled pod goes, warm ones (bound to no item) included; then the Secrets, and the
        # ServiceAccounts, Roles and RoleBindings made for warm pods.
        await asyncio.gather(*(kube.delete_if_present("Pod", namespace, str(pod["metadata"]["name"])) for pod in pods))
        for kind in ("Secret", "RoleBinding", "Role", "ServiceAccount"):
            objects = await kube.list(kind, namespace, selector)
            await asyncio.gather(*(kube.delete_if_present(kind, namespace, str(obj["metadata"]["name"]))
                                   for obj in objects))
    finally:
        if dispatcher is not None:
            await dispatcher.access.close()
        if own_fallback and fallback is not None:
            await fallback.close()
    metrics.forget_pool(namespace, name)
    SESSION_STARTS.forget_pool(namespace, name)
    # Say what happened; this write is also the event on which kopf sees the daemon gone and releases
    # the finalizer at once (it would otherwise wait out the daemon's cancellation backoff).
    patch.status["conditions"] = set_condition(
        list(status.get("conditions") or []), type=dispatch.CONDITION_READY, status="False", reason=dispatch.DELETING,
        message=f"the WorkerPool is being deleted: {summary}", observed_generation=None, now=utcnow())


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
            key = await read_environment_key(memo["kube"], namespace, parsed)
            if not isinstance(key, Blocker):
                return WorkQueue(environment_id=resolved, environment_key=key, base_url=settings.base_url,
                                 worker_id=f"environments-operator/{namespace}/cleanup")
            problem = key
    logger.warning("the work items of the deleted pool's unfinished pods cannot be force-stopped (%s); "
                   "their leases will expire instead", problem.message)
    return None
