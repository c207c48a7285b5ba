"""The end of a deleted Environment: archive, delete or orphan its remote environment by ``spec.deletionPolicy``.

It owns nothing between calls; the ``environment-delete`` finalizer calls it with a ``Reconciler`` for
the resource. A refusal is reported (``DeletionBlocked``) and raised as a kopf TemporaryError, so the
finalizer is retried with backoff. It may not create or update environments.
"""

from __future__ import annotations

import kopf

from environments_operator.adapters.environments_api import ApiCallError
from environments_operator.adapters.kube import SecretKeyError
from environments_operator.domain import environment_sync as sync
from environments_operator.domain.environment_sync import ConditionChange
from environments_operator.domain.vocabulary import backoff_seconds
from environments_operator.handlers.environment.reconciler import SECRET_BACKOFF_BASE_SECONDS, Reconciler


async def end_remote_environment(reconciler: Reconciler, *, retry: int) -> None:
    """Archive, delete or orphan the remote environment; look for an interrupted create's result first."""
    status = reconciler.status
    action = sync.deletion_action(reconciler.raw_spec, status)
    environment_id: str | None = status.get("id")
    if action == "release":
        return
    if action == "orphan":
        reconciler.event("Normal", sync.ORPHANED, f"left environment {environment_id} in place (deletionPolicy Orphan)")
        return
    async with reconciler.state.lock:
        try:
            api = await reconciler.api()
            if environment_id is None:  # a create was claimed, its answer never recorded: look for its result
                found = await reconciler.find_interrupted_create(api)
                if found is None:
                    return
                environment_id = found.id
            if action == "archive":
                await api.archive(environment_id)
            else:
                await api.delete(environment_id)
        except SecretKeyError as exc:
            if environment_id is None:
                # Without a key nothing can be looked for; holding the resource would only hang its deletion.
                reconciler.event("Warning", sync.CREDENTIALS_UNAVAILABLE,
                                 f"released without looking for an environment an interrupted create may have "
                                 f"left: {exc}")
                return
            blocked, delay = str(exc), backoff_seconds(
                retry + 1, base=SECRET_BACKOFF_BASE_SECONDS, cap=sync.BACKOFF_CAP_SECONDS)
        except ApiCallError as exc:
            if exc.failure.status != 404 or environment_id is None:  # already gone is what we wanted
                decision = sync.decide_failure(exc.failure, retry=retry, action=f"{action} environment")
                blocked, delay = exc.failure.describe(), decision.delay or backoff_seconds(
                    retry + 1, base=sync.BACKOFF_BASE_SECONDS, cap=sync.BACKOFF_CAP_SECONDS)
            else:
                blocked, delay = "", 0.0
        else:
            blocked, delay = "", 0.0
        if blocked:
            target = f"environment {environment_id}" if environment_id else "the environment a create may have left"
            message = f"cannot {action} {target}: {blocked}; retrying in {delay:g}s"
            change = ConditionChange(sync.READY, "False", sync.DELETION_BLOCKED, message)
            if sync.is_new_reason(status.get("conditions"), change):
                reconciler.event("Warning", sync.DELETION_BLOCKED, message)
            reconciler.set_conditions([change])
            raise kopf.TemporaryError(message, delay=delay)
    done = "archived" if action == "archive" else "deleted"
    reconciler.event("Normal", sync.ARCHIVED if action == "archive" else sync.DELETED,
                     f"{done} environment {environment_id}")
    reconciler.logger.info("%s environment %s", done, environment_id)
