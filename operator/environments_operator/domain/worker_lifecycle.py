"""Pure decisions about a worker pod's life: startup timeout, failed and vanished pods, TTL, orphaned Secrets.

``plan_lifecycle`` reads the pool's pods (``domain.dispatch.WorkerPodView``) and what the controller
remembers about them (``PodMemory``), and says which pods timed out starting, failed, vanished or
outlived ``ttlSecondsAfterFinished``; ``orphaned_secrets`` which per-item Secrets a crash left behind.
The lifecycle part of ``handlers/workerpool`` acts on these plans. No I/O, no clocks: callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from environments_operator.domain.dispatch import PHASE_FAILED, PHASE_PENDING, PHASE_SUCCEEDED, WorkerPodView
from environments_operator.domain.vocabulary import parse_time
from environments_operator.domain.worker_manifests import ANNOTATION_WORK_ID, LABEL_WORK_ID, worker_pod_name

# A gated pod whose dispatch is over is looked at after this long, and as often (see ``unreleased_pod_action``).
UNRELEASED_CHECK_AFTER_SECONDS = 10.0

# A pod vanishes from our view when it is deleted; one we deleted ourselves is not "vanished".
# Remember such names this long, far beyond the time a watch event needs to arrive.
FORGET_DELETED_AFTER_SECONDS = 600.0

# Warning Event reasons (and ``worker_lifecycle_total`` metric labels): how a worker pod ended abnormally.
WORKER_START_TIMEOUT = "WorkerStartTimeout"
WORKER_FAILED = "WorkerFailed"
WORKER_VANISHED = "WorkerVanished"
WORKER_FORCE_DELETED = "WorkerForceDeleted"
WORKER_NEVER_RELEASED = "WorkerNeverReleased"


@dataclass
class PodMemory:
    """What the controller remembers between lifecycle passes; rebuilt empty after a restart.

    ``first_seen`` and ``finished_seen`` stand in for timestamps a pod does not carry;
    ``deleted`` holds pods the controller deleted itself (so their disappearance is expected);
    ``reported`` holds the work IDs whose abnormal end was already acted on.

    Pods are keyed by ``pod_key`` (their UID): pod names derive from the work ID, so an item that comes
    back gets a fresh pod of the same name, and what was remembered about the old pod (deleted, first
    seen) must not apply to it, even while a stale index still holds both.
    """

    known: dict[str, WorkerPodView] = field(default_factory=dict)
    first_seen: dict[str, datetime] = field(default_factory=dict)
    finished_seen: dict[str, datetime] = field(default_factory=dict)
    deleted: dict[str, datetime] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)



def pod_key(view: WorkerPodView) -> str:
    """How ``PodMemory`` knows a pod: its UID (its name only where a view has none)."""
    return view.uid or view.name


@dataclass(frozen=True)
class LifecyclePlan:
    """What to do about the pool's pods now, and when to look again."""

    # Released, and Pending past the startup timeout: force-stop the item, then delete pod and Secret,
    # WorkerStartTimeout. The pod is deleted only once the stop went through: until then it is the
    # durable record that a stop is owed (a restart finds it timed out again).
    timed_out: tuple[WorkerPodView, ...] = ()
    # Failed: force-stop the item, report WorkerFailed; the pod stays until its TTL (for its logs),
    # and longer if the stop has not gone through yet.
    failed: tuple[WorkerPodView, ...] = ()
    # Gone without finishing, and not deleted by us: force-stop the item, delete its Secret, report.
    vanished: tuple[WorkerPodView, ...] = ()
    # Finished longer than ttlSecondsAfterFinished ago: delete pod and Secret.
    expired: tuple[WorkerPodView, ...] = ()
    # Still gated, no dispatch of its item in flight, older than UNRELEASED_CHECK_AFTER_SECONDS: a
    # dispatch stopped between the steps (an operator crash, a failed release). Ask the queue for the
    # item's state and act as ``unreleased_pod_action`` says.
    unreleased: tuple[WorkerPodView, ...] = ()
    # Deleted, and still there after its grace period (its node is gone): force-delete it.
    stuck_terminating: tuple[WorkerPodView, ...] = ()
    # Seconds until the next startup or TTL deadline; None when no deadline is pending.
    next_check_in: float | None = None


def _seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def plan_lifecycle(
    views: Sequence[WorkerPodView],
    memory: PodMemory,
    *,
    now: datetime,
    startup_timeout_seconds: float,
    ttl_seconds_after_finished: float,
    in_flight: Set[str] = frozenset(),
) -> LifecyclePlan:
    """Decide the lifecycle actions for the pool's pods, and update ``memory`` to the current view.

    Each abnormal end is planned once per work ID (``memory.reported``); the caller carries out the
    plan and records the deletions it makes in ``memory.deleted``. ``in_flight`` are the work IDs
    being dispatched right now (their gated pods are that dispatch's business).
    """
    current = {pod_key(view): view for view in views}
    for key in current:
        memory.first_seen.setdefault(key, now)
    timed_out: list[WorkerPodView] = []
    failed: list[WorkerPodView] = []
    expired: list[WorkerPodView] = []
    unreleased: list[WorkerPodView] = []
    stuck: list[WorkerPodView] = []
    deadlines: list[float] = []

    for view in views:
        if view.deleting:
            if view.stuck_terminating(now):
                stuck.append(view)
            elif view.deletion_deadline is not None:
                deadlines.append(_seconds(view.deletion_deadline, now) + 0.001)
            continue
        if pod_key(view) in memory.deleted:
            continue
        # A bound warm pod is an item's pod since it was bound, not since it was made.
        started = memory.first_seen[pod_key(view)] if view.warm else view.created_at or memory.first_seen[pod_key(view)]
        age = _seconds(now, started)
        if view.gated and not view.finished:  # a bound warm pod waiting for its assignment is Running
            if view.work_id in in_flight:
                continue
            if age >= UNRELEASED_CHECK_AFTER_SECONDS:
                unreleased.append(view)
            deadlines.append(UNRELEASED_CHECK_AFTER_SECONDS - age if age < UNRELEASED_CHECK_AFTER_SECONDS
                             else UNRELEASED_CHECK_AFTER_SECONDS)
            continue
        if view.phase == PHASE_PENDING:
            if age < startup_timeout_seconds:
                deadlines.append(startup_timeout_seconds - age)
            elif view.work_id not in memory.reported:
                timed_out.append(view)
        elif view.finished:
            finished = view.finished_at or memory.finished_seen.setdefault(pod_key(view), now)
            if view.phase == PHASE_FAILED and view.work_id not in memory.reported:
                failed.append(view)
            remaining = ttl_seconds_after_finished - _seconds(now, finished)
            if remaining <= 0:
                expired.append(view)
            else:
                deadlines.append(remaining)

    # An item whose old pod vanished and which has a pod again (it was offered again and served) is that
    # pod's business: a stop for the old pod would end the new delivery.
    work_ids_with_pods = {view.work_id for view in views}
    vanished = [
        view for key, view in memory.known.items()
        if key not in current and key not in memory.deleted and view.work_id not in work_ids_with_pods
        and view.phase != PHASE_SUCCEEDED and view.work_id not in memory.reported
    ]

    memory.reported.update(v.work_id for v in (*timed_out, *failed, *vanished))
    memory.known = dict(current)
    for name in [n for n in memory.first_seen if n not in current]:
        del memory.first_seen[name]
    for name in [n for n in memory.finished_seen if n not in current]:
        del memory.finished_seen[name]
    for name in [n for n, at in memory.deleted.items()
                 if n not in current and _seconds(now, at) > FORGET_DELETED_AFTER_SECONDS]:
        del memory.deleted[name]
    live_work_ids = {view.work_id for view in views}
    memory.reported.intersection_update(live_work_ids | {v.work_id for v in vanished})

    return LifecyclePlan(
        timed_out=tuple(timed_out),
        failed=tuple(failed),
        vanished=tuple(vanished),
        expired=tuple(expired),
        unreleased=tuple(unreleased),
        stuck_terminating=tuple(stuck),
        next_check_in=max(0.0, min(deadlines)) if deadlines else None,
    )


def orphaned_secrets(
    secrets: Iterable[Mapping[str, Any]],
    pod_names: Set[str],
    in_flight_work_ids: Set[str],
    *,
    now: datetime,
    grace_seconds: float,
) -> list[str]:
    """Per-item Secrets whose pod is gone: the names to delete.

    A Secret is created just before its pod, so one younger than ``grace_seconds`` or whose item is
    being dispatched right now is left alone. Deleting an orphan is always safe: if its item is
    offered again, dispatch creates the Secret anew.
    """
    orphans = []
    for secret in secrets:
        metadata: Mapping[str, Any] = secret.get("metadata") or {}
        annotations: Mapping[str, Any] = metadata.get("annotations") or {}
        labels: Mapping[str, Any] = metadata.get("labels") or {}
        work_id = annotations.get(ANNOTATION_WORK_ID) or labels.get(LABEL_WORK_ID)
        name = metadata.get("name")
        # Its pod is the one its owner reference names (a warm pod's is not named after the item).
        owner = next((ref.get("name") for ref in metadata.get("ownerReferences") or [] if ref.get("kind") == "Pod"),
                     None)
        pod_name = owner or (worker_pod_name(work_id) if work_id else None)
        if not work_id or not name or work_id in in_flight_work_ids or pod_name in pod_names:
            continue
        created = parse_time(metadata.get("creationTimestamp"))
        if created is not None and _seconds(now, created) < grace_seconds:
            continue
        orphans.append(str(name))
    return orphans


def secret_belongs_to(secret: Mapping[str, Any], pod_uid: str) -> bool:
    """Whether a per-item Secret is the one of the pod ``pod_uid`` (its owner), so deleting that pod may
    delete it. A Secret owned by another pod of the same name (a fresh pod of the same item) is not; one
    owned by no pod (made before Secrets belonged to their pods) goes with any pod of its item."""
    owners = [ref for ref in (secret.get("metadata") or {}).get("ownerReferences") or [] if ref.get("kind") == "Pod"]
    return not owners or not pod_uid or any(ref.get("uid") == pod_uid for ref in owners)


def start_timeout_message(view: WorkerPodView, timeout_seconds: float) -> str:
    cause = view.cause or "the pod was never scheduled or its containers never started"
    return (f"worker pod {view.name} for work item {view.work_id} was still Pending after "
            f"{timeout_seconds:g}s ({cause}); the pod is being deleted and the work item force-stopped")


def failed_message(view: WorkerPodView) -> str:
    cause = view.cause or "the pod failed"
    return f"worker pod {view.name} for work item {view.work_id} failed ({cause}); the work item is being force-stopped"


def vanished_message(view: WorkerPodView) -> str:
    return (f"worker pod {view.name} for work item {view.work_id} disappeared before it finished; "
            "the work item is being force-stopped")


UnreleasedPodAction = Literal["release", "wait", "delete"]


def unreleased_pod_action(item_state: str | None, *, age_seconds: float, startup_timeout_seconds: float,
                          warm: bool = False) -> UnreleasedPodAction:
    """What to do with a gated pod whose dispatch is over, given its item's state (None: no such item).

    - ``starting``: the ack went through and the release did not (a crash, a failed patch): release it
      now, or the item waits for a worker that can never start.
    - ``queued``: never acknowledged; it is served into this pod when it is offered again. Past the
      startup timeout, delete it (nothing ran in it) and let the item get a fresh pod.
    - ``unknown`` (not found among the newest items listed): wait; deleting could strand a ``starting`` item.
    - anything else (held by another worker, stopping, stopped, gone): delete it, there is nothing to stop.

    A bound warm pod's "gate" is the annotation written after its assignment: one whose item is
    ``active`` got its assignment (only its worker heartbeats the item) and is released (annotated) too.
    """
    if item_state == "starting" or (warm and item_state == "active"):
        return "release"
    if item_state == "unknown":
        return "wait"
    if item_state == "queued":
        return "wait" if age_seconds < startup_timeout_seconds else "delete"
    return "delete"


OwedStopAction = Literal["stop", "drop"]


def owed_stop_action(item_state: str | None, *, dispatching: bool) -> OwedStopAction:
    """Whether a stop owed for a failed or vanished pod's item is still owed, given the item's state now.

    Such a stop is owed to one delivery of the item, the one that pod held. An item offered again
    since (its lease ran out: ``queued``, or being dispatched by this pool right now) is a new delivery,
    which a fresh pod serves: stopping it would end the session its fresh pod is about to run. Every
    other state is stopped: ``starting`` and ``active`` items are held by a worker that no longer
    exists (a ``starting`` one never heartbeat, so no lease will ever run out), and stopping a stopped or
    missing item is a harmless 409 or 404.
    """
    if dispatching or item_state == "queued":
        return "drop"
    return "stop"


def abandoned_message(view: WorkerPodView, timeout_seconds: float) -> str:
    return (f"worker pod {view.name} for work item {view.work_id} was never released: its item was not "
            f"acknowledged within {timeout_seconds:g}s, so no worker ran; the pod is being deleted and the item, "
            "if still queued, gets a fresh pod")


def stuck_terminating_message(view: WorkerPodView) -> str:
    return (f"worker pod {view.name} for work item {view.work_id} is still Terminating after its grace period "
            "(its node is gone or unresponsive); force-deleting it")
