"""Pure decisions of the WorkerPool controller in ``PerWorkItem`` mode.

The controller's I/O loop (the ``handlers/workerpool`` package) asks this module every question it has to
answer, and only then acts:

- **What is the pool serving?** ``parse_pool_spec`` and ``resolve_environment`` turn the spec and the
  Environment index into an environment ID, or a ``Blocker`` that names what is missing.
- **May it poll?** Capacity is ``maxWorkers`` minus the unfinished worker pods, the items being
  dispatched right now and the polls in flight (each of which may return an item). The pollers
  grow by one per claimed item (so a burst is served by up to ``MAX_CONCURRENT_POLLS`` pipelined
  pollers after a few round trips) and shrink back to one as soon as a poll comes back empty, so an
  idle pool keeps a single long-poll open. ``after_failed_poll`` says how long a failed poll pauses
  polling and what the pool reports about it.
- **What are the pods?** ``worker_pod_view`` reads a pod into the few facts that matter;
  ``existing_pod_action`` says what a claimed item does with a pod already under its name.
  What happens to a pod over its life (startup timeout, failure, TTL) is ``domain.worker_lifecycle``.
- **What does the status say?** ``worker_counts``, ``desired_workers`` and ``pool_conditions``.

No I/O, no clocks: every function takes ``now`` when it needs the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from environments_operator.domain.conditions import ConditionDict, set_condition
from environments_operator.domain.vocabulary import Problem, backoff_seconds, parse_time, validation_message
from environments_operator.domain.worker_manifests import (
    ANNOTATION_ASSIGNED,
    ANNOTATION_ENVIRONMENT_ID,
    ANNOTATION_SESSION_ID,
    ANNOTATION_WORK_ID,
    ANNOTATION_WORKER_POOL,
    LABEL_WARM,
    LABEL_WORK_ID,
    LABEL_WORKER_POOL,
    SCHEDULING_GATE,
)
from environments_operator.domain.workerpool import WorkerCounts, WorkerPoolSpec

if TYPE_CHECKING:  # warm_workers builds on this module
    from environments_operator.domain.warm_workers import WarmPodView

# Upper bound on pipelined polls per pool: enough to hide a round trip per item in a burst, and
# well within the Kubernetes client's thread pool, which every dispatch of every pool shares.
MAX_CONCURRENT_POLLS = 16

# After this many poll failures in a row, Ready turns False (polling goes on, with backoff).
POLL_FAILURES_BEFORE_NOT_READY = 3

PHASE_PENDING, PHASE_RUNNING, PHASE_SUCCEEDED, PHASE_FAILED, PHASE_UNKNOWN = (
    "Pending", "Running", "Succeeded", "Failed", "Unknown",
)
FINISHED_PHASES = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

WorkerState = Literal["starting", "running", "succeeded", "failed"]

CONDITION_READY = "Ready"
CONDITION_AT_CAPACITY = "AtCapacity"
CONDITION_DISPATCH_FAILING = "DispatchFailing"

# Condition reasons (CamelCase, machine-readable), as ``environment_sync`` names its own.
# Ready=False: why the pool cannot dispatch.
INVALID_SPEC = "InvalidSpec"
ENVIRONMENT_NOT_FOUND = "EnvironmentNotFound"
ENVIRONMENT_NOT_SELF_HOSTED = "EnvironmentNotSelfHosted"
ENVIRONMENT_ARCHIVED = "EnvironmentArchived"
ENVIRONMENT_NOT_READY = "EnvironmentNotReady"
ENVIRONMENT_KEY_UNAVAILABLE = "EnvironmentKeyUnavailable"
ENVIRONMENT_KEY_REJECTED = "EnvironmentKeyRejected"
POLL_REJECTED = "PollRejected"
WORK_QUEUE_UNAVAILABLE = "WorkQueueUnavailable"
DELETING = "Deleting"
SUSPENDED = "Suspended"
# Ready=True, AtCapacity, DispatchFailing=False.
SERVING = "Serving"
MAX_WORKERS_REACHED = "MaxWorkersReached"
BELOW_CAPACITY = "BelowCapacity"
DISPATCHING = "Dispatching"
# Event reasons that are no condition's (a worker pod's own are in ``worker_lifecycle``).
DISPATCH_FAILED = "DispatchFailed"
WORK_ITEM_UNSERVABLE = "WorkItemUnservable"


# ----- what the pool serves -------------------------------------------------------------------------


# Why a pool cannot dispatch right now (the reason is Ready's): one shared ``Problem``.
Blocker = Problem


def parse_pool_spec(spec: Mapping[str, Any]) -> WorkerPoolSpec | Blocker:
    try:
        parsed = WorkerPoolSpec.model_validate(dict(spec))
    except ValidationError as exc:
        return Blocker(INVALID_SPEC, validation_message(exc))
    return parsed


@dataclass(frozen=True)
class EnvironmentEntry:
    """What a WorkerPool needs to know about an Environment resource (one kopf index value)."""

    name: str
    id: str | None
    type: str | None
    archived: bool


def environment_entry(name: str, spec: Mapping[str, Any], status: Mapping[str, Any]) -> EnvironmentEntry:
    config = spec.get("config") or {}
    return EnvironmentEntry(
        name=name,
        id=status.get("id") or None,
        # The API's answer wins; the spec says what it will be before the first sync.
        type=status.get("type") or config.get("type"),
        archived=bool(status.get("archivedAt")),
    )


# The Environment index: (namespace, name) -> the entries kopf holds for it (one, or none).
EnvironmentIndex = Mapping[tuple[str, str], Iterable[EnvironmentEntry]]


def resolve_environment(spec: WorkerPoolSpec, namespace: str, environments: EnvironmentIndex) -> str | Blocker:
    """The environment ID the pool serves, or why there is none yet.

    Both the dispatch loop and the deletion handler resolve through here, from the same index.
    """
    if spec.environmentId:
        return spec.environmentId
    assert spec.environmentRef is not None  # the spec model guarantees exactly one of the two
    name = spec.environmentRef.name
    entries = list(environments.get((namespace, name), ()))
    if not entries:
        return Blocker(ENVIRONMENT_NOT_FOUND, f"Environment {name!r} not found in namespace {namespace}")
    entry = entries[0]
    if entry.type is not None and entry.type != "self_hosted":
        return Blocker(
            ENVIRONMENT_NOT_SELF_HOSTED,
            f"Environment {name!r} is {entry.type}; a WorkerPool serves only self_hosted environments",
        )
    if entry.archived:
        return Blocker(ENVIRONMENT_ARCHIVED, f"Environment {name!r} is archived and takes no new work")
    if not entry.id:
        return Blocker(ENVIRONMENT_NOT_READY, f"Environment {name!r} has no status.id yet (not synced)")
    return entry.id


# ----- capacity and pollers -------------------------------------------------------------------------


def occupied_slots(unfinished_work_ids: Set[str], dispatching: Set[str]) -> int:
    """Worker slots taken: unfinished pods, plus items claimed whose pods are not in view yet."""
    return len(unfinished_work_ids | dispatching)


def can_start_poll(*, max_workers: int, occupied: int, polling: int) -> bool:
    """A poll may start only if every poll in flight could return an item and still fit."""
    return occupied + polling < max_workers


def should_add_poller(*, max_workers: int, occupied: int, polling: int, pollers: int) -> bool:
    """After a claim: one more poller, while a slot is left that nobody polls for."""
    return pollers < MAX_CONCURRENT_POLLS and can_start_poll(
        max_workers=max_workers, occupied=occupied, polling=polling
    )


def poller_should_retire(*, pollers: int, poll_was_empty: bool) -> bool:
    """An empty poll means the burst is over: all but the last poller go away."""
    return poll_was_empty and pollers > 1


@dataclass(frozen=True)
class PollFailurePlan:
    """What a failed poll means: how long to pause polling, what to report, whether to re-read the key."""

    pause_seconds: float
    # What Ready=False reports now; None leaves the pool's report as it is (a transient failure so far).
    blocker: Blocker | None
    # The API refused the key: it may have been rotated, so the Secret is read again on the next pass.
    reread_key: bool


def after_failed_poll(
    *,
    failures: int,
    status: int,
    retryable: bool,
    credential_rejected: bool,
    retry_after: float | None,
    api_message: str,
    error: str,
    jitter: float | None = None,
) -> PollFailurePlan:
    """Decide on the ``failures``-th failed poll in a row; ``error`` is the failure as one line.

    A rejected key or a non-retryable refusal is reported at once; a transient failure only once it
    has repeated ``POLL_FAILURES_BEFORE_NOT_READY`` times. The pause honours the API's Retry-After, and
    is jittered by ``jitter`` (see ``backoff_seconds``).
    """
    pause = max(backoff_seconds(failures, jitter=jitter), retry_after or 0.0)
    blocker: Blocker | None = None
    if credential_rejected:
        blocker = Blocker(ENVIRONMENT_KEY_REJECTED, f"the API rejected the environment key ({status}): {api_message}")
    elif not retryable:
        blocker = Blocker(POLL_REJECTED, f"polling the work queue failed: {error}")
    elif failures >= POLL_FAILURES_BEFORE_NOT_READY:
        blocker = Blocker(
            WORK_QUEUE_UNAVAILABLE, f"{failures} polls in a row failed, retrying with backoff; last: {error}")
    return PollFailurePlan(pause_seconds=pause, blocker=blocker, reread_key=credential_rejected)


# ----- pods -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPodView:
    """The facts about one worker pod that dispatch and lifecycle decisions use."""

    name: str
    namespace: str
    pool: str
    work_id: str
    phase: str
    deleting: bool = False
    created_at: datetime | None = None
    finished_at: datetime | None = None
    # Why it is not running or why it ended, as Kubernetes says it (e.g. "ImagePullBackOff: ...").
    cause: str | None = None
    uid: str = ""
    scheduling_gates: tuple[str, ...] = ()
    # The environment whose item it serves (its annotation); None on pods made before it existed.
    environment_id: str | None = None
    # When a deleted pod's grace period ends (its deletionTimestamp): a kubelet that has not removed
    # it by then is gone with its node, and only a force delete removes it.
    deletion_deadline: datetime | None = None
    session_id: str | None = None
    # A warm pod bound to this item (its name is not the item's), and whether its assignment is written.
    warm: bool = False
    assigned: bool = False

    @property
    def gated(self) -> bool:
        """Still behind our scheduling gate (a warm pod: its assignment not written yet): its item is not
        acknowledged yet, so no worker serves it."""
        return SCHEDULING_GATE in self.scheduling_gates or (self.warm and not self.assigned)

    def stuck_terminating(self, now: datetime) -> bool:
        return self.deletion_deadline is not None and now > self.deletion_deadline

    def holds_slot(self, now: datetime) -> bool:
        """Whether it takes one of the pool's ``maxWorkers``: unfinished, and not stuck Terminating."""
        return not self.finished and not self.stuck_terminating(now)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    @property
    def state(self) -> WorkerState:
        if self.phase == PHASE_PENDING:
            return "starting"
        if self.phase == PHASE_SUCCEEDED:
            return "succeeded"
        if self.phase == PHASE_FAILED:
            return "failed"
        return "running"


def _container_statuses(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def _pod_cause(phase: str, status: Mapping[str, Any]) -> str | None:
    def described(reason: object, message: object) -> str:
        return f"{reason}: {message}" if message else str(reason)

    for container in _container_statuses(status):
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated") or {}
        if phase == PHASE_PENDING and waiting.get("reason") and waiting.get("reason") != "ContainerCreating":
            return f"container {container.get('name')}: " + described(waiting["reason"], waiting.get("message"))
        if phase == PHASE_FAILED and terminated and terminated.get("exitCode", 0) != 0:
            reason = terminated.get("reason") or "Error"
            return (f"container {container.get('name')} terminated: {reason} "
                    f"(exit code {terminated.get('exitCode')})")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return described(condition.get("reason") or "Unschedulable", condition.get("message"))
    if status.get("reason"):
        return described(status["reason"], status.get("message"))
    return None


def worker_pod_view(pod: Mapping[str, Any]) -> WorkerPodView | None:
    """Read a worker pod; ``None`` if it does not carry the contract labels."""
    metadata: Mapping[str, Any] = pod.get("metadata") or {}
    labels: Mapping[str, Any] = metadata.get("labels") or {}
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    work_id = annotations.get(ANNOTATION_WORK_ID) or labels.get(LABEL_WORK_ID)
    pool = annotations.get(ANNOTATION_WORKER_POOL) or labels.get(LABEL_WORKER_POOL)
    if not work_id or not pool or not metadata.get("name"):
        return None
    status: Mapping[str, Any] = pod.get("status") or {}
    spec: Mapping[str, Any] = pod.get("spec") or {}
    # A pod the kubelet has not reported on yet has no phase; the apiserver would say Pending.
    phase = str(status.get("phase") or PHASE_PENDING)
    finished_times = [
        t for t in (
            parse_time(((c.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            for c in status.get("containerStatuses") or []
        ) if t is not None
    ]
    return WorkerPodView(
        name=str(metadata["name"]),
        namespace=str(metadata.get("namespace") or ""),
        pool=str(pool),
        work_id=str(work_id),
        phase=phase,
        deleting=bool(metadata.get("deletionTimestamp")),
        created_at=parse_time(metadata.get("creationTimestamp")),
        finished_at=max(finished_times) if phase in FINISHED_PHASES and finished_times else None,
        cause=_pod_cause(phase, status),
        uid=str(metadata.get("uid") or ""),
        scheduling_gates=tuple(str(gate.get("name") or "") for gate in spec.get("schedulingGates") or []
                               if isinstance(gate, Mapping)),
        environment_id=annotations.get(ANNOTATION_ENVIRONMENT_ID) or None,
        session_id=annotations.get(ANNOTATION_SESSION_ID) or None,
        deletion_deadline=parse_time(metadata.get("deletionTimestamp")),
        warm=labels.get(LABEL_WARM) == "true",
        assigned=annotations.get(ANNOTATION_ASSIGNED) == "true",
    )


def unfinished_work_ids(views: Iterable[WorkerPodView], now: datetime) -> set[str]:
    """The items whose pods take a slot (see ``WorkerPodView.holds_slot``)."""
    return {view.work_id for view in views if view.holds_slot(now)}


ExistingPodAction = Literal["serve", "clear", "leave"]


def existing_pod_action(view: WorkerPodView) -> ExistingPodAction:
    """What a claimed item does with the pod already under its name (its creation met AlreadyExists).

    Pod names derive from the work ID, so the item meets its own pod whenever it comes back:

    - ``serve``: the pod is still gated, so no worker served the item in it (an earlier dispatch stopped
      before the release; a bound warm pod runs, but without its assignment it serves nothing); write its
      Secret, acknowledge, release it.
    - ``clear``: the pod ended or is being deleted; delete it and leave the item unacknowledged, to be
      offered again and get a fresh pod.
    - ``leave``: the pod was released and has not ended: a worker may be serving the item, or will find
      its lease gone and exit. Neither acknowledge again nor delete; the item comes back until that
      pod ends, then it gets a fresh pod.
    """
    if view.finished or view.deleting:
        return "clear"
    if view.gated:
        return "serve"
    return "leave"


# ----- status ---------------------------------------------------------------------------------------


def suspended_blocker() -> Blocker:
    return Blocker(SUSPENDED, "spec.suspend is true: no new work item is claimed; running sessions continue")


def ready_event(previous: list[ConditionDict] | None, current: list[ConditionDict]) -> tuple[str, str, str] | None:
    """The Event (type, reason, message) that a change of Ready deserves, if any.

    A Warning when a ``Ready=False`` reason first appears (``Suspended``, being deliberate, is Normal), a
    Normal ``Serving`` when the pool is Ready again after not being so; nothing while Ready stays as it
    was, so a pool failing the same way for hours posts one Event, not one per pass.
    """
    def ready(conditions: list[ConditionDict] | None) -> ConditionDict | None:
        return next((c for c in conditions or [] if c.get("type") == CONDITION_READY), None)

    before, now = ready(previous), ready(current)
    if now is None:
        return None
    if now.get("status") == "False":
        if before is not None and before.get("status") == "False" and before.get("reason") == now.get("reason"):
            return None
        kind = "Normal" if now.get("reason") == SUSPENDED else "Warning"
        return kind, str(now.get("reason")), str(now.get("message") or "")
    if before is not None and before.get("status") == "False":
        return "Normal", SERVING, f"ready again (was {before.get('reason')}): {now.get('message')}"
    return None


def worker_counts(views: Iterable[WorkerPodView], warm_views: Iterable[WarmPodView] = ()) -> WorkerCounts:
    """Item pods by state; unbound warm pods as ``warm`` once ready, as ``starting`` until then."""
    counts = {"warm": 0, "starting": 0, "running": 0, "succeeded": 0, "failed": 0}
    for view in views:
        counts[view.state] += 1
    for warm in warm_views:
        if warm.deleting or warm.finished:
            continue
        counts["warm" if warm.ready else "starting"] += 1
    return WorkerCounts(**counts)


def desired_workers(*, max_workers: int, active: int, depth: int | None) -> int:
    """``min(maxWorkers, active + depth)``: the pods this pool would run if it could."""
    return min(max_workers, active + (depth or 0))


# A refused Secret or Pod creation: why (DispatchFailing's reason), and what Kubernetes said.
DispatchFailure = Problem


AckFailureAction = Literal["offer_again", "ask_state", "remove_pod"]


def after_failed_ack(*, status: int, retryable: bool) -> AckFailureAction:
    """What to do with an item's pod, still gated, when its ack failed.

    - A transient failure: keep the pod; the item is offered again after the reclaim window, meets its
      gated pod and is acknowledged and released then.
    - 409, the item is past ``queued``: the ack may have gone through after all (its answer was lost or
      mangled), or another worker holds the item. Ask the queue for its state and decide as for any
      unreleased pod (``worker_lifecycle.unreleased_pod_action``): release it if the item waits for a
      worker (``starting``), else remove it.
    - Anything else (the item is gone, the key is refused): no worker ever ran in the gated pod, so
      removing it ends nothing.
    """
    if retryable:
        return "offer_again"
    return "ask_state" if status == 409 else "remove_pod"


def dispatch_failure(kind: str, status: int, api_reason: str, api_message: str, work_id: str) -> DispatchFailure:
    """Name a refused creation: quota and policy refusals (403), invalid manifests (422), the rest."""
    if status == 403:
        reason = f"{kind}CreationForbidden"
    elif status == 422:
        reason = f"{kind}Invalid"
    else:
        reason = f"{kind}CreationFailed"
    detail = f"{status} {api_reason}: {api_message}".strip().rstrip(":")
    return DispatchFailure(
        reason,
        f"creating the {kind} for work item {work_id} was refused ({detail}); the item is left unacknowledged "
        "and will be offered again after the reclaim window",
    )


def pool_conditions(
    previous: list[ConditionDict] | None,
    *,
    blocker: Blocker | None,
    environment_id: str | None,
    max_workers: int,
    active: int,
    depth: int | None,
    dispatch_failure: DispatchFailure | None,
    generation: int | None,
    now: datetime,
) -> list[ConditionDict]:
    """Ready, AtCapacity and DispatchFailing, with transition times kept where nothing changed."""
    conditions = previous
    if blocker is not None:
        conditions = set_condition(conditions, type=CONDITION_READY, status="False", reason=blocker.reason,
                                   message=blocker.message, observed_generation=generation, now=now)
    else:
        conditions = set_condition(conditions, type=CONDITION_READY, status="True", reason=SERVING,
                                   message=f"serving the work queue of environment {environment_id}",
                                   observed_generation=generation, now=now)
    backlog = depth or 0
    if active >= max_workers:
        conditions = set_condition(
            conditions, type=CONDITION_AT_CAPACITY, status="True", reason=MAX_WORKERS_REACHED,
            message=f"{active} unfinished worker pods (maxWorkers {max_workers}); {backlog} items waiting",
            observed_generation=generation, now=now)
    else:
        conditions = set_condition(
            conditions, type=CONDITION_AT_CAPACITY, status="False", reason=BELOW_CAPACITY,
            message=f"{active} of {max_workers} workers in use; {backlog} items waiting",
            observed_generation=generation, now=now)
    if dispatch_failure is not None:
        conditions = set_condition(conditions, type=CONDITION_DISPATCH_FAILING, status="True",
                                   reason=dispatch_failure.reason, message=dispatch_failure.message,
                                   observed_generation=generation, now=now)
    else:
        conditions = set_condition(conditions, type=CONDITION_DISPATCH_FAILING, status="False",
                                   reason=DISPATCHING, message="", observed_generation=generation, now=now)
    return conditions
