"""Pure decisions about warm worker pods (``spec.minWorkers``): how many, which to replace, which to bind.

A warm pod is started before any item exists and waits for its assignment. ``warm_pod_view`` reads an
unbound one; once bound it is an item's pod like any other (``domain.dispatch.worker_pod_view``) and
follows ``domain.worker_lifecycle``. ``plan_warm`` keeps ``minWorkers`` of them, within what
``maxWorkers`` leaves; ``choose_warm_pod`` picks the one a claimed item is bound to.

Counting against ``maxWorkers``: an unbound warm pod that is ready is capacity a claim will use (the
pollers do not count it as taken), one still starting is taken (``warm_slots_taken``). So that a poll
already in flight still finds room when it returns an item and no warm pod is left for it, warm pods
are only created into room no such poll counts on (``plan_warm``'s ``room``).

No I/O, no clocks: callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from environments_operator.domain.dispatch import FINISHED_PHASES, PHASE_PENDING, PHASE_RUNNING, _pod_cause
from environments_operator.domain.vocabulary import parse_time
from environments_operator.domain.worker_manifests import (
    ANNOTATION_TEMPLATE_HASH,
    ANNOTATION_WORK_ID,
    ANNOTATION_WORKER_POOL,
    LABEL_WARM,
    LABEL_WARM_POD,
    LABEL_WORK_ID,
    LABEL_WORKER_POOL,
)

# Warning Event reasons: a warm pod that ended before it was bound (no item is affected).
WARM_WORKER_FAILED = "WarmWorkerFailed"
WARM_WORKER_START_TIMEOUT = "WarmWorkerStartTimeout"
WARM_WORKER_VANISHED = "WarmWorkerVanished"
WARM_WORKER_CREATION_FAILED = "WarmWorkerCreationFailed"

# Remember the warm pods we deleted this long (their disappearance is not a vanish).
FORGET_DELETED_AFTER_SECONDS = 600.0
# A pod we deleted that still shows no deletionTimestamp after this long: the delete failed; retire it again.
DELETE_RETRY_SECONDS = 30.0

RetireReason = Literal["excess", "aged", "template", "failed", "start_timeout"]


@dataclass(frozen=True)
class WarmPodView:
    """The facts about one unbound warm pod that warm-pool decisions use."""

    name: str
    namespace: str
    pool: str
    uid: str
    phase: str
    ready: bool
    created_at: datetime | None = None
    deleting: bool = False
    deletion_deadline: datetime | None = None
    template_hash: str | None = None
    cause: str | None = None
    # Binding is conditional on it: a pod changed since (bound by another dispatch) is not bound again.
    resource_version: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    def stuck_terminating(self, now: datetime) -> bool:
        return self.deletion_deadline is not None and now > self.deletion_deadline


def warm_pod_view(pod: Mapping[str, Any]) -> WarmPodView | None:
    """Read an unbound warm pod; ``None`` for any other pod (a bound warm pod is an item's pod)."""
    metadata: Mapping[str, Any] = pod.get("metadata") or {}
    labels: Mapping[str, Any] = metadata.get("labels") or {}
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    pool = annotations.get(ANNOTATION_WORKER_POOL) or labels.get(LABEL_WORKER_POOL)
    if labels.get(LABEL_WARM) != "true" or not pool or not metadata.get("name"):
        return None
    if annotations.get(ANNOTATION_WORK_ID) or labels.get(LABEL_WORK_ID):
        return None
    status: Mapping[str, Any] = pod.get("status") or {}
    phase = str(status.get("phase") or PHASE_PENDING)
    ready_condition = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    ready = phase == PHASE_RUNNING and (ready_condition is None or ready_condition.get("status") == "True")
    return WarmPodView(
        name=str(metadata["name"]),
        namespace=str(metadata.get("namespace") or ""),
        pool=str(pool),
        uid=str(metadata.get("uid") or ""),
        phase=phase,
        ready=ready and not metadata.get("deletionTimestamp"),
        created_at=parse_time(metadata.get("creationTimestamp")),
        deleting=bool(metadata.get("deletionTimestamp")),
        deletion_deadline=parse_time(metadata.get("deletionTimestamp")),
        template_hash=annotations.get(ANNOTATION_TEMPLATE_HASH),
        cause=_pod_cause(phase, status),
        resource_version=str(metadata["resourceVersion"]) if metadata.get("resourceVersion") else None,
    )


def warm_slots_taken(views: Iterable[WarmPodView], now: datetime) -> int:
    """Slots of ``maxWorkers`` that unbound warm pods take from claims: those not ready (starting, or
    being deleted and not yet gone). A ready one is where the next claim goes, so it takes none."""
    return sum(1 for view in views if not view.finished and not view.ready and not view.stuck_terminating(now))


def ready_warm_pods(views: Iterable[WarmPodView], reserved: Set[str]) -> list[WarmPodView]:
    return [view for view in views if view.ready and not view.deleting and view.name not in reserved]


def choose_warm_pod(views: Iterable[WarmPodView], reserved: Set[str]) -> WarmPodView | None:
    """The warm pod a claimed item is bound to: a ready one no other item is being bound to, the oldest
    first (the youngest live longest before ``warmMaxAgeSeconds`` retires them); None to use a fresh pod."""
    ready = ready_warm_pods(views, reserved)
    if not ready:
        return None
    return min(ready, key=lambda view: (view.created_at is None, view.created_at or datetime.min, view.name))


@dataclass
class WarmMemory:
    """What the pool remembers about its warm pods between passes; rebuilt empty after a restart."""

    known: dict[str, WarmPodView] = field(default_factory=dict)  # uid -> last view
    deleted: dict[str, datetime] = field(default_factory=dict)  # uids we deleted, and when
    reported: set[str] = field(default_factory=set)  # uids whose abnormal end was reported


@dataclass(frozen=True)
class WarmPlan:
    """What to do about the pool's warm pods now, and when to look again."""

    create: int = 0
    # Idle warm pods to delete, and why (``failed`` and ``start_timeout`` are also reported).
    retire: tuple[tuple[WarmPodView, RetireReason], ...] = ()
    # Gone without being deleted by us nor bound: reported; their ServiceAccounts etc. are deleted.
    vanished: tuple[WarmPodView, ...] = ()
    # Deleted, and still there after their grace period: force-delete.
    stuck_terminating: tuple[WarmPodView, ...] = ()
    next_check_in: float | None = None


def warm_target(*, min_workers: int, max_workers: int, busy: int) -> int:
    """How many warm pods the pool keeps: ``minWorkers``, less what items' pods already take of ``maxWorkers``."""
    return max(0, min(min_workers, max_workers - busy))


def _age(view: WarmPodView, now: datetime) -> float:
    started = view.created_at or now
    return (now - started).total_seconds()


def plan_warm(
    views: Sequence[WarmPodView],
    memory: WarmMemory,
    *,
    now: datetime,
    min_workers: int,
    max_workers: int,
    busy: int,
    polls_in_flight: int,
    bound_uids: Set[str],
    startup_timeout_seconds: float,
    max_age_seconds: float,
    template_hash: str,
    creating: int = 0,
) -> WarmPlan:
    """Decide which warm pods to create and retire, and update ``memory`` to the current view.

    ``views`` are the idle warm pods (none an item is being bound to); ``busy`` the slots items' pods
    take (unfinished pods, items being dispatched); ``bound_uids`` the warm pods that are items' pods now
    (gone from the warm view, but not vanished); ``creating`` the warm pods being created, not in view yet.

    A ready pod is retired by choice (too many, too old, an older template) only while the polls in
    flight still find a ready warm pod or a free slot each: each of them may return an item.
    """
    current = {view.uid: view for view in views}
    for view in views:
        at = memory.deleted.get(view.uid)
        if at is not None and not view.deleting and (now - at).total_seconds() > DELETE_RETRY_SECONDS:
            del memory.deleted[view.uid]  # its delete failed: decided afresh below
    retire: list[tuple[WarmPodView, RetireReason]] = []
    stuck: list[WarmPodView] = []
    deadlines: list[float] = []
    healthy: list[WarmPodView] = []
    refresh: list[tuple[WarmPodView, RetireReason]] = []  # ready, to be replaced if the polls allow
    deleting = 0
    for view in views:
        if view.deleting or view.uid in memory.deleted:
            if view.stuck_terminating(now):
                stuck.append(view)
            elif not view.finished:
                deleting += 1
                if view.deletion_deadline is not None:
                    deadlines.append((view.deletion_deadline - now).total_seconds() + 0.001)
            continue
        age = _age(view, now)
        if view.finished:
            retire.append((view, "failed"))
        elif not view.ready and age >= startup_timeout_seconds:
            retire.append((view, "start_timeout"))
        elif view.ready and view.template_hash not in (None, template_hash):
            refresh.append((view, "template"))
        elif view.ready and max_age_seconds > 0 and age >= max_age_seconds:
            refresh.append((view, "aged"))
        else:
            healthy.append(view)
            if not view.ready:
                deadlines.append(startup_timeout_seconds - age)
            elif max_age_seconds > 0:
                deadlines.append(max_age_seconds - age)

    # A pod retired now still holds its slot until it is gone (a failed one holds none).
    deleting += sum(1 for view, _reason in retire if not view.finished)
    target = warm_target(min_workers=min_workers, max_workers=max_workers, busy=busy + deleting)
    healthy.extend(view for view, _reason in refresh)
    # Retire: too many (not-ready ones first, they serve no one yet; then the youngest), then the stale.
    by_preference = sorted(healthy, key=lambda v: (v.ready, -(v.created_at or now).timestamp()))
    excess = by_preference[:max(0, len(healthy) - target)]
    stale: dict[str, RetireReason] = {view.uid: reason for view, reason in refresh}
    candidates: list[tuple[WarmPodView, RetireReason]] = [(view, stale.get(view.uid, "excess")) for view in excess]
    candidates += [(view, reason) for view, reason in refresh if view not in excess]
    for view, reason in candidates:
        ready_after = sum(1 for v in healthy if v.ready) - (1 if view.ready else 0)
        free = max_workers - busy - deleting - len(stuck) - creating - len(healthy)  # a retired pod keeps its slot
        if view.ready and ready_after + max(0, free) < polls_in_flight:
            continue  # a poll in flight counts on it: retired on a later pass
        retire.append((view, reason))
        healthy.remove(view)
        deleting += 1
    ready_idle = sum(1 for v in healthy if v.ready)
    # Room no poll in flight counts on: each poll beyond the ready warm pods may need a fresh pod's slot.
    room = (max_workers - busy - deleting - len(stuck) - creating - len(healthy)
            - max(0, polls_in_flight - ready_idle))
    create = max(0, min(target - len(healthy) - creating, room))

    vanished = [
        view for uid, view in memory.known.items()
        if uid not in current and uid not in memory.deleted and uid not in bound_uids and uid not in memory.reported
    ]
    for view, reason in retire:
        memory.deleted[view.uid] = now
        if reason in ("failed", "start_timeout"):
            memory.reported.add(view.uid)
    memory.reported.update(view.uid for view in vanished)
    memory.known = dict(current)
    for uid in [uid for uid, at in memory.deleted.items()
                if uid not in current and (now - at).total_seconds() > FORGET_DELETED_AFTER_SECONDS]:
        del memory.deleted[uid]
    memory.reported.intersection_update(set(current))
    return WarmPlan(create=create, retire=tuple(retire), vanished=tuple(vanished), stuck_terminating=tuple(stuck),
                    next_check_in=max(0.0, min(deadlines)) if deadlines else None)


def retire_message(view: WarmPodView, reason: RetireReason, *, startup_timeout_seconds: float) -> str:
    if reason == "failed":
        cause = view.cause or f"it ended ({view.phase})"
        return (f"warm worker pod {view.name} ended before any item was bound to it ({cause}); "
                "it is deleted and replaced")
    if reason == "start_timeout":
        cause = view.cause or "the pod was never scheduled or its container never started"
        return (f"warm worker pod {view.name} was not ready after {startup_timeout_seconds:g}s ({cause}); "
                "it is deleted and replaced, and no item was bound to it")
    if reason == "template":
        return f"warm worker pod {view.name} was made from an older pod template; replacing it"
    if reason == "aged":
        return f"warm worker pod {view.name} reached spec.warmMaxAgeSeconds idle; replacing it"
    return f"warm worker pod {view.name} is more than the pool needs (minWorkers, maxWorkers); deleting it"


def vanished_message(view: WarmPodView) -> str:
    return f"warm worker pod {view.name} disappeared before any item was bound to it; it is replaced"


def orphaned_warm_access(service_accounts: Iterable[Mapping[str, Any]], pod_names: Set[str], *, now: datetime,
                         grace_seconds: float) -> list[str]:
    """The warm pods whose ServiceAccount (and Role, RoleBinding: named alike) exists without the pod: names.

    Young ones are left alone: they are made just before their pod.
    """
    orphans = []
    for account in service_accounts:
        metadata: Mapping[str, Any] = account.get("metadata") or {}
        pod = (metadata.get("labels") or {}).get(LABEL_WARM_POD)
        if not pod or pod in pod_names:
            continue
        created = parse_time(metadata.get("creationTimestamp"))
        if created is not None and (now - created).total_seconds() < grace_seconds:
            continue
        orphans.append(str(pod))
    return orphans
