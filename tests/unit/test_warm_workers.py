"""Warm workers (``spec.minWorkers``): the pure decisions and manifests.

``domain.warm_workers`` (reading an unbound warm pod, choosing one for a claimed item, planning the
warm set), the warm part of ``domain.worker_manifests`` (the pod, its ServiceAccount/Role/RoleBinding,
its assignment Secret, the binding patches) and the warm cases of ``domain.dispatch`` and
``domain.worker_lifecycle``. Every manifest is checked with kubernetes-validate (strict) at the newest
Kubernetes version it knows.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes_validate
import pytest

from environments_operator.domain.dispatch import WorkerPodView, worker_counts, worker_pod_view
from environments_operator.domain.warm_workers import (
    FORGET_DELETED_AFTER_SECONDS,
    WarmMemory,
    WarmPlan,
    WarmPodView,
    choose_warm_pod,
    orphaned_warm_access,
    plan_warm,
    retire_message,
    vanished_message,
    warm_pod_view,
    warm_slots_taken,
    warm_target,
)
from environments_operator.domain.worker_lifecycle import orphaned_secrets, unreleased_pod_action
from environments_operator.domain.worker_manifests import (
    ANNOTATION_ASSIGNED,
    ANNOTATION_ENVIRONMENT_ID,
    ANNOTATION_SESSION_ID,
    ANNOTATION_TEMPLATE_HASH,
    ANNOTATION_WORK_ID,
    ANNOTATION_WORKER_POOL,
    ENV_ASSIGNMENT_SECRET,
    ENV_BASE_URL,
    ENV_MAX_IDLE,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    LABEL_WARM,
    LABEL_WARM_POD,
    LABEL_WORK_ID,
    LABEL_WORKER_POOL,
    MANAGED_BY,
    SCHEDULING_GATE,
    PoolIdentity,
    WorkAssignment,
    assigned_patch,
    bind_patch,
    build_assignment_secret,
    build_warm_access,
    build_warm_pod,
    label_value,
    pool_selector,
    template_hash,
    warm_pod_name,
)
from tests.unit.test_worker_manifests import TEMPLATES as FRESH_TEMPLATES

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
K8S_VERSION = kubernetes_validate.latest_version()
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
POOL = PoolIdentity(namespace="team-a", name="sandboxes", uid="6a1f0c1e-1111-4222-8333-944455556666")
WORK = WorkAssignment(
    work_id="work_01HZabcDEF9xyz", environment_id="env_01ABC", session_id="sesn_01XYZ",
    secret="eyJzZXNzaW9uc190b2tlbiI6InRvayJ9",
)
IMAGE = "ghcr.io/example/worker:1.0"
POD_NAME = "sandboxes-warm-abcde"
POD_UID = "0b9f5e2a-aaaa-4bbb-8ccc-dddddddddddd"
HASH = "0123456789abcdef"
STARTUP = 300.0
MAX_AGE = 3600.0
FOREIGN_ENV = ("ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_SECRET")


def validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def ts(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch applied to ``base`` (RFC 7386: None removes a key, a dict merges, others replace)."""
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


# ----- warm_pod_view --------------------------------------------------------------------------------


def warm_pod(
    *,
    phase: str | None = "Running",
    ready: str | None = "True",
    deleted_at: datetime | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An unbound warm pod as the apiserver returns it; ``ready`` is its Ready condition (None: absent)."""
    metadata: dict[str, Any] = {
        "name": POD_NAME, "namespace": POOL.namespace, "uid": POD_UID, "creationTimestamp": ts(T0),
        "labels": {LABEL_WORKER_POOL: POOL.name, LABEL_MANAGED_BY: MANAGED_BY, LABEL_WARM: "true", **(labels or {})},
        "annotations": {ANNOTATION_WORKER_POOL: POOL.name, ANNOTATION_TEMPLATE_HASH: HASH, **(annotations or {})},
    }
    if deleted_at is not None:
        metadata["deletionTimestamp"] = ts(deleted_at)
    pod_status: dict[str, Any] = dict(status or {})
    if phase is not None:
        pod_status["phase"] = phase
    if ready is not None:
        pod_status["conditions"] = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": ready}]
    return {"metadata": metadata, "spec": {}, "status": pod_status}


class TestWarmPodView:
    @pytest.mark.parametrize(("phase", "ready_condition", "ready"), [
        ("Running", "True", True),
        ("Running", None, True),          # no Ready condition reported: Running is enough
        ("Running", "False", False),      # readiness probe not passing yet
        ("Pending", "True", False),
        ("Pending", None, False),
        (None, None, False),              # no status yet: Pending
        ("Succeeded", None, False),
        ("Failed", "False", False),
        ("Unknown", "True", False),
    ])
    def test_ready_only_when_running_and_the_ready_condition_is_true_or_absent(
        self, phase: str | None, ready_condition: str | None, ready: bool,
    ) -> None:
        view = warm_pod_view(warm_pod(phase=phase, ready=ready_condition))
        assert view is not None
        assert view.ready is ready
        assert view.phase == (phase or "Pending")
        assert view.finished is (phase in ("Succeeded", "Failed"))

    def test_the_facts_it_reads(self) -> None:
        view = warm_pod_view(warm_pod())
        assert view == WarmPodView(
            name=POD_NAME, namespace=POOL.namespace, pool=POOL.name, uid=POD_UID, phase="Running", ready=True,
            created_at=T0, deleting=False, deletion_deadline=None, template_hash=HASH, cause=None)

    def test_a_pod_being_deleted_is_not_ready_and_knows_its_deadline(self) -> None:
        view = warm_pod_view(warm_pod(deleted_at=T0 + timedelta(seconds=30)))
        assert view is not None
        assert (view.ready, view.deleting, view.deletion_deadline) == (False, True, T0 + timedelta(seconds=30))
        assert not view.stuck_terminating(T0 + timedelta(seconds=30))
        assert view.stuck_terminating(T0 + timedelta(seconds=31))

    def test_why_a_pod_is_not_starting_is_its_cause(self) -> None:
        status = {"containerStatuses": [{"name": "worker", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": "pull access denied"}}}]}
        view = warm_pod_view(warm_pod(phase="Pending", ready="False", status=status))
        assert view is not None and view.cause == "container worker: ImagePullBackOff: pull access denied"

    def test_the_pool_is_read_from_the_label_without_the_annotation(self) -> None:
        pod = warm_pod()
        del pod["metadata"]["annotations"][ANNOTATION_WORKER_POOL]
        view = warm_pod_view(pod)
        assert view is not None and view.pool == POOL.name

    @pytest.mark.parametrize("change", [
        {"annotations": {ANNOTATION_WORK_ID: "work_1"}},       # bound: an item's pod now
        {"labels": {LABEL_WORK_ID: "work_1"}},
        {"labels": {LABEL_WARM: "false"}},
        {"labels": {LABEL_WARM: "True"}},
        {"drop_label": LABEL_WARM},                            # a fresh (non-warm) pod
        {"drop_label": LABEL_WORKER_POOL, "drop_annotation": ANNOTATION_WORKER_POOL},
        {"drop_name": True},
    ], ids=["work-id annotation", "work-id label", "warm=false", "warm=True", "no warm label", "no pool", "no name"])
    def test_any_other_pod_is_none(self, change: dict[str, Any]) -> None:
        pod = warm_pod(labels=change.get("labels"), annotations=change.get("annotations"))
        pod["metadata"]["labels"].pop(change.get("drop_label", ""), None)
        pod["metadata"]["annotations"].pop(change.get("drop_annotation", ""), None)
        if change.get("drop_name"):
            del pod["metadata"]["name"]
        assert warm_pod_view(pod) is None

    def test_a_built_warm_pod_reads_back_and_is_no_item_pod(self) -> None:
        template = {"spec": {"containers": [{"name": "worker", "image": "example/own:2"}]}}
        pod = build_warm_pod(POOL, POD_NAME, template=template, default_image=IMAGE, base_url=None,
                             max_idle_seconds=60)
        view = warm_pod_view(pod)
        assert view is not None
        assert (view.name, view.pool, view.phase, view.ready) == (POD_NAME, POOL.name, "Pending", False)
        assert view.template_hash == template_hash(template)
        assert worker_pod_view(pod) is None


class TestWarmSlotsTaken:
    @pytest.mark.parametrize(("views", "taken"), [
        ([], 0),
        ([dict(ready=True)], 0),                                           # where the next claim goes
        ([dict(ready=False)], 1),                                          # starting
        ([dict(ready=False, deleting=True, deadline=30)], 1),              # being deleted, not gone yet
        ([dict(ready=False, deleting=True, deadline=-1)], 0),              # stuck terminating: node gone
        ([dict(ready=False, phase="Failed")], 0),
        ([dict(ready=False, phase="Succeeded")], 0),
        ([dict(ready=True), dict(ready=False), dict(ready=False)], 2),
    ])
    def test_not_ready_unfinished_pods_take_a_slot(self, views: list[dict[str, Any]], taken: int) -> None:
        built = [view(f"w{i}", **fields) for i, fields in enumerate(views)]
        assert warm_slots_taken(built, T0) == taken


# ----- choose_warm_pod ------------------------------------------------------------------------------


def view(
    name: str,
    *,
    ready: bool = True,
    age: float | None = 10.0,
    phase: str | None = None,
    deleting: bool = False,
    deadline: float | None = None,
    hash_: str | None = HASH,
) -> WarmPodView:
    """A warm pod view, ``age`` seconds old at T0; ``deadline`` seconds from T0 ends its grace period."""
    return WarmPodView(
        name=name, namespace=POOL.namespace, pool=POOL.name, uid=f"uid-{name}",
        phase=phase or ("Running" if ready else "Pending"), ready=ready,
        created_at=None if age is None else T0 - timedelta(seconds=age), deleting=deleting,
        deletion_deadline=None if deadline is None else T0 + timedelta(seconds=deadline), template_hash=hash_)


class TestChooseWarmPod:
    @pytest.mark.parametrize(("views", "reserved", "chosen"), [
        ([], set(), None),
        ([view("a", ready=False)], set(), None),
        ([view("a", age=10), view("b", age=50), view("c", age=30)], set(), "b"),      # the oldest
        ([view("a", age=10), view("b", age=50)], {"b"}, "a"),                         # b is being bound
        ([view("a", age=10), view("b", age=50)], {"a", "b"}, None),
        ([view("a", age=10), view("b", age=50, ready=False), view("c", age=90, ready=False, deleting=True)],
         set(), "a"),
        ([view("a", age=10), view("b", age=50, deleting=True)], set(), "a"),          # ready but being deleted
        ([view("a", age=None), view("b", age=5)], set(), "b"),                        # unknown age last
        ([view("b", age=5), view("a", age=5)], set(), "a"),                           # a tie: by name
    ])
    def test_the_oldest_ready_pod_not_reserved_nor_deleting(
        self, views: list[WarmPodView], reserved: set[str], chosen: str | None,
    ) -> None:
        result = choose_warm_pod(views, reserved)
        assert (result.name if result else None) == chosen


# ----- plan_warm ------------------------------------------------------------------------------------


def plan(views: list[WarmPodView], memory: WarmMemory | None = None, **overrides: Any) -> WarmPlan:
    arguments: dict[str, Any] = {
        "now": T0, "min_workers": 2, "max_workers": 5, "busy": 0, "polls_in_flight": 0, "bound_uids": set(),
        "reserved": set(), "startup_timeout_seconds": STARTUP, "max_age_seconds": MAX_AGE, "template_hash": HASH,
    }
    arguments.update(overrides)
    # As the pool does: a pod an item is being bound to is that item's (its slot is in busy), not idle.
    reserved = arguments.pop("reserved")
    arguments["busy"] += sum(1 for v in views if v.name in reserved)
    views = [v for v in views if v.name not in reserved]
    return plan_warm(views, memory if memory is not None else WarmMemory(), **arguments)


def retired(result: WarmPlan) -> dict[str, str]:
    return {v.name: reason for v, reason in result.retire}


class TestWarmTarget:
    @pytest.mark.parametrize(("min_workers", "max_workers", "busy", "target"), [
        (2, 5, 0, 2), (2, 5, 4, 1), (2, 5, 5, 0), (2, 5, 7, 0), (0, 5, 0, 0), (5, 5, 0, 5), (3, 2, 0, 2),
    ])
    def test_min_workers_within_what_items_leave(self, min_workers: int, max_workers: int, busy: int,
                                                 target: int) -> None:
        assert warm_target(min_workers=min_workers, max_workers=max_workers, busy=busy) == target


class TestPlanCreation:
    @pytest.mark.parametrize(("views", "settings", "create"), [
        ([], dict(min_workers=2, max_workers=5), 2),
        ([], dict(min_workers=0, max_workers=5), 0),
        ([], dict(min_workers=2, max_workers=2, busy=1), 1),        # min(minWorkers, maxWorkers - busy)
        ([], dict(min_workers=2, max_workers=2, busy=2), 0),
        ([], dict(min_workers=2, max_workers=2, busy=3), 0),
        ([view("a")], dict(min_workers=3), 2),
        ([view("a"), view("b", ready=False)], dict(min_workers=3), 1),   # a starting one counts as warm
        ([view("a"), view("b", ready=False)], dict(min_workers=2), 0),
        # Polls in flight: each beyond the ready idle warm pods may need a fresh pod's slot.
        ([], dict(min_workers=2, max_workers=3, polls_in_flight=1), 2),
        ([], dict(min_workers=2, max_workers=3, polls_in_flight=2), 1),
        ([], dict(min_workers=2, max_workers=3, polls_in_flight=3), 0),
        ([view("a")], dict(min_workers=2, max_workers=3, polls_in_flight=1), 1),   # a covers the poll
        ([view("a")], dict(min_workers=2, max_workers=3, polls_in_flight=2), 1),
        ([view("a")], dict(min_workers=2, max_workers=3, polls_in_flight=3), 0),
        ([view("a", ready=False)], dict(min_workers=2, max_workers=3, polls_in_flight=2), 0),   # starting: no cover
        # a is being bound (an item's pod soon): the poll in flight may need a slot of its own
        ([view("a")], dict(min_workers=2, max_workers=3, polls_in_flight=1, reserved={"a"}), 1),
        ([view("a")], dict(min_workers=2, max_workers=2, polls_in_flight=1, reserved={"a"}), 0),
        # Pods being deleted take room, and are not warm.
        ([view("d", ready=False, deleting=True, deadline=30)], dict(min_workers=2, max_workers=3), 2),
        ([view("d", ready=False, deleting=True, deadline=30)], dict(min_workers=2, max_workers=2), 1),
        ([view("d", ready=False, deleting=True, deadline=30), view("e", ready=False, deleting=True, deadline=30)],
         dict(min_workers=2, max_workers=2), 0),
        # A stuck one (its node is gone) is force-deleted; until gone it is not counted on.
        ([view("s", ready=False, deleting=True, deadline=-1)], dict(min_workers=2, max_workers=2), 1),
        # A finished pod being deleted takes nothing.
        ([view("f", ready=False, phase="Failed", deleting=True, deadline=30)], dict(min_workers=2, max_workers=2),
         2),
    ])
    def test_creates_up_to_the_target_within_the_room(
        self, views: list[WarmPodView], settings: dict[str, Any], create: int,
    ) -> None:
        assert plan(views, **settings).create == create

    def test_a_failed_pod_is_replaced_at_once_it_takes_no_slot(self) -> None:
        memory = WarmMemory()
        first = plan([view("a", ready=False, phase="Failed"), view("b")], memory, min_workers=2, max_workers=2)
        assert (retired(first), first.create) == ({"a": "failed"}, 1)
        second = plan([view("a", ready=False, phase="Failed", deleting=True, deadline=30), view("b"),
                       view("c", ready=False, age=0)], memory, now=T0 + timedelta(seconds=1),
                      min_workers=2, max_workers=2)
        assert (second.retire, second.create) == ((), 0)

    @pytest.mark.parametrize("retiring", [
        view("a", hash_="old"), view("a", age=MAX_AGE), view("a", ready=False, age=STARTUP),
    ], ids=["template", "aged", "start_timeout"])
    def test_an_unfinished_retired_pod_is_replaced_only_within_the_room_it_leaves(
        self, retiring: WarmPodView,
    ) -> None:
        memory = WarmMemory()
        first = plan([retiring, view("b")], memory, min_workers=2, max_workers=2)
        assert [v.name for v, _ in first.retire] == ["a"]
        terminating = dataclasses.replace(retiring, ready=False, deleting=True,
                                          deletion_deadline=T0 + timedelta(seconds=30))
        replacements = [view(f"new{i}", ready=False, age=0) for i in range(first.create)]
        second = plan([terminating, view("b"), *replacements], memory, now=T0 + timedelta(seconds=1),
                      min_workers=2, max_workers=2)
        assert second.retire == ()                     # nothing created last pass is deleted now
        assert 1 + 1 + len(replacements) <= 2          # a (terminating), b and replacements within maxWorkers


class TestPlanExcess:
    @pytest.mark.parametrize(("views", "settings", "retire"), [
        # minWorkers lowered: the youngest ready one goes
        ([view("old", age=500), view("young", age=5)], dict(min_workers=1), {"young": "excess"}),
        ([view("a", age=500), view("b", age=50), view("c", age=5)], dict(min_workers=1),
         {"b": "excess", "c": "excess"}),
        ([view("a", age=500), view("b", age=50)], dict(min_workers=0), {"a": "excess", "b": "excess"}),
        # not-ready ones first, even when older
        ([view("ready", age=5), view("starting", age=200, ready=False)], dict(min_workers=1),
         {"starting": "excess"}),
        ([view("r1", age=5), view("s1", age=100, ready=False), view("s2", age=1, ready=False)],
         dict(min_workers=1), {"s1": "excess", "s2": "excess"}),
        # items took the room: maxWorkers - busy is the target
        ([view("a", age=500), view("b", age=5)], dict(min_workers=2, max_workers=3, busy=2), {"b": "excess"}),
        # pods being deleted take room too
        ([view("a", age=500), view("b", age=5), view("d", ready=False, deleting=True, deadline=30)],
         dict(min_workers=2, max_workers=2), {"b": "excess"}),
        # never one being bound
        ([view("a", age=500), view("b", age=5)], dict(min_workers=1, reserved={"b"}), {}),  # b is its item's now
        ([view("a", age=500), view("b", age=5)], dict(min_workers=0, reserved={"a", "b"}), {}),
        ([view("a", age=500), view("b", age=5)], dict(min_workers=0, reserved={"a"}), {"b": "excess"}),
        ([view("a", age=500)], dict(min_workers=1), {}),
    ])
    def test_excess_pods_are_retired_not_ready_first_then_youngest(
        self, views: list[WarmPodView], settings: dict[str, Any], retire: dict[str, str],
    ) -> None:
        result = plan(views, **settings)
        assert retired(result) == retire
        assert result.create == 0


class TestPlanRetireReasons:
    @pytest.mark.parametrize(("pod", "settings", "reason"), [
        (view("w", ready=False, phase="Failed"), {}, "failed"),
        (view("w", ready=False, phase="Succeeded"), {}, "failed"),
        (view("w", ready=False, age=STARTUP), {}, "start_timeout"),
        (view("w", ready=False, age=STARTUP + 100), {}, "start_timeout"),
        (view("w", ready=False, age=STARTUP - 1), {}, None),
        (view("w", ready=False, phase="Running", age=STARTUP), {}, "start_timeout"),   # never passed readiness
        (view("w", hash_="other"), {}, "template"),
        (view("w", hash_=None), {}, None),                     # made before template hashes: kept
        (view("w", ready=False, hash_="other"), {}, None),     # only a ready one is refreshed
        (view("w", age=MAX_AGE), {}, "aged"),
        (view("w", age=MAX_AGE - 1), {}, None),
        (view("w", age=10 * MAX_AGE), dict(max_age_seconds=0), None),       # 0: never aged
        (view("w", age=100), dict(max_age_seconds=100), "aged"),
        (view("w", age=MAX_AGE, hash_="other"), {}, "template"),
    ])
    def test_reason(self, pod: WarmPodView, settings: dict[str, Any], reason: str | None) -> None:
        result = plan([pod], min_workers=1, **settings)
        assert retired(result) == ({"w": reason} if reason else {})

    @pytest.mark.parametrize("pod", [
        view("w", ready=False, phase="Failed"),
        view("w", ready=False, age=10 * STARTUP),
        view("w", hash_="other"),
        view("w", age=10 * MAX_AGE),
    ], ids=["failed", "start timeout", "template", "aged"])
    def test_a_reserved_pod_is_never_retired(self, pod: WarmPodView) -> None:
        for min_workers in (0, 1):
            assert plan([pod], min_workers=min_workers, reserved={"w"}).retire == ()

    def test_retired_pods_are_remembered_and_failures_reported(self) -> None:
        memory = WarmMemory()
        pods = [view("f", ready=False, phase="Failed"), view("t", ready=False, age=STARTUP),
                view("o", hash_="other"), view("x", age=5)]
        result = plan(pods, memory, min_workers=0)
        assert retired(result) == {"f": "failed", "t": "start_timeout", "o": "template", "x": "excess"}
        assert memory.deleted == {"uid-f": T0, "uid-t": T0, "uid-o": T0, "uid-x": T0}
        assert memory.reported == {"uid-f", "uid-t"}

    def test_a_pod_we_deleted_is_not_retired_again_and_counts_as_being_deleted(self) -> None:
        memory = WarmMemory()
        pods = [view("a", hash_="other"), view("b")]
        assert retired(plan(pods, memory, min_workers=2, max_workers=2)) == {"a": "template"}
        later = plan(pods, memory, now=T0 + timedelta(seconds=1), min_workers=2, max_workers=2)
        assert later.retire == ()
        assert later.create == 0         # a still takes its slot
        assert plan(pods, memory, now=T0 + timedelta(seconds=1), min_workers=2, max_workers=3).create == 1


class TestPlanMemory:
    def test_a_known_pod_gone_unexplained_vanished_once(self) -> None:
        memory = WarmMemory()
        plan([view("a"), view("b")], memory)
        assert set(memory.known) == {"uid-a", "uid-b"}
        result = plan([view("b")], memory)
        assert [v.name for v in result.vanished] == ["a"]
        assert set(memory.known) == {"uid-b"}
        assert plan([view("b")], memory).vanished == ()

    @pytest.mark.parametrize("explained", ["deleted by us", "bound"])
    def test_a_pod_gone_because_we_deleted_or_bound_it_did_not_vanish(self, explained: str) -> None:
        memory = WarmMemory()
        plan([view("a", hash_="other" if explained == "deleted by us" else HASH)], memory, min_workers=1)
        bound = {"uid-a"} if explained == "bound" else set()
        assert plan([], memory, bound_uids=bound).vanished == ()

    def test_a_failed_pod_we_reported_and_deleted_does_not_vanish_too(self) -> None:
        memory = WarmMemory()
        failed = view("a", ready=False, phase="Failed")
        assert retired(plan([failed], memory)) == {"a": "failed"}
        assert plan([failed], memory).retire == ()                # still listed: not reported again
        assert plan([], memory).vanished == ()

    def test_a_pod_deleted_by_someone_else_vanished(self) -> None:
        memory = WarmMemory()
        plan([view("a")], memory)
        plan([view("a", ready=False, deleting=True, deadline=30)], memory)
        assert [v.name for v in plan([], memory).vanished] == ["a"]

    @pytest.mark.parametrize(("after", "still_listed", "remembered"), [
        (FORGET_DELETED_AFTER_SECONDS, False, True),
        (FORGET_DELETED_AFTER_SECONDS + 1, False, False),
        (10 * FORGET_DELETED_AFTER_SECONDS, True, True),      # still there: still ours to wait for
    ])
    def test_deleted_pods_are_forgotten_once_gone_for_long(self, after: float, still_listed: bool,
                                                           remembered: bool) -> None:
        memory = WarmMemory(deleted={"uid-a": T0})
        views = [view("a", ready=False, deleting=True, deadline=after + 30)] if still_listed else []
        plan(views, memory, now=T0 + timedelta(seconds=after))
        assert ("uid-a" in memory.deleted) is remembered

    def test_reports_are_forgotten_with_their_pods(self) -> None:
        memory = WarmMemory(reported={"uid-a", "uid-b"})
        plan([view("b")], memory)
        assert memory.reported == {"uid-b"}


class TestPlanStuckTerminating:
    @pytest.mark.parametrize(("pod", "stuck"), [
        (view("d", ready=False, deleting=True, deadline=-1), True),
        (view("d", ready=False, deleting=True, deadline=0), False),     # the grace period ends now
        (view("d", ready=False, deleting=True, deadline=30), False),
        (view("d", ready=False, phase="Failed", deleting=True, deadline=-1), True),
        (view("d", ready=False, deleting=True), False),                 # no deadline known
    ])
    def test_deleted_and_past_the_grace_period_is_force_deleted(self, pod: WarmPodView, stuck: bool) -> None:
        result = plan([pod])
        assert [v.name for v in result.stuck_terminating] == (["d"] if stuck else [])
        assert result.retire == ()


class TestPlanNextCheck:
    @pytest.mark.parametrize(("views", "settings", "check_in"), [
        ([], {}, None),
        ([view("s", ready=False, age=100)], {}, STARTUP - 100),                     # its startup timeout
        ([view("r", age=100)], {}, MAX_AGE - 100),                                  # its max age
        ([view("r", age=100), view("s", ready=False, age=250)], {}, STARTUP - 250),
        ([view("r", age=3500), view("s", ready=False, age=10)], {}, 100.0),
        ([view("d", ready=False, deleting=True, deadline=20), view("s", ready=False, age=100)], {}, 20.001),
        ([view("r", age=100)], dict(reserved={"r"}), None),                         # being bound: not ours
        ([view("d", ready=False, deleting=True, deadline=-1)], {}, None),           # force-deleted now
    ])
    def test_the_nearest_deadline(self, views: list[WarmPodView], settings: dict[str, Any],
                                  check_in: float | None) -> None:
        result = plan(views, min_workers=len(views), **settings)
        assert result.next_check_in == (pytest.approx(check_in) if check_in is not None else None)

    # max age 0: a ready pod has no deadline of its own (it used to get startup timeout - age, negative: 0 s naps)
    def test_a_ready_pod_without_max_age_has_no_deadline(self) -> None:
        assert plan([view("r", age=STARTUP + 60)], min_workers=1, max_age_seconds=0).next_check_in is None



class TestMessages:
    @pytest.mark.parametrize(("pod", "reason", "mentions"), [
        (dataclasses.replace(view("w", ready=False, phase="Failed"), cause="container worker terminated: Error "
                             "(exit code 3)"), "failed", ["ended before any item", "(exit code 3)"]),
        (view("w", ready=False, phase="Failed"), "failed", ["it ended (Failed)"]),
        (view("w", ready=False), "start_timeout", ["not ready after 300s", "never scheduled", "no item was bound"]),
        (dataclasses.replace(view("w", ready=False), cause="Unschedulable: 0/3 nodes"), "start_timeout",
         ["Unschedulable: 0/3 nodes"]),
        (view("w"), "template", ["older pod template"]),
        (view("w"), "aged", ["warmMaxAgeSeconds"]),
        (view("w"), "excess", ["minWorkers"]),
    ])
    def test_retire_messages_name_the_pod_and_why(self, pod: WarmPodView, reason: Any, mentions: list[str]) -> None:
        message = retire_message(pod, reason, startup_timeout_seconds=STARTUP)
        for text in ["warm worker pod w", *mentions]:
            assert text in message

    def test_vanished_message(self) -> None:
        assert "warm worker pod w disappeared" in vanished_message(view("w"))


# ----- manifests ------------------------------------------------------------------------------------


WARM_TEMPLATES: dict[str, dict[str, Any]] = {
    # The fresh pods' templates serve warm pods too; the last one is a warm pod's own.
    **{name: FRESH_TEMPLATES[name] for name in ("empty", "image and resources", "sidecar and init container")},
    "own service account and labels": {
        "metadata": {"labels": {"team": "a", LABEL_WARM: "false"}, "annotations": {"note": "x"}},
        "spec": {
            "serviceAccountName": "agent", "serviceAccount": "agent", "automountServiceAccountToken": False,
            "containers": [{"name": "worker", "env": [
                {"name": "TEAM", "value": "a"}, {"name": "ANTHROPIC_WORK_ID", "value": "forged"},
                {"name": ENV_ASSIGNMENT_SECRET, "value": "someone-elses"}]}],
        },
    },
}


def warm(template: dict[str, Any] | None = None, *, name: str = POD_NAME, pool: PoolIdentity = POOL,
         base_url: str | None = "http://api.test") -> dict[str, Any]:
    return build_warm_pod(pool, name, template=template or {}, default_image=IMAGE, base_url=base_url,
                          max_idle_seconds=45)


def worker_container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["spec"]["containers"]
    return next((c for c in containers if c["name"] == "worker"), containers[0])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


class TestWarmPodName:
    @pytest.mark.parametrize("pool_name", [
        "sandboxes", "a", "a" * 253, "My.Pool_Name", "a.b.c", "---", "x-" * 40, "pool-" + "9" * 60,
        "9lives", "ÄÖÜ", "team.a" + "-" * 36 + "b",
    ])
    def test_a_valid_dns_1123_label_of_at_most_63_characters(self, pool_name: str) -> None:
        name = warm_pod_name(pool_name, "k3x9q")
        assert DNS_1123_LABEL.match(name), name
        assert len(name) <= 63
        assert name.endswith("-warm-k3x9q")

    def test_names_the_pool(self) -> None:
        assert warm_pod_name("sandboxes", "abcde") == "sandboxes-warm-abcde"

    def test_a_long_pool_name_still_gives_a_valid_pod(self) -> None:
        pool = PoolIdentity(namespace="team-a", name="p" * 253, uid=POOL.uid)
        name = warm_pod_name(pool.name, "abcde")
        validate(warm(pool=pool, name=name))
        for manifest in build_warm_access(pool, name):
            validate(manifest)


class TestTemplateHash:
    def test_stable_and_independent_of_key_order(self) -> None:
        one = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "w", "image": "x"}]}}
        two = {"spec": {"containers": [{"image": "x", "name": "w"}]}, "metadata": {"labels": {"b": "2", "a": "1"}}}
        assert template_hash(one) == template_hash(copy.deepcopy(one)) == template_hash(two)
        assert re.fullmatch(r"[0-9a-f]{16}", template_hash(one))

    @pytest.mark.parametrize("other", [
        {"spec": {"containers": [{"name": "w", "image": "y"}]}},
        {"spec": {"containers": [{"name": "w", "image": "x"}], "nodeSelector": {"pool": "gpu"}}},
        {},
    ])
    def test_a_changed_template_changes_it(self, other: dict[str, Any]) -> None:
        assert template_hash(other) != template_hash({"spec": {"containers": [{"name": "w", "image": "x"}]}})


class TestWarmPod:
    @pytest.mark.parametrize("name", list(WARM_TEMPLATES))
    def test_every_built_warm_pod_is_a_valid_pod(self, name: str) -> None:
        validate(warm(WARM_TEMPLATES[name]))

    @pytest.mark.parametrize("name", list(WARM_TEMPLATES))
    def test_runs_as_its_own_service_account_with_its_token(self, name: str) -> None:
        spec = warm(WARM_TEMPLATES[name])["spec"]
        assert spec["serviceAccountName"] == POD_NAME
        assert "serviceAccount" not in spec
        assert spec["automountServiceAccountToken"] is True

    @pytest.mark.parametrize("name", list(WARM_TEMPLATES))
    def test_starts_now_with_no_scheduling_gate(self, name: str) -> None:
        spec = warm(WARM_TEMPLATES[name])["spec"]
        assert SCHEDULING_GATE not in [g["name"] for g in spec.get("schedulingGates") or []]
        assert "schedulingGates" not in spec

    @pytest.mark.parametrize("name", list(WARM_TEMPLATES))
    def test_its_worker_waits_for_the_assignment_and_holds_no_item_or_secret(self, name: str) -> None:
        pod = warm(WARM_TEMPLATES[name])
        env = env_of(worker_container(pod))
        assert env[ENV_ASSIGNMENT_SECRET] == POD_NAME
        assert env[ENV_BASE_URL] == "http://api.test"
        assert env[ENV_MAX_IDLE] == "45"
        for variable in FOREIGN_ENV:
            assert variable not in env
        text = json.dumps(pod)
        assert "secretKeyRef" not in text
        assert "forged" not in text and "someone-elses" not in text
        for container in [*pod["spec"]["containers"], *pod["spec"].get("initContainers", [])]:
            if container is not worker_container(pod):
                assert ENV_ASSIGNMENT_SECRET not in env_of(container)

    def test_base_url_is_left_to_the_sdk_default_when_unset(self) -> None:
        assert ENV_BASE_URL not in env_of(worker_container(warm(base_url=None)))

    def test_labels_annotations_and_owner(self) -> None:
        template = WARM_TEMPLATES["own service account and labels"]
        metadata = warm(template)["metadata"]
        assert metadata["name"] == POD_NAME and metadata["namespace"] == POOL.namespace
        assert metadata["labels"] == {"team": "a", LABEL_WARM: "true", LABEL_WORKER_POOL: POOL.name,
                                      LABEL_MANAGED_BY: MANAGED_BY}
        assert metadata["annotations"] == {"note": "x", ANNOTATION_WORKER_POOL: POOL.name,
                                           ANNOTATION_TEMPLATE_HASH: template_hash(template)}
        assert LABEL_WORK_ID not in metadata["labels"] and ANNOTATION_WORK_ID not in metadata["annotations"]
        (owner,) = metadata["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "WorkerPool", POOL.name, POOL.uid, True)

    def test_keeps_the_template_otherwise_and_does_not_mutate_it(self) -> None:
        template = WARM_TEMPLATES["own service account and labels"]
        before = copy.deepcopy(template)
        pod = warm(template)
        assert template == before
        assert env_of(worker_container(pod))["TEAM"] == "a"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    def test_the_pool_selector_matches_the_pod_and_its_access_objects(self) -> None:
        for manifest in [warm(), *build_warm_access(POOL, POD_NAME)]:
            labels = manifest["metadata"]["labels"]
            for requirement in pool_selector(POOL.name).split(","):
                key, value = requirement.split("=")
                assert labels[key] == value, manifest["kind"]


class TestWarmAccess:
    def test_three_valid_objects_named_after_the_pod(self) -> None:
        objects = build_warm_access(POOL, POD_NAME)
        assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding"]
        for manifest in objects:
            validate(manifest)
            metadata = manifest["metadata"]
            assert (metadata["name"], metadata["namespace"]) == (POD_NAME, POOL.namespace)
            assert metadata["labels"][LABEL_WARM_POD] == POD_NAME
            (owner,) = metadata["ownerReferences"]
            assert (owner["kind"], owner["uid"]) == ("WorkerPool", POOL.uid)

    def test_the_role_can_only_get_and_watch_the_pods_own_assignment(self) -> None:
        _, role, _ = build_warm_access(POOL, POD_NAME)
        (rule,) = role["rules"]
        assert rule["apiGroups"] == [""]
        assert rule["resources"] == ["secrets"]
        assert rule["resourceNames"] == [POD_NAME]
        assert sorted(rule["verbs"]) == ["get", "watch"]
        assert set(rule) == {"apiGroups", "resources", "resourceNames", "verbs"}

    def test_the_binding_grants_that_role_to_that_service_account_only(self) -> None:
        _, _, binding = build_warm_access(POOL, POD_NAME)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": POD_NAME, "namespace": POOL.namespace}]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": POD_NAME}


class TestAssignment:
    def secret(self, work: WorkAssignment = WORK) -> dict[str, Any]:
        return build_assignment_secret(POOL, work, pod_name=POD_NAME, pod_uid=POD_UID)

    def test_valid_immutable_and_named_after_the_pod(self) -> None:
        secret = self.secret()
        validate(secret)
        assert secret["immutable"] is True and secret["type"] == "Opaque"
        assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (POD_NAME, POOL.namespace)

    def test_holds_exactly_the_four_values(self) -> None:
        data = self.secret()["data"]
        decoded = {key: base64.b64decode(value).decode("utf-8") for key, value in data.items()}
        assert decoded == {"work-id": WORK.work_id, "environment-id": WORK.environment_id,
                           "session-id": WORK.session_id, "work-secret": WORK.secret}

    def test_owned_by_the_pod(self) -> None:
        (owner,) = self.secret()["metadata"]["ownerReferences"]
        assert (owner["apiVersion"], owner["kind"], owner["name"], owner["uid"]) == ("v1", "Pod", POD_NAME, POD_UID)

    def test_labels_tie_it_to_its_item_pool_and_pod(self) -> None:
        metadata = self.secret()["metadata"]
        assert metadata["labels"][LABEL_WARM_POD] == POD_NAME
        assert metadata["labels"][LABEL_WORK_ID] == WORK.work_id
        assert metadata["annotations"][ANNOTATION_WORK_ID] == WORK.work_id
        for requirement in pool_selector(POOL.name).split(","):
            key, value = requirement.split("=")
            assert metadata["labels"][key] == value

    def test_the_secret_value_shows_nowhere_but_its_data(self) -> None:
        secret = self.secret()
        encoded = secret["data"]["work-secret"]
        assert WORK.secret not in repr(secret)
        assert WORK.secret not in json.dumps(secret)
        assert WORK.secret not in repr(WORK)
        assert encoded not in json.dumps(secret["metadata"])
        assert WORK.secret not in json.dumps(secret["metadata"])

    def test_long_ids_still_give_a_valid_secret(self) -> None:
        work = WorkAssignment(work_id="work_" + "X" * 120, environment_id="env_1", session_id="sesn " * 20,
                              secret="s")
        validate(self.secret(work))

    def test_an_assignment_is_swept_with_its_pod(self) -> None:
        secret = self.secret()
        assert orphaned_secrets([secret], {POD_NAME}, set(), now=T0, grace_seconds=60) == []
        assert orphaned_secrets([secret], set(), set(), now=T0, grace_seconds=60) == [POD_NAME]
        assert orphaned_secrets([secret], set(), {WORK.work_id}, now=T0, grace_seconds=60) == []


class TestBinding:
    def test_bind_patch_gives_the_per_item_labels_and_annotations(self) -> None:
        assert bind_patch(POOL, WORK) == {"metadata": {
            "labels": {LABEL_WORK_ID: WORK.work_id, LABEL_SESSION_ID: WORK.session_id},
            "annotations": {ANNOTATION_WORK_ID: WORK.work_id, ANNOTATION_SESSION_ID: WORK.session_id,
                            ANNOTATION_ENVIRONMENT_ID: WORK.environment_id, ANNOTATION_WORKER_POOL: POOL.name},
        }}

    def test_bind_patch_hashes_ids_that_are_no_label_values(self) -> None:
        work = WorkAssignment(work_id="w" * 80, environment_id="env_1", session_id="has space",
                              secret="c2VjcmV0LXRva2Vu")
        patch = bind_patch(POOL, work)
        assert patch["metadata"]["labels"] == {LABEL_WORK_ID: label_value(work.work_id),
                                               LABEL_SESSION_ID: label_value(work.session_id)}
        assert patch["metadata"]["annotations"][ANNOTATION_WORK_ID] == work.work_id
        assert work.secret not in json.dumps(patch)

    def test_assigned_patch(self) -> None:
        assert assigned_patch() == {"metadata": {"annotations": {ANNOTATION_ASSIGNED: "true"}}}

    def test_a_bound_warm_pod_is_an_item_pod_gated_until_assigned(self) -> None:
        pod = warm()
        pod["metadata"]["uid"] = POD_UID
        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        bound = merged(pod, bind_patch(POOL, WORK))
        assert warm_pod_view(bound) is None
        item_view = worker_pod_view(bound)
        assert item_view is not None
        assert (item_view.name, item_view.work_id, item_view.session_id, item_view.environment_id) == (
            POD_NAME, WORK.work_id, WORK.session_id, WORK.environment_id)
        assert (item_view.warm, item_view.assigned, item_view.gated) == (True, False, True)
        assigned = worker_pod_view(merged(bound, assigned_patch()))
        assert assigned is not None
        assert (assigned.warm, assigned.assigned, assigned.gated) == (True, True, False)

    @pytest.mark.parametrize(("gates", "warm_", "assigned", "gated"), [
        ((), False, False, False),                      # a fresh pod, released
        ((SCHEDULING_GATE,), False, False, True),       # a fresh pod, not acknowledged
        (("other",), False, False, False),
        ((), True, False, True),                        # a bound warm pod, assignment not written
        ((), True, True, False),
        (("other",), True, True, False),
        ((SCHEDULING_GATE,), True, True, True),
        ((), False, True, False),                       # "assigned" means nothing on a fresh pod
    ])
    def test_gated(self, gates: tuple[str, ...], warm_: bool, assigned: bool, gated: bool) -> None:
        pod = WorkerPodView(name=POD_NAME, namespace=POOL.namespace, pool=POOL.name, work_id=WORK.work_id,
                            phase="Running", scheduling_gates=gates, warm=warm_, assigned=assigned)
        assert pod.gated is gated

    @pytest.mark.parametrize(("state", "age", "warm_", "action"), [
        ("active", 5, True, "release"),     # its worker heartbeats: the assignment was written
        ("active", 5, False, "delete"),     # a fresh pod's item held by another worker
        ("starting", 5, True, "release"),
        ("starting", 5, False, "release"),
        ("queued", 5, True, "wait"),
        ("queued", 500, True, "delete"),
        ("unknown", 500, True, "wait"),
        ("stopped", 5, True, "delete"),
        (None, 5, True, "delete"),
    ])
    def test_unreleased_pod_action(self, state: str | None, age: float, warm_: bool, action: str) -> None:
        assert unreleased_pod_action(state, age_seconds=age, startup_timeout_seconds=60, warm=warm_) == action


def test_worker_counts_count_ready_warm_pods_as_warm_and_starting_ones_as_starting() -> None:
    warm_views = [view("r"), view("s", ready=False), view("d", ready=False, deleting=True, deadline=30),
                  view("f", ready=False, phase="Failed")]
    counts = worker_counts([], warm_views)
    assert (counts.warm, counts.starting, counts.running, counts.failed) == (1, 1, 0, 0)


class TestFailedDeletes:
    def test_a_pod_whose_delete_failed_is_retired_again(self) -> None:
        """Deleted by us, yet no deletionTimestamp long after: the delete failed, and the pod is decided afresh."""
        memory = WarmMemory()
        memory.deleted["uid-a"] = T0 - timedelta(seconds=31)
        result = plan([view("a", hash_="old")], memory)
        assert retired(result) == {"a": "template"}

    def test_a_pod_deleted_just_now_is_left_to_its_delete(self) -> None:
        memory = WarmMemory()
        memory.deleted["uid-a"] = T0 - timedelta(seconds=5)
        result = plan([view("a", hash_="old")], memory)
        assert retired(result) == {}


class TestOrphanedWarmAccess:
    @staticmethod
    def account(pod: str, age: float | None = 120.0) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": pod, "labels": {"managedagents.dev/warm-pod": pod}}
        if age is not None:
            metadata["creationTimestamp"] = (T0 - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"metadata": metadata}

    @pytest.mark.parametrize(("pods", "age", "orphan"), [
        (set(), 120.0, True),             # its pod was never made (a crash between the two)
        ({"p-warm-1"}, 120.0, False),     # its pod exists
        (set(), 10.0, False),             # too young: its pod may be on its way
        (set(), None, True),
    ])
    def test_service_accounts_without_their_pod(self, pods: set[str], age: float | None, orphan: bool) -> None:
        found = orphaned_warm_access([self.account("p-warm-1", age)], pods, now=T0, grace_seconds=60)
        assert found == (["p-warm-1"] if orphan else [])

    def test_objects_not_made_for_a_warm_pod_are_never_swept(self) -> None:
        assert orphaned_warm_access([{"metadata": {"name": "other", "labels": {}}}], set(), now=T0,
                                    grace_seconds=60) == []


class TestReviewFindings:
    def test_pods_being_created_are_not_created_again(self) -> None:
        """Two on their way and none in view: nothing more to create (it used to start two more each pass)."""
        assert plan([], min_workers=2, max_workers=10, creating=2).create == 0
        assert plan([view("a")], min_workers=2, max_workers=10, creating=1).create == 0
        assert plan([view("a")], min_workers=3, max_workers=10, creating=1).create == 1

    def test_a_ready_pod_a_poll_counts_on_is_not_retired_by_choice(self) -> None:
        """maxWorkers 2, two ready warm pods, two polls in flight: retiring the aged one would leave the
        second poll's item a fresh pod beside a terminating one, three pods for two slots."""
        pods = [view("a", age=MAX_AGE), view("b")]
        assert retired(plan(pods, min_workers=2, max_workers=2, polls_in_flight=2)) == {}
        assert retired(plan(pods, min_workers=2, max_workers=2, polls_in_flight=1)) == {"a": "aged"}
        assert retired(plan(pods, min_workers=2, max_workers=3, polls_in_flight=2)) == {"a": "aged"}

    def test_a_pod_that_never_got_ready_is_retired_whatever_the_polls(self) -> None:
        pods = [view("a", ready=False, age=STARTUP), view("b")]
        assert retired(plan(pods, min_workers=2, max_workers=2, polls_in_flight=2)) == {"a": "start_timeout"}


def test_the_bind_patch_is_conditional_on_the_pods_resource_version() -> None:
    assert bind_patch(POOL, WORK, resource_version="42")["metadata"]["resourceVersion"] == "42"
    assert "resourceVersion" not in bind_patch(POOL, WORK)["metadata"]
