"""One Environment reconciled against its remote environment: create, adopt, update, re-read, report.

``Reconciler`` is made per handler call. It owns nothing between calls (that is ``runtime.ObjectState``);
it reads the resource, calls the Environments API through ``adapters``, writes ``status`` through kopf's
patch and posts Events. Every decision is a function of ``domain.environment_sync``; it may not decide
anything itself, nor register kopf handlers.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import kopf
from pydantic import ValidationError

from environments_operator import metrics
from environments_operator.adapters.environments_api import (
    ApiCallError,
    EnvironmentsApi,
)
from environments_operator.adapters.kube import KubeApiError, KubeClient, SecretKeyError
from environments_operator.domain import environment_sync as sync
from environments_operator.domain import vocabulary
from environments_operator.domain.api_failure import ApiFailure
from environments_operator.domain.environment import EnvironmentSpec
from environments_operator.domain.environment_sync import (
    ConditionChange,
    RemoteEnvironment,
    Trigger,
)
from environments_operator.handlers.environment.runtime import (
    object_state,
    runtime_of,
    utcnow,
)

# A missing Secret is often created moments later (kubectl apply -f dir/): retry soon, then back off.
SECRET_BACKOFF_BASE_SECONDS = 2.0

Logger = logging.Logger | logging.LoggerAdapter[Any]


class Reconciler:
    """One handler call's view of one Environment: its body, what to write, and how to reach the API."""

    def __init__(self, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Logger) -> None:
        self.body = body
        self.patch = patch
        self.logger = logger
        self.runtime = runtime_of(memo)
        self.state = object_state(memo)
        self.kube: KubeClient = memo["kube"]
        meta = body.get("metadata") or {}
        self.name: str = meta.get("name", "")
        self.namespace: str = meta.get("namespace", "")
        self.uid: str = meta.get("uid", "")
        self.action = "reach the Environments API"

    # The body of a timer is live (kopf updates it in place), so these are read when needed.
    @property
    def generation(self) -> int | None:
        generation: int | None = (self.body.get("metadata") or {}).get("generation")
        return generation

    @property
    def raw_spec(self) -> dict[str, Any]:
        return dict(self.body.get("spec") or {})

    # ----- reading and writing status ---------------------------------------------------------------

    @property
    def status(self) -> dict[str, Any]:
        return {**dict(self.body.get("status") or {}), **self.state.status_overlay}

    def write_status(self, fields: dict[str, Any]) -> None:
        for key, value in fields.items():
            self.patch.status[key] = value
        self.state.status_overlay.update(fields)

    def set_conditions(self, changes: list[ConditionChange]) -> None:
        conditions = sync.apply_conditions(self.status.get("conditions"), changes, generation=self.generation,
                                           now=utcnow())
        self.write_status({"conditions": conditions})

    def event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message)

    # ----- credentials ------------------------------------------------------------------------------

    def key_source(self) -> str:
        ref = self.raw_spec.get("apiKeySecretRef")
        if ref:
            return f"Secret {self.namespace}/{ref.get('name')} key {ref.get('key')!r}"
        return "the operator's ANTHROPIC_API_KEY"

    async def api(self) -> EnvironmentsApi:
        """The API client for this resource's key. Raises ``SecretKeyError`` naming what is missing."""
        ref = self.raw_spec.get("apiKeySecretRef")
        if ref:
            try:
                key = await self.kube.read_secret_key(self.namespace, str(ref.get("name")), str(ref.get("key")))
            except KubeApiError as exc:
                raise SecretKeyError(
                    f"could not read Secret {self.namespace}/{ref.get('name')}: {exc.status} {exc.reason}"
                ) from None
        elif self.runtime.default_api_key:
            key = self.runtime.default_api_key
        else:
            raise SecretKeyError(
                "no API key: the operator has no ANTHROPIC_API_KEY and spec.apiKeySecretRef is not set"
            )
        return self.runtime.pool.for_key(key)

    # ----- the sync itself --------------------------------------------------------------------------

    def parse_spec(self) -> EnvironmentSpec:
        """The spec, or ``kopf.PermanentError`` after reporting why it cannot be used."""
        try:
            spec = EnvironmentSpec.model_validate(self.raw_spec)
            problem = sync.spec_problem(spec)
        except ValidationError as exc:
            spec, problem = None, vocabulary.validation_message(exc)
        if problem is not None or spec is None:
            message = problem or "invalid spec"
            self.report_terminal(sync.INVALID_SPEC, message)
            raise kopf.PermanentError(message)
        return spec

    def report_terminal(self, reason: str, message: str) -> None:
        changes = sync.failed_conditions(reason, message, ready=False)
        if sync.is_new_reason(self.status.get("conditions"), changes[0]):
            self.event("Warning", reason, message)
        self.set_conditions(changes)
        self.write_status({"observedGeneration": self.generation})

    async def reconcile(self, spec: EnvironmentSpec, api: EnvironmentsApi, trigger: Trigger) -> None:
        status = self.status
        remote: RemoteEnvironment | None = None
        previous_id: str | None = status.get("id")
        adopting = recreating = False
        if previous_id:
            self.action = f"read environment {previous_id}"
            try:
                remote = await api.retrieve(previous_id)
            except ApiCallError as exc:
                if exc.failure.status != 404:
                    raise
                recreating = True
        elif spec.externalId:
            self.action = f"read environment {spec.externalId}"
            try:
                remote = await api.retrieve(spec.externalId)
            except ApiCallError as exc:
                if exc.failure.status != 404:
                    raise
                raise external_id_missing(spec.externalId, exc.failure) from None
            adopting = True
        await self.converge(spec, api, trigger, status, remote, previous_id=previous_id, adopting=adopting,
                            recreating=recreating)

    async def converge(self, spec: EnvironmentSpec, api: EnvironmentsApi, trigger: Trigger, status: dict[str, Any],
                       remote: RemoteEnvironment | None, *, previous_id: str | None, adopting: bool,
                       recreating: bool) -> None:
        """Brings the environment just read (``None``: there is none, create one) to the spec, and reports."""
        created = recovered = False
        if remote is None:
            remote, recovered = await self.create(spec, api, status, recreating=recreating)
            created = not recovered

        problem = sync.adoption_problem(spec, remote)
        if problem is not None:
            reason, message = problem
            self.report_terminal(reason, message)
            raise kopf.PermanentError(message)

        owned = [] if adopting else list(status.get("ownedMetadataKeys") or [])
        if remote.archived:
            self.report_archived(remote, owned)
            return

        plan = sync.plan_update(spec, remote, resource_name=self.name, owned_metadata_keys=owned)
        if not plan.in_sync:
            self.action = f"update environment {remote.id}"
            try:
                remote = await api.update(remote.id, plan.params)
            except ApiCallError as exc:
                # Only an environment read (not made) in this call can have changed since it was read.
                if created or recovered or not sync.rereads_after_refused_update(exc.failure):
                    raise
                reread = await self.reread(api, remote.id)
                verdict = sync.refused_update_verdict(exc.failure, reread)
                if verdict == "archived" and isinstance(reread, RemoteEnvironment):
                    self.report_archived(reread, owned)
                    return
                if verdict == "gone" and adopting:
                    raise external_id_missing(remote.id, exc.failure) from None
                if verdict == "gone":  # deleted since it was read: what a read that finds it deleted does
                    await self.converge(spec, api, trigger, status, None, previous_id=previous_id,
                                        adopting=False, recreating=True)
                    return
                if verdict == "undecided" and isinstance(reread, ApiFailure):
                    raise ApiCallError(reread) from None
                raise
        now = utcnow()
        self.write_status(sync.status_for(remote, generation=self.generation, now=now,
                                          owned_metadata_keys=plan.owned_metadata_keys))
        self.state.schedule.checked(now=now, fraction=random.random())  # noqa: S311
        self.report_success(remote, plan, trigger, previous_id=previous_id, adopting=adopting, created=created,
                            recovered=recovered, recreating=recreating)

    async def reread(self, api: EnvironmentsApi, environment_id: str) -> RemoteEnvironment | ApiFailure:
        """The environment as it is now, or why it could not be read (the caller decides what that means)."""
        self.action = f"read environment {environment_id}"
        try:
            return await api.retrieve(environment_id)
        except ApiCallError as exc:
            return exc.failure

    async def create(self, spec: EnvironmentSpec, api: EnvironmentsApi, status: dict[str, Any], *,
                     recreating: bool) -> tuple[RemoteEnvironment, bool]:
        """A new environment, or the one an interrupted earlier attempt created (then ``True``)."""
        if sync.must_look_up_before_create(
            claimed_by=status.get("createRequestedBy"), instance_id=self.runtime.instance_id,
            foreign_claim_seen=self.state.foreign_claim_seen, outcome_unknown=self.state.outcome_unknown,
            recreating=recreating,
        ):
            self.action = "look up environments"
            found = await self.find_interrupted_create(api)
            self.state.foreign_claim_seen = False
            if found is not None and found.id != status.get("id"):
                self.state.outcome_unknown = False
                return found, True
        self.action = "create environment"
        try:
            remote = await api.create(sync.create_params(spec, resource_name=self.name, uid=self.uid))
        except ApiCallError as exc:
            self.state.outcome_unknown = self.state.outcome_unknown or exc.failure.outcome_unknown
            raise
        self.state.outcome_unknown = False
        return remote, False

    async def find_interrupted_create(self, api: EnvironmentsApi) -> RemoteEnvironment | None:
        """The environment stamped with this resource's UID, if an earlier create request made one."""
        window = sync.lookup_window_start(
            vocabulary.parse_time((self.body.get("metadata") or {}).get("creationTimestamp")),
            vocabulary.parse_time(self.status.get("createdAt")),
        )
        return await api.find_by_uid(self.uid, window_start=window)

    def report_archived(self, remote: RemoteEnvironment, owned: list[str]) -> None:
        message = (f"environment {remote.id} was archived at {remote.archived_at}; archived environments are "
                   "read-only, so the operator no longer syncs it")
        changes = [ConditionChange(sync.READY, "False", sync.ARCHIVED, message),
                   ConditionChange(sync.SYNCED, "False", sync.ARCHIVED, message)]
        if sync.is_new_reason(self.status.get("conditions"), changes[0]):
            self.event("Warning", sync.ARCHIVED, message)
            self.logger.warning(message)
        self.write_status(sync.status_for(remote, generation=self.generation, now=utcnow(), owned_metadata_keys=owned))
        self.set_conditions(changes)

    def report_success(self, remote: RemoteEnvironment, plan: sync.UpdatePlan, trigger: Trigger, *,
                       previous_id: str | None, adopting: bool, created: bool, recovered: bool,
                       recreating: bool) -> None:
        report = sync.success_report(remote.id, plan.fields, trigger, previous_id=previous_id, adopting=adopting,
                                     created=created, recovered=recovered, recreating=recreating)
        metrics.ENVIRONMENT_SYNCS.labels(namespace=self.namespace, trigger=trigger, reason=report.reason).inc()
        if report.reason in (sync.DRIFT_CORRECTED, sync.RECREATED):
            kind = "corrected" if report.reason == sync.DRIFT_CORRECTED else "recreated"
            metrics.ENVIRONMENT_DRIFT_REPAIRS.labels(namespace=self.namespace, kind=kind).inc()
        if report.event is not None:
            self.event(*report.event)
        if report.drifted_fields is not None:
            self.write_status({"driftedFields": list(report.drifted_fields)})
        if report.reason != sync.IN_SYNC:
            self.logger.info("%s", report.message)
        self.set_conditions([*sync.synced_conditions(report.reason, report.message), *report.drift])

    # ----- failures ---------------------------------------------------------------------------------

    def report_failure(self, failure: ApiFailure, *, retry: int) -> sync.FailureDecision:
        decision = sync.decide_failure(failure, retry=retry, action=self.action)
        message = decision.message
        if decision.reason == sync.UNAUTHORIZED:
            message = f"{message} (key from {self.key_source()})"
            decision = sync.FailureDecision(decision.terminal, decision.reason, message, decision.delay)
        if decision.terminal:
            self.report_terminal(decision.reason, message)
        else:
            changes = sync.failed_conditions(decision.reason, message, ready=bool(self.status.get("id")))
            if sync.is_new_reason(self.status.get("conditions"), changes[-1]):
                self.event("Warning", decision.reason, message)
            self.set_conditions(changes)
        return decision

    def report_credentials(self, error: SecretKeyError, *, retry: int) -> float:
        # kopf's ``retry`` counts the attempts before this one: this failure is the (retry + 1)-th in a row.
        delay = vocabulary.backoff_seconds(retry + 1, base=SECRET_BACKOFF_BASE_SECONDS, cap=sync.BACKOFF_CAP_SECONDS)
        message = f"{error}; retrying in {delay:g}s"
        changes = sync.failed_conditions(sync.CREDENTIALS_UNAVAILABLE, message, ready=bool(self.status.get("id")))
        if sync.is_new_reason(self.status.get("conditions"), changes[-1]):
            self.event("Warning", sync.CREDENTIALS_UNAVAILABLE, str(error))
        self.set_conditions(changes)
        return delay

    async def run(self, trigger: Trigger, *, retry: int) -> None:
        """Sync in a change handler: failures become conditions, then kopf's retry or a terminal error."""
        spec = self.parse_spec()
        try:
            api = await self.api()
        except SecretKeyError as exc:
            delay = self.report_credentials(exc, retry=retry)
            raise kopf.TemporaryError(str(exc), delay=delay) from None
        async with self.state.lock:
            try:
                await self.reconcile(spec, api, trigger)
            except ApiCallError as exc:
                decision = self.report_failure(exc.failure, retry=retry)
                if decision.terminal:
                    raise kopf.PermanentError(decision.message) from None
                raise kopf.TemporaryError(decision.message, delay=decision.delay) from None

    async def check(self) -> None:
        """One periodic drift check: failures become conditions and an earlier next check, never errors."""
        schedule = self.state.schedule
        async with self.state.lock:
            if sync.drift_check_blocker({**dict(self.body), "status": self.status}) is not None:
                return
            try:
                spec = EnvironmentSpec.model_validate(self.raw_spec)
                api = await self.api()
                await self.reconcile(spec, api, "check")
            except ValidationError:
                schedule.checked(now=utcnow(), fraction=random.random())  # noqa: S311  (the spec handler reports it)
            except kopf.PermanentError:
                schedule.checked(now=utcnow(), fraction=random.random())  # noqa: S311  (already reported)
            except SecretKeyError as exc:
                schedule.failed(now=utcnow(), retry_in=self.report_credentials(exc, retry=schedule.failures))
            except ApiCallError as exc:
                decision = self.report_failure(exc.failure, retry=schedule.failures)
                schedule.failed(now=utcnow(), retry_in=decision.delay or vocabulary.backoff_seconds(
                    schedule.failures + 1, base=sync.BACKOFF_BASE_SECONDS, cap=sync.BACKOFF_CAP_SECONDS))


def external_id_missing(external_id: str, failure: ApiFailure) -> ApiCallError:
    """The failure of adopting an environment that does not exist: terminal, naming ``spec.externalId``."""
    return ApiCallError(ApiFailure(404, f"spec.externalId: environment {external_id} does not exist "
                                        f"({failure.message})"))



