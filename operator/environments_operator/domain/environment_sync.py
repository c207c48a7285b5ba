"""Decisions of the Environment controller: what to send to the Environments API, and what to report.

The controller keeps one remote environment equal to one ``Environment`` resource. Everything it decides
lives here as pure functions, so that each rule can be read and tested in a table:

- the spec mapped to ``EnvironmentCreateParams`` (camelCase here, snake_case in the API);
- the update plan: the desired state compared with the environment as the API returned it, sending only
  the fields that differ, clearing removed fields explicitly where the API allows it, and touching only
  the metadata keys the operator owns (``status.ownedMetadataKeys``);
- the lookup that finds an environment created by an interrupted attempt (its metadata carries the
  resource UID under ``UID_METADATA_KEY``);
- the drift-check schedule (interval from settings or annotation, jittered);
- how each API failure (``domain.api_failure.ApiFailure``) is handled: terminal for the generation, or
  retried after a delay that honours the server's ``retry-after``; and what an update refused because
  the environment was deleted or archived between the controller's read and its update really means;
- how a successful sync is reported (conditions, their reasons, Events) and what deletion does remotely.

What the API allows to clear, per field (it preserves every field an update omits):

- ``name``: never empty; the spec's default is the resource name.
- ``description``: cleared by sending ``""`` (stored as an empty string; the API treats null and ``""``
  alike for our purpose, and ``""`` is understood by every version we know of).
- ``metadata``: a key is deleted by sending it with ``null``.
- ``config.networking``: replaced as a whole; no networking in the spec means ``unrestricted``, the API's
  default. Limited-network fields left out mean ``[]``/``false``, their create-time defaults.
- ``config.packages``: each manager is replaced by the list sent, so a removed list is sent as ``[]``.
- ``scope``: cannot be unset (null keeps the stored value), so a spec without ``scope`` leaves it alone.

Pure: no I/O, no clocks, no randomness (callers pass ``now`` and jitter fractions in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from environments_operator.domain.api_failure import ApiFailure
from environments_operator.domain.common import GROUP, ConditionStatus
from environments_operator.domain.conditions import ConditionDict, get_condition, rfc3339, set_condition
from environments_operator.domain.environment import EnvironmentConfig, EnvironmentSpec, Networking
from environments_operator.domain.vocabulary import backoff_seconds, parse_time
from environments_operator.domain.vocabulary import validation_message as validation_message  # one formatter

JSON = dict[str, Any]

# The remote metadata key that carries the resource's UID: the one link between a resource and the
# environment it created that survives a crash between the create request and the status write.
UID_METADATA_KEY = f"{GROUP}/resource-uid"
# User-facing annotations. Not under GROUP itself: kopf keeps its progress in GROUP/ annotations and
# leaves every annotation with that prefix out of the state it compares, so it would never see them change.
ANNOTATION_PREFIX = f"environments.{GROUP}"
# Changing this annotation's value (any value; a timestamp is customary) asks for a drift check now.
SYNC_NOW_ANNOTATION = f"{ANNOTATION_PREFIX}/sync-now"
# Per-object override of ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS, in seconds.
DRIFT_INTERVAL_ANNOTATION = f"{ANNOTATION_PREFIX}/drift-interval-seconds"

PACKAGE_MANAGERS = ("apt", "cargo", "gem", "go", "npm", "pip")
# Drift checks spread out by up to this fraction either way, so that 500 resources created together
# are not all re-read in the same second forever after.
DRIFT_JITTER = 0.1
MIN_DRIFT_INTERVAL_SECONDS = 1.0
# The apiserver's clock (creationTimestamp) and the API's clock (created_at) are different machines;
# an environment created for a resource is looked for this far before the resource's creation too.
LOOKUP_CLOCK_SKEW = timedelta(minutes=5)

READY = "Ready"
SYNCED = "Synced"
DRIFT_DETECTED = "DriftDetected"

# Reasons (CamelCase, machine-readable) of the conditions above.
CREATED = "Created"
RECREATED = "Recreated"
ADOPTED = "Adopted"
UPDATED = "Updated"
IN_SYNC = "InSync"
DRIFT_CORRECTED = "DriftCorrected"
NO_DRIFT = "NoDrift"
ARCHIVED = "Archived"
INVALID_SPEC = "InvalidSpec"
REJECTED = "Rejected"
NOT_FOUND = "NotFound"
TYPE_MISMATCH = "TypeMismatch"
CREDENTIALS_UNAVAILABLE = "CredentialsUnavailable"
UNAUTHORIZED = "Unauthorized"
RATE_LIMITED = "RateLimited"
API_UNAVAILABLE = "ApiUnavailable"
DELETION_BLOCKED = "DeletionBlocked"
# Event reasons that are no condition's reason (the others above are both).
INVALID_ANNOTATION = "InvalidAnnotation"
ORPHANED = "Orphaned"
DELETED = "Deleted"

# Every reason the Ready condition may carry (README, "Environment controller"); anything else a
# metric reports as OTHER_REASON, so that a hand-written status cannot add series.
READY_REASONS = frozenset({
    CREATED, RECREATED, ADOPTED, UPDATED, IN_SYNC, DRIFT_CORRECTED, ARCHIVED, INVALID_SPEC, REJECTED, NOT_FOUND,
    TYPE_MISMATCH, CREDENTIALS_UNAVAILABLE, UNAUTHORIZED, RATE_LIMITED, API_UNAVAILABLE, DELETION_BLOCKED,
})
NOT_YET_REPORTED, OTHER_REASON = "Unknown", "Other"

# Reasons that end the sync of a generation: only a new spec (a new generation) is tried again.
TERMINAL_REASONS = frozenset({INVALID_SPEC, REJECTED, NOT_FOUND, TYPE_MISMATCH})

Trigger = Literal["spec", "check"]


# ----- the remote environment ----------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteEnvironment:
    """An environment as the API returned it (snake_case ``config`` exactly as received)."""

    id: str
    name: str
    description: str
    metadata: Mapping[str, str]
    scope: str | None
    config: Mapping[str, Any]
    created_at: str
    updated_at: str
    archived_at: str | None

    @property
    def type(self) -> str:
        return str(self.config.get("type", ""))

    @property
    def archived(self) -> bool:
        return self.archived_at is not None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> RemoteEnvironment:
        """From a ``BetaEnvironment`` in its JSON form."""
        return cls(
            id=str(data["id"]),
            name=str(data.get("name") or ""),
            description=str(data.get("description") or ""),
            metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
            scope=data.get("scope"),
            config=dict(data.get("config") or {}),
            created_at=str(data.get("created_at") or ""),
            updated_at=str(data.get("updated_at") or ""),
            archived_at=data.get("archived_at"),
        )


# ----- spec -> API -----------------------------------------------------------------------------------


def spec_problem(spec: EnvironmentSpec) -> str | None:
    """Why the API must not even see this spec, naming the field; None when it may."""
    if spec.metadata and UID_METADATA_KEY in spec.metadata:
        return f"spec.metadata.{UID_METADATA_KEY}: reserved for the operator (it records the resource UID)"
    return None


def environment_name(spec: EnvironmentSpec, resource_name: str) -> str:
    return spec.name or resource_name


def _networking_params(networking: Networking) -> JSON:
    params: JSON = {"type": networking.type}
    if networking.allowedHosts is not None:
        params["allowed_hosts"] = list(networking.allowedHosts)
    if networking.allowPackageManagers is not None:
        params["allow_package_managers"] = networking.allowPackageManagers
    if networking.allowMcpServers is not None:
        params["allow_mcp_servers"] = networking.allowMcpServers
    return params


def config_params(config: EnvironmentConfig) -> JSON:
    """``config`` of ``EnvironmentCreateParams``: the spec's fields in snake_case, unset ones omitted."""
    params: JSON = {"type": config.type}
    if config.networking is not None:
        params["networking"] = _networking_params(config.networking)
    if config.packages is not None:
        packages: JSON = {
            manager: list(value) for manager in PACKAGE_MANAGERS
            if (value := getattr(config.packages, manager)) is not None
        }
        params["packages"] = {**packages, "type": "packages"}
    return params


def create_params(spec: EnvironmentSpec, *, resource_name: str, uid: str) -> JSON:
    """``EnvironmentCreateParams`` for the spec, with the resource UID stamped into the metadata."""
    params: JSON = {
        "name": environment_name(spec, resource_name),
        "config": config_params(spec.config),
        "metadata": {**(spec.metadata or {}), UID_METADATA_KEY: uid},
    }
    if spec.description is not None:
        params["description"] = spec.description
    if spec.scope is not None:
        params["scope"] = spec.scope
    return params


# ----- comparison and the update plan ----------------------------------------------------------------


def _desired_networking(networking: Networking | None) -> JSON:
    if networking is None or networking.type == "unrestricted":
        return {"type": "unrestricted"}
    return {
        "type": "limited",
        "allowed_hosts": list(networking.allowedHosts or []),
        "allow_package_managers": bool(networking.allowPackageManagers),
        "allow_mcp_servers": bool(networking.allowMcpServers),
    }


def _remote_networking(networking: Mapping[str, Any] | None) -> JSON:
    if not networking or networking.get("type") != "limited":
        return {"type": str((networking or {}).get("type") or "unrestricted")}
    return {
        "type": "limited",
        "allowed_hosts": list(networking.get("allowed_hosts") or []),
        "allow_package_managers": bool(networking.get("allow_package_managers")),
        "allow_mcp_servers": bool(networking.get("allow_mcp_servers")),
    }


def _same_networking(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    # Host order carries no meaning; compare as sets of entries so an API that sorts is not "drift".
    return {**a, "allowed_hosts": sorted(a.get("allowed_hosts", []))} == {
        **b, "allowed_hosts": sorted(b.get("allowed_hosts", []))
    }


def _same_list(a: Sequence[str], b: Sequence[str]) -> bool:
    return sorted(a) == sorted(b)


@dataclass(frozen=True)
class UpdatePlan:
    """What to send so that the remote environment matches the spec."""

    params: JSON  # EnvironmentUpdateParams; empty when already in sync
    fields: tuple[str, ...]  # the differing fields, e.g. ("name", "metadata.team", "config.networking")
    owned_metadata_keys: tuple[str, ...]  # status.ownedMetadataKeys once the update succeeded

    @property
    def in_sync(self) -> bool:
        return not self.params


def _config_plan(config: EnvironmentConfig, remote: Mapping[str, Any]) -> tuple[JSON, list[str]]:
    if config.type != "cloud" or remote.get("type") != "cloud":
        return {}, []  # self_hosted has nothing to compare; a type change is refused before this
    params: JSON = {}
    fields: list[str] = []
    desired_networking = _desired_networking(config.networking)
    if not _same_networking(desired_networking, _remote_networking(remote.get("networking"))):
        params["networking"] = desired_networking
        fields.append("config.networking")
    remote_packages = remote.get("packages") or {}
    packages: JSON = {}
    for manager in PACKAGE_MANAGERS:
        wanted = list(getattr(config.packages, manager) or []) if config.packages is not None else []
        if not _same_list(wanted, list(remote_packages.get(manager) or [])):
            packages[manager] = wanted  # [] clears: the API keeps any list an update omits
            fields.append(f"config.packages.{manager}")
    if packages:
        params["packages"] = {**packages, "type": "packages"}
    return ({"type": "cloud", **params} if params else {}), fields


def _metadata_plan(
    desired: Mapping[str, str], remote: Mapping[str, str], owned: Iterable[str]
) -> tuple[dict[str, str | None], list[str]]:
    patch: dict[str, str | None] = {}
    # The API deletes a key given an empty value, so "" in the spec and an absent key are the same.
    for key, value in desired.items():
        if remote.get(key, "") != value:
            patch[key] = value
    for key in sorted(set(owned) - set(desired) - {UID_METADATA_KEY}):
        if key in remote:
            patch[key] = None  # only keys the operator wrote; keys written by others are never removed
    return patch, [f"metadata.{key}" for key in sorted(patch)]


def plan_update(
    spec: EnvironmentSpec, remote: RemoteEnvironment, *, resource_name: str, owned_metadata_keys: Iterable[str]
) -> UpdatePlan:
    """The update that brings ``remote`` to ``spec``, sending only differing fields."""
    params: JSON = {}
    fields: list[str] = []
    name = environment_name(spec, resource_name)
    if remote.name != name:
        params["name"] = name
        fields.append("name")
    if remote.description != (spec.description or ""):
        params["description"] = spec.description or ""
        fields.append("description")
    if spec.scope is not None and remote.scope != spec.scope:
        params["scope"] = spec.scope
        fields.append("scope")
    config, config_fields = _config_plan(spec.config, remote.config)
    if config:
        params["config"] = config
        fields.extend(config_fields)
    desired_metadata = dict(spec.metadata or {})
    metadata, metadata_fields = _metadata_plan(desired_metadata, remote.metadata, owned_metadata_keys)
    if metadata:
        params["metadata"] = metadata
        fields.extend(metadata_fields)
    return UpdatePlan(params=params, fields=tuple(fields), owned_metadata_keys=tuple(sorted(desired_metadata)))


def adoption_problem(spec: EnvironmentSpec, remote: RemoteEnvironment) -> tuple[str, str] | None:
    """(reason, message) when ``remote`` cannot be taken over for ``spec``; None when it can."""
    if remote.type != spec.config.type:
        return TYPE_MISMATCH, (
            f"environment {remote.id} is of type {remote.type}, but spec.config.type is {spec.config.type}; "
            "the type of an environment cannot change"
        )
    return None


# ----- status --------------------------------------------------------------------------------------


def status_for(
    remote: RemoteEnvironment, *, generation: int | None, now: datetime, owned_metadata_keys: Sequence[str]
) -> JSON:
    """The status fields that describe ``remote`` (conditions are set separately)."""
    return {
        "id": remote.id,
        "type": remote.type or None,
        "createdAt": remote.created_at or None,
        "updatedAt": remote.updated_at or None,
        "archivedAt": remote.archived_at,
        "observedGeneration": generation,
        "lastSyncTime": rfc3339(now),
        "ownedMetadataKeys": list(owned_metadata_keys),
        "createRequestedBy": None,
    }


@dataclass(frozen=True)
class ConditionChange:
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def apply_conditions(
    conditions: list[ConditionDict] | None,
    changes: Iterable[ConditionChange],
    *,
    generation: int | None,
    now: datetime,
) -> list[ConditionDict]:
    result = list(conditions or [])
    for change in changes:
        result = set_condition(
            result, type=change.type, status=change.status, reason=change.reason, message=change.message,
            observed_generation=generation, now=now,
        )
    return result


def is_new_reason(conditions: list[ConditionDict] | None, change: ConditionChange) -> bool:
    """Whether ``change`` differs from the condition in place: Events are posted on news only."""
    current = get_condition(conditions, change.type)
    return current is None or (current.get("status"), current.get("reason")) != (change.status, change.reason)


def ready_summary(status: Mapping[str, Any] | None) -> tuple[str, str]:
    """(status, reason) of the stored Ready condition, as the Environments metric counts it.

    ``("Unknown", "Unknown")`` before the controller first reported; an unexpected status is ``Unknown``,
    an unexpected reason ``Other``.
    """
    conditions = (status or {}).get("conditions")
    ready = get_condition(conditions if isinstance(conditions, list) else None, READY)
    if ready is None:
        return NOT_YET_REPORTED, NOT_YET_REPORTED
    value = ready.get("status")
    reason = ready.get("reason")
    return (value if value in ("True", "False") else NOT_YET_REPORTED,
            reason if reason in READY_REASONS else OTHER_REASON)


def synced_conditions(reason: str, message: str) -> list[ConditionChange]:
    return [ConditionChange(READY, "True", reason, message), ConditionChange(SYNCED, "True", reason, message)]


def failed_conditions(reason: str, message: str, *, ready: bool) -> list[ConditionChange]:
    """Synced=False; Ready=False too unless the environment exists and keeps working (``ready``)."""
    changes = [ConditionChange(SYNCED, "False", reason, message)]
    if not ready:
        changes.insert(0, ConditionChange(READY, "False", reason, message))
    return changes


def drift_conditions(fields: Sequence[str], *, recreated: bool = False) -> list[ConditionChange]:
    if recreated:
        return [ConditionChange(DRIFT_DETECTED, "True", RECREATED, "the environment was deleted outside the "
                                "operator and has been created again")]
    if fields:
        return [ConditionChange(DRIFT_DETECTED, "True", DRIFT_CORRECTED,
                                f"differed from the spec and were corrected: {', '.join(fields)}")]
    return [ConditionChange(DRIFT_DETECTED, "False", NO_DRIFT, "the environment matches the spec")]


@dataclass(frozen=True)
class SuccessReport:
    """How a successful sync is reported: the Ready/Synced reason and message, the Event, drift."""

    reason: str
    message: str
    event: tuple[str, str, str] | None  # (type, reason, message); None: nothing worth an Event
    drift: tuple[ConditionChange, ...] = ()  # DriftDetected, set only by checks and recreates
    drifted_fields: tuple[str, ...] | None = None  # status.driftedFields after a check; None: left as is


def success_report(
    environment_id: str, fields: Sequence[str], trigger: Trigger, *, previous_id: str | None, adopting: bool,
    created: bool, recovered: bool, recreating: bool,
) -> SuccessReport:
    """The report of a sync that ended with ``environment_id`` matching the spec, ``fields`` updated on the way.

    ``recovered``: found (by the resource UID) an environment an interrupted create request had made.
    """
    changed = ", ".join(fields)
    if recreating:
        message = f"environment {previous_id} was deleted outside the operator; created {environment_id}"
        return SuccessReport(RECREATED, message, ("Warning", RECREATED, message),
                             drift=tuple(drift_conditions((), recreated=True)))
    if created:
        message = f"created environment {environment_id}"
        return SuccessReport(CREATED, message, ("Normal", CREATED, message))
    if recovered:
        message = f"found environment {environment_id}, created by an interrupted attempt"
        return SuccessReport(CREATED, message, ("Normal", ADOPTED, message))
    if adopting:
        message = f"adopted environment {environment_id}" + (f"; updated {changed}" if changed else "")
        return SuccessReport(ADOPTED, message, ("Normal", ADOPTED, message))
    in_sync = f"environment {environment_id} matches the spec"
    if trigger == "check":
        drift, drifted = tuple(drift_conditions(fields)), tuple(fields)
        if not fields:
            return SuccessReport(IN_SYNC, in_sync, None, drift=drift, drifted_fields=drifted)
        return SuccessReport(DRIFT_CORRECTED, f"corrected drift in {changed}",
                             ("Warning", DRIFT_DETECTED, f"fields differed from the spec: {changed}; corrected"),
                             drift=drift, drifted_fields=drifted)
    if fields:
        return SuccessReport(UPDATED, f"updated {changed}",
                             ("Normal", UPDATED, f"updated environment {environment_id}: {changed}"))
    return SuccessReport(IN_SYNC, in_sync, None)


# ----- creating without duplicates -----------------------------------------------------------------


def needs_create_claim(status: Mapping[str, Any], spec: Mapping[str, Any], instance_id: str) -> bool:
    """Whether this operator instance must record its claim before it may send a create request.

    The claim (``status.createRequestedBy``) is written and stored before any create request, so a
    later instance that finds someone else's claim knows a create may have happened and looks first.
    """
    return not status.get("id") and not spec.get("externalId") and status.get("createRequestedBy") != instance_id


def must_look_up_before_create(
    *, claimed_by: str | None, instance_id: str, foreign_claim_seen: bool, outcome_unknown: bool, recreating: bool
) -> bool:
    """Whether an environment carrying our UID may already exist, so a create must look for it first.

    It may when another instance claimed the create (it may have sent it before dying), when an earlier
    request of ours has an unknown outcome (timeout, dropped connection, 5xx), and when recreating
    (a recreate interrupted after its request leaves the old, deleted ID in status).
    """
    return recreating or outcome_unknown or foreign_claim_seen or claimed_by != instance_id


def lookup_window_start(resource_created: datetime | None, previous_created: datetime | None) -> datetime | None:
    """Environments created before this moment cannot be ours: the lookup stops paging there."""
    moments = [moment for moment in (resource_created, previous_created) if moment is not None]
    return max(moments) - LOOKUP_CLOCK_SKEW if moments else None


def page_ends_lookup(page: Sequence[RemoteEnvironment], window_start: datetime | None) -> bool:
    """Lists are newest first: once a page reaches before the window, later pages are older still."""
    if window_start is None or not page:
        return False
    oldest = parse_time(page[-1].created_at)
    return oldest is not None and oldest < window_start


def find_own(page: Iterable[RemoteEnvironment], uid: str) -> RemoteEnvironment | None:
    """The newest environment stamped with ``uid``, preferring one that is not archived."""
    own = [environment for environment in page if environment.metadata.get(UID_METADATA_KEY) == uid]
    return next((e for e in own if not e.archived), own[0] if own else None)


# ----- failures --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureDecision:
    terminal: bool  # True: give up on this generation; False: retry after ``delay``
    reason: str
    message: str
    delay: float = 0.0


BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
# A refused key does not fix itself quickly: someone has to rotate the Secret.
CREDENTIALS_BACKOFF_BASE_SECONDS = 15.0
RETRY_AFTER_CAP_SECONDS = 3600.0


def retry_delay(retry: int, retry_after: float | None, *, base: float = BACKOFF_BASE_SECONDS) -> float:
    """The server's ``retry-after`` when it gave one, else exponential backoff."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, RETRY_AFTER_CAP_SECONDS)
    # kopf's ``retry`` counts the attempts before this one; this failure is the (retry + 1)-th in a row.
    return backoff_seconds(retry + 1, base=base, cap=BACKOFF_CAP_SECONDS)


def decide_failure(failure: ApiFailure, *, retry: int, action: str) -> FailureDecision:
    """How a failed ``action`` (e.g. "create environment") is reported and whether it is retried.

    400 and 422 are the API refusing the spec: terminal for this generation, with the API's message
    verbatim. 401/403 wait for a better key. 429 and 5xx (and no response) are retried, after the
    server's retry-after when it sent one. Other 4xx are refusals that retrying cannot fix.
    """
    status = failure.status
    if status in (400, 422):
        return FailureDecision(terminal=True, reason=INVALID_SPEC, message=failure.message)
    if status in (401, 403):
        delay = backoff_seconds(retry + 1, base=CREDENTIALS_BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS)
        return FailureDecision(
            terminal=False, reason=UNAUTHORIZED, delay=delay,
            message=f"the API refused the API key to {action} ({failure.describe()}); retrying in {delay:g}s",
        )
    if status == 429:
        delay = retry_delay(retry, failure.retry_after)
        return FailureDecision(
            terminal=False, reason=RATE_LIMITED, delay=delay,
            message=f"rate limited while trying to {action} ({failure.describe()}); retrying in {delay:g}s",
        )
    if status is None or status >= 500 or status in (408, 409):
        delay = retry_delay(retry, failure.retry_after)
        return FailureDecision(
            terminal=False, reason=API_UNAVAILABLE, delay=delay,
            message=f"could not {action} ({failure.describe()}); retrying in {delay:g}s",
        )
    if status == 404:
        return FailureDecision(terminal=True, reason=NOT_FOUND, message=failure.message)
    return FailureDecision(terminal=True, reason=REJECTED, message=failure.message)


RefusedUpdateVerdict = Literal["gone", "archived", "refused", "undecided"]


def rereads_after_refused_update(failure: ApiFailure) -> bool:
    """Whether an update's failure may come from the environment changing after the controller read it.

    A 404 (deleted in the meantime) and a 400 (archived in the meantime: archived environments are
    read-only) may; the answer lies in the environment as it is now, so the caller re-reads it once.
    """
    return failure.status in (400, 404)


def refused_update_verdict(failure: ApiFailure, reread: RemoteEnvironment | ApiFailure) -> RefusedUpdateVerdict:
    """What an update refused with ``failure`` means, judged by re-reading the environment (``reread``:
    the environment as the API returns it now, or the re-read's own failure).

    - ``gone``: it was deleted outside the operator: the same as finding it deleted on read.
    - ``archived``: it was archived outside the operator: reported, never fought.
    - ``refused``: it still stands as it was: the update's own failure stands, verbatim.
    - ``undecided``: the re-read failed in a way a retry may fix (no answer, 5xx, 429, the key): the
      re-read's failure is reported and retried, since calling a refusal terminal could be wrong.
    """
    if not rereads_after_refused_update(failure):
        return "refused"
    if isinstance(reread, ApiFailure):
        if reread.status == 404:
            return "gone"
        return "refused" if decide_failure(reread, retry=0, action="").terminal else "undecided"
    return "archived" if reread.archived else "refused"


# ----- drift-check schedule --------------------------------------------------------------------------


def drift_interval(annotations: Mapping[str, str], default_seconds: float) -> tuple[float, str | None]:
    """The drift-check interval for one object, and a complaint naming the annotation if it is unusable."""
    raw = annotations.get(DRIFT_INTERVAL_ANNOTATION)
    if raw is None:
        return default_seconds, None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < MIN_DRIFT_INTERVAL_SECONDS:
        return default_seconds, (
            f"annotation {DRIFT_INTERVAL_ANNOTATION}={raw!r} is not a number of seconds >= "
            f"{MIN_DRIFT_INTERVAL_SECONDS:g}; using {default_seconds:g}"
        )
    return value, None


def jittered(interval: float, fraction: float) -> float:
    """``interval`` moved by up to ``DRIFT_JITTER`` either way; ``fraction`` is uniform in [0, 1)."""
    return interval * (1 + DRIFT_JITTER * (2 * fraction - 1))


def drift_check_blocker(body: Mapping[str, Any]) -> str | None:
    """Why the periodic check must not run now (None: it may). Reads the live resource body.

    Without a remote ID the check still runs once a create was claimed (or an ID is to be adopted):
    kopf stores its progress before the status, so an operator that dies between the two writes leaves
    a handled resource without ``status.id``, and only this check brings the environment's ID back.
    """
    status = body.get("status") or {}
    metadata = body.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return "being deleted"
    if not status.get("id") and not status.get("createRequestedBy") and not (body.get("spec") or {}).get("externalId"):
        return "no remote environment yet"
    if status.get("archivedAt"):
        return "archived: the operator does not fight an archive"
    generation = metadata.get("generation")
    observed = status.get("observedGeneration")
    if observed is not None and generation is not None and observed != generation:
        return "a spec change is being applied"
    synced = get_condition(status.get("conditions"), SYNCED)
    if synced and synced.get("status") == "False" and synced.get("reason") in TERMINAL_REASONS:
        return "the API refused this generation of the spec"
    return None


@dataclass
class DriftSchedule:
    """When the next periodic check of one object is due (kept per object, in memory).

    Due one jittered interval after the later of the last check made here and ``status.lastSyncTime``.
    After an operator restart many objects are overdue at once: those are spread over the first
    ``DRIFT_JITTER`` of an interval after ``first_seen`` instead of all being re-read in the first second.
    """

    fraction: float  # jitter draw for the current period, uniform in [0, 1)
    first_seen: datetime
    last_check: datetime | None = None
    not_before: datetime | None = None  # set after a failed check: retry then, not a full period later
    failures: int = 0

    def seconds_until_due(self, *, now: datetime, last_sync: datetime | None, interval: float) -> float:
        if self.not_before is not None:
            return (self.not_before - now).total_seconds()
        reference = max((m for m in (last_sync, self.last_check) if m is not None), default=self.first_seen)
        due = reference + timedelta(seconds=jittered(interval, self.fraction))
        if self.last_check is None:
            due = max(due, self.first_seen + timedelta(seconds=self.fraction * interval * DRIFT_JITTER))
        return (due - now).total_seconds()

    def checked(self, *, now: datetime, fraction: float) -> None:
        """A check (or a sync) succeeded: the next one is a full jittered interval away."""
        self.last_check, self.fraction, self.not_before, self.failures = now, fraction, None, 0

    def failed(self, *, now: datetime, retry_in: float) -> None:
        self.not_before = now + timedelta(seconds=retry_in)
        self.failures += 1


# ----- deletion ----------------------------------------------------------------------------------


DeletionAction = Literal["release", "orphan", "archive", "delete"]


def deletion_action(spec: Mapping[str, Any], status: Mapping[str, Any]) -> DeletionAction:
    """What deleting the resource does remotely, by ``deletionPolicy`` (Archive when unset or unknown).

    Without ``status.id`` but with a create claim, a create request may have been sent whose answer was
    lost (a crash, a timeout, a 5xx): archive or delete then applies to the environment carrying the
    resource UID, if the caller finds one. Without either, nothing was ever created: release at once.
    """
    policy = spec.get("deletionPolicy") or "Archive"
    if not status.get("id") and (not status.get("createRequestedBy") or policy == "Orphan"):
        return "release"
    if policy == "Orphan":
        return "orphan"
    if policy == "Delete":
        return "delete"
    return "archive"
