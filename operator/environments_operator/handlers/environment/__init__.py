"""kopf wiring of the Environment controller: one ``Environment`` resource, one remote environment.

Handlers, in the order kopf meets them:

- ``environment-claim`` (create/spec update, only while there is no remote ID): records this operator
  instance in ``status.createRequestedBy`` before any create request is sent. A create request is not
  idempotent; the claim, stored before it, tells any later instance (after a crash or a failover) that
  a create may have happened, so that instance first looks for an environment carrying the resource
  UID (stamped into its metadata at create) and adopts it instead of creating a second one.
- ``environment-sync`` (create/spec update): creates, adopts (``spec.externalId``) or updates.
- ``environment-sync-now`` (the ``environments.managedagents.dev/sync-now`` annotation changed): a check now.
- ``environment-drift`` (timer): re-reads the environment once per interval (settings, or the
  ``environments.managedagents.dev/drift-interval-seconds`` annotation), jittered, and corrects drift.
- ``environment-delete`` (finalizer): archives, deletes or orphans by ``spec.deletionPolicy``.
- ``environment-ready-metric`` (every watch event): counts the Environments by their stored Ready
  condition for the ``environments_operator_environments`` metric.

An update the API refuses with 404 or 400 may meet an environment deleted or archived since it was read:
the environment is re-read once and ``sync.refused_update_verdict`` says what the refusal means.

This module holds the kopf decorators; the parts of this package do the work: ``reconciler`` (one
Environment against its remote environment), ``runtime`` (what is kept between calls) and ``deletion``
(the finalizer's archive, delete or orphan). Every decision is a function of ``domain.environment_sync``;
the parts read the resource, call the adapters, write ``status`` through kopf's patch and post Events.
Handlers return nothing: kopf would store a returned value in ``status.<handler id>``, which the CRD
does not declare.

Per object, one lock serializes the API work of the change handlers and the timer, and an overlay of
the status fields written last stands in for the resource's status until kopf's patch comes back
through the watch; without it, a timer check right after a create could act on a status without the ID.
"""

from __future__ import annotations

import secrets
import socket
from typing import Any

import kopf

from environments_operator.adapters.environments_api import EnvironmentsApiPool
from environments_operator.domain import environment_sync as sync
from environments_operator.domain import vocabulary
from environments_operator.domain.common import GROUP, VERSION
from environments_operator.domain.environment import PLURAL

# kopf runs start-up handlers in registration order; the shared start-up (kopf settings, memo.settings,
# memo.kube) must be registered, and so run, before this module's.
from environments_operator.handlers import startup as _shared_startup  # noqa: F401
from environments_operator.handlers.environment.deletion import end_remote_environment
from environments_operator.handlers.environment.reconciler import Logger, Reconciler
from environments_operator.handlers.environment.runtime import EnvironmentsRuntime, object_state, runtime_of, utcnow
from environments_operator.settings import load_settings

RESOURCE = (GROUP, VERSION, PLURAL)
SYNC_NOW_FIELD = ("metadata", "annotations", sync.SYNC_NOW_ANNOTATION)
# kopf sleeps this long after each drift check before calling the timer again; the handler itself
# then waits until the object's next check is due.
TIMER_REARM_SECONDS = 1.0
# The longest the timer sleeps before re-reading the interval annotation and the object's state.
TIMER_MAX_NAP_SECONDS = 30.0

@kopf.on.startup()
async def start_environment_controller(memo: kopf.Memo, **_: Any) -> None:
    operator_settings = memo.get("settings") or load_settings()
    memo["environments"] = EnvironmentsRuntime(
        pool=EnvironmentsApiPool(base_url=operator_settings.base_url, concurrency=operator_settings.api_concurrency),
        instance_id=f"{socket.gethostname()}-{secrets.token_hex(4)}",
        default_api_key=operator_settings.api_key,
        drift_interval_seconds=operator_settings.drift_interval_seconds,
    )


@kopf.on.cleanup()
async def stop_environment_controller(memo: kopf.Memo, **_: Any) -> None:
    runtime: EnvironmentsRuntime | None = memo.get("environments")
    if runtime is not None:
        runtime.ready_tally.clear()
        await runtime.pool.close()


@kopf.on.event(*RESOURCE, id="environment-ready-metric")
async def count_by_ready_condition(type: str | None, uid: str | None, namespace: str | None, status: kopf.Status,
                                   memo: kopf.Memo, **_: Any) -> None:
    runtime: EnvironmentsRuntime | None = memo.get("environments")
    if runtime is None or not uid:
        return
    if type == "DELETED":
        runtime.ready_tally.gone(uid)
    else:
        runtime.ready_tally.saw(uid, namespace or "", dict(status))



def _claim_needed(status: kopf.Status, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> bool:
    runtime: EnvironmentsRuntime | None = memo.get("environments")
    return runtime is not None and sync.needs_create_claim(status, spec, runtime.instance_id)


@kopf.on.create(*RESOURCE, id="environment-claim", when=_claim_needed)
@kopf.on.update(*RESOURCE, id="environment-claim-update", field="spec", when=_claim_needed)
async def claim_create(status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    runtime, state = runtime_of(memo), object_state(memo)
    previous = status.get("createRequestedBy")
    if previous and previous != runtime.instance_id:
        state.foreign_claim_seen = True
    patch.status["createRequestedBy"] = runtime.instance_id
    state.status_overlay["createRequestedBy"] = runtime.instance_id


@kopf.on.create(*RESOURCE, id="environment-sync")
@kopf.on.update(*RESOURCE, id="environment-sync-update", field="spec")
async def sync_environment(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, logger: Logger,
                           **_: Any) -> None:
    await Reconciler(body, patch, memo, logger).run("spec", retry=retry)


@kopf.on.field(*RESOURCE, id="environment-sync-now", field=SYNC_NOW_FIELD)
async def sync_now(new: Any, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, logger: Logger,
                   **_: Any) -> None:
    if new is None:
        return
    reconciler = Reconciler(body, patch, memo, logger)
    if reconciler.status.get("id"):
        await reconciler.run("check", retry=retry)
    reconciler.write_status({"lastHandledSyncNow": str(new)})


@kopf.timer(*RESOURCE, id="environment-drift", interval=TIMER_REARM_SECONDS)
async def drift_check(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger, **kwargs: Any) -> None:
    stopped: kopf.DaemonStopped = kwargs["stopped"]  # passed to timers too, though TimerFn does not declare it
    reconciler = Reconciler(body, patch, memo, logger)
    state, runtime = reconciler.state, reconciler.runtime
    while not stopped:
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        interval, complaint = sync.drift_interval(annotations, runtime.drift_interval_seconds)
        if complaint and complaint not in state.complaints:
            state.complaints.add(complaint)
            logger.warning("%s", complaint)
            reconciler.event("Warning", sync.INVALID_ANNOTATION, complaint)
        nap = min(max(interval, TIMER_REARM_SECONDS), TIMER_MAX_NAP_SECONDS)
        status = reconciler.status
        if sync.drift_check_blocker({**dict(body), "status": status}) is None:
            due_in = state.schedule.seconds_until_due(
                now=utcnow(), last_sync=vocabulary.parse_time(status.get("lastSyncTime")), interval=interval
            )
            if due_in <= 0:
                break
            nap = min(nap, due_in)
        await stopped.wait(nap)
    if not stopped:
        await reconciler.check()


@kopf.on.delete(*RESOURCE, id="environment-delete")
async def delete_environment(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, logger: Logger,
                             **_: Any) -> None:
    await end_remote_environment(Reconciler(body, patch, memo, logger), retry=retry)
