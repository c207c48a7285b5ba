"""kopf wiring of the WorkerPool controller, mode ``PerWorkItem``: one fresh worker pod per work item.

This module holds the decorators and the indices only; each concern lives in a part of this package:

| part | owns |
| --- | --- |
| ``context`` | the pool's identity, clients, wake-up flag, live spec and blocker, and occupied slots |
| ``queue_access`` | the environment, its key (read and refreshed), the ``WorkQueue`` client |
| ``pollers`` | the pollers, their polls in flight, poll backoff, pipelining |
| ``item_dispatch`` | one claimed item: gated Pod (or a warm pod, bound), Secret, ack, release; dispatch backoff |
| ``warm`` | warm pods (``minWorkers``): created, replaced, retired, reserved for a claimed item |
| ``lifecycle`` | startup timeout, failed and vanished pods, owed force-stops, TTL, the Secret sweep |
| ``loop`` | the pass, its sleep, queue stats and status; composes the parts above |
| ``cleanup`` | the end of a deleted pool |
| ``session_start`` | claim times, until the pod index sees the item's pod Running (a metric) |

- Three kopf **indices** keep what the dispatch loop reads on every pass in memory: the Environments of
  each namespace (``environmentRef`` resolves without an API call), the item pods of each pool and its
  unbound warm pods (one pod watch, filtered server-side by the pool label; a warm pod moves from the
  second index to the first when it is bound). kopf fills every index before any
  daemon starts, so after a restart the loop's first capacity decision already counts every pod
  that survived it: the labelled pods *are* the durable state.
- One kopf **daemon** per WorkerPool runs ``PoolDispatcher``. The pod index and ``on.event`` handlers
  set the pool's wake-up flag.
- An **on.delete** handler ends a deleted pool: it waits for the daemon to stop (no pod can appear
  behind its back), then ``cleanup`` force-stops the items of unfinished pods and those still owed a
  force-stop, and deletes the pool's pods and Secrets.

Every decision is a ``domain`` function; the parts perform the I/O and report. Handlers return nothing
to kopf (kopf would store a return value in an undeclared status field) and post Events explicitly.
This module may not hold state of its own beyond the memo keys below.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from environments_operator.domain import dispatch
from environments_operator.domain.common import GROUP, VERSION
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.domain.environment import PLURAL as ENVIRONMENTS
from environments_operator.domain.warm_workers import WarmPodView, warm_pod_view
from environments_operator.domain.worker_manifests import LABEL_MANAGED_BY, LABEL_WORKER_POOL, MANAGED_BY
from environments_operator.domain.workerpool import PLURAL as WORKER_POOLS
from environments_operator.handlers.workerpool.cleanup import end_deleted_pool
from environments_operator.handlers.workerpool.context import WAKERS, Logger, PoolKey
from environments_operator.handlers.workerpool.context import pool_wakers as _wakers
from environments_operator.handlers.workerpool.loop import PoolDispatcher
from environments_operator.handlers.workerpool.session_start import SESSION_STARTS

__all__ = ["PoolDispatcher", "clean_up_workerpool", "serve_workerpool", "workerpool_environments", "workerpool_pods",
           "workerpool_warm_pods"]

DISPATCHER, DISPATCH_TASK = "workerpool_dispatcher", "workerpool_dispatch_task"
# Bookkeeping that runs on every pod, Environment and WorkerPool event (indices, wake-ups); kopf logs each
# success at INFO, one line per event, which ``run`` hides unless --verbose.
BOOKKEEPING_HANDLERS = ("workerpool_environments", "workerpool_pods", "workerpool_warm_pods",
                        "wake_pool_on_pod_deletion", "wake_pools_on_environment_event", "wake_pool_on_spec_event")
WORKER_POD_LABELS: dict[str, Any] = {
    LABEL_MANAGED_BY: MANAGED_BY, LABEL_WORKER_POOL: kopf.PRESENT,
}


@kopf.on.startup()
async def start_workerpool_controller(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Only worker pods reach the operator: the watch is filtered by the apiserver, not in memory.
    settings.watching.label_selectors["v1", "pods"] = LABEL_WORKER_POOL
    memo[WAKERS] = {}


# Async, though they never await: kopf runs plain functions in a thread pool, a hop per event.
@kopf.index(GROUP, VERSION, ENVIRONMENTS)
async def workerpool_environments(
    name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[PoolKey, dispatch.EnvironmentEntry]:
    return {(namespace or "", name): dispatch.environment_entry(name, spec, status)}


@kopf.index("v1", "pods", labels=WORKER_POD_LABELS)
async def workerpool_pods(body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[PoolKey, WorkerPodView]:
    view = dispatch.worker_pod_view(body)
    if view is None:
        return {}
    # A new or changed pod may free capacity or need lifecycle action: wake its pool. Waking from here
    # spares kopf a second handler call per pod event; the loop coalesces wake-ups (the index is
    # updated right after this returns).
    _wake(memo, (view.namespace, view.pool))
    SESSION_STARTS.saw(view)
    return {(view.namespace, view.pool): view}


@kopf.index("v1", "pods", labels=WORKER_POD_LABELS)
async def workerpool_warm_pods(body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[PoolKey, WarmPodView]:
    view = warm_pod_view(body)
    if view is None:
        return {}
    _wake(memo, (view.namespace, view.pool))
    return {(view.namespace, view.pool): view}


def _deleted(type: str | None = None, **_: Any) -> bool:
    return type == "DELETED"


@kopf.on.event("v1", "pods", labels=WORKER_POD_LABELS, when=_deleted)
async def wake_pool_on_pod_deletion(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    view = dispatch.worker_pod_view(body) or warm_pod_view(body)
    if view is not None:
        _wake(memo, (view.namespace, view.pool))


def _wake(memo: Any, key: PoolKey) -> None:
    waker = _wakers(memo).get(key)
    if waker is not None:
        waker.set()


@kopf.on.event(GROUP, VERSION, ENVIRONMENTS)
async def wake_pools_on_environment_event(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    for (pool_namespace, _name), waker in _wakers(memo).items():
        if pool_namespace == namespace:
            waker.set()


@kopf.on.event(GROUP, VERSION, WORKER_POOLS)
async def wake_pool_on_spec_event(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    _wake(memo, (namespace or "", name))


# The daemon exits on its own when stopped, once its in-flight dispatches are done; kopf cancels it only
# if that takes longer than the backoff.
@kopf.daemon(GROUP, VERSION, WORKER_POOLS, id="workerpool-dispatch", cancellation_backoff=60.0,
             cancellation_timeout=10.0)
async def serve_workerpool(
    body: kopf.Body, memo: Any, logger: Logger, stopped: kopf.DaemonStopped, **kwargs: Any
) -> None:
    # The indices arrive as keyword arguments named after their functions.
    dispatcher = PoolDispatcher(body=body, memo=memo, logger=logger, environments=kwargs["workerpool_environments"],
                                pods=kwargs["workerpool_pods"], warm_pods=kwargs["workerpool_warm_pods"])
    # The object's memo is shared with its deletion handler, which waits for this task to end.
    memo[DISPATCHER], memo[DISPATCH_TASK] = dispatcher, asyncio.current_task()
    await dispatcher.run(stopped)


@kopf.on.delete(GROUP, VERSION, WORKER_POOLS, id="workerpool-cleanup")
async def clean_up_workerpool(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                              patch: kopf.Patch, memo: Any, logger: Logger, **kwargs: Any) -> None:
    """End the deleted pool's workers: force-stop their items, delete pods and Secrets.

    The items stopped are those of unfinished pods, and those of failed or vanished pods whose
    force-stop the dispatcher had not got through yet.

    Pods and per-item Secrets carry an owner reference to the pool, so a real cluster's garbage
    collector would delete them as well; deleting them here makes the cleanup independent of it, and
    stops the items while the environment key is still at hand. The dispatch daemon has been told to
    stop; waiting for it first means no pod can be created behind the cleanup's back.
    """
    namespace = namespace or ""
    task: asyncio.Task[None] | None = memo.get(DISPATCH_TASK)
    if task is not None and not task.done():
        await asyncio.wait({task})
    await end_deleted_pool(name=name, namespace=namespace, spec=spec, status=status, patch=patch, memo=memo,
                           logger=logger, dispatcher=memo.get(DISPATCHER),
                           environments=kwargs["workerpool_environments"])
