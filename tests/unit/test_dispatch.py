"""Pure dispatch decisions: spec and environment resolution, capacity and pollers, pod lifecycle, status."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from environments_operator.domain.conditions import get_condition
from environments_operator.domain.dispatch import (
    MAX_CONCURRENT_POLLS,
    POLL_FAILURES_BEFORE_NOT_READY,
    Blocker,
    DispatchFailure,
    EnvironmentEntry,
    WorkerPodView,
    after_failed_poll,
    can_start_poll,
    desired_workers,
    dispatch_failure,
    environment_entry,
    existing_pod_action,
    occupied_slots,
    parse_pool_spec,
    poller_should_retire,
    pool_conditions,
    resolve_environment,
    should_add_poller,
    unfinished_work_ids,
    worker_counts,
    worker_pod_view,
)
from environments_operator.domain.vocabulary import backoff_seconds
from environments_operator.domain.worker_lifecycle import (
    UNRELEASED_CHECK_AFTER_SECONDS,
    PodMemory,
    orphaned_secrets,
    owed_stop_action,
    plan_lifecycle,
    start_timeout_message,
    unreleased_pod_action,
)
from environments_operator.domain.worker_manifests import SCHEDULING_GATE, worker_pod_name
from environments_operator.domain.workerpool import WorkerPoolSpec, queue_status_from_stats

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
KEY_REF = {"name": "env-key", "key": "key"}


def spec(**fields: Any) -> WorkerPoolSpec:
    parsed = parse_pool_spec({"environmentId": "env_1", "environmentKeySecretRef": KEY_REF, **fields})
    assert isinstance(parsed, WorkerPoolSpec)
    return parsed


class TestSpecAndEnvironment:
    @pytest.mark.parametrize(("fields", "reason", "mentions"), [
        ({"environmentId": "env_1", "environmentKeySecretRef": KEY_REF, "mode": "Pool"}, "InvalidSpec",
         "spec.mode"),
        ({"environmentKeySecretRef": KEY_REF}, "InvalidSpec", "exactly one of environmentRef and environmentId"),
        ({"environmentId": "env_1"}, "InvalidSpec", "spec.environmentKeySecretRef"),
        ({"environmentId": "env_1", "environmentKeySecretRef": KEY_REF, "maxWorkers": 0}, "InvalidSpec",
         "spec.maxWorkers"),
        ({"environmentId": "env_1", "environmentKeySecretRef": KEY_REF, "poll": {"blockMs": 0}}, "InvalidSpec",
         "spec.poll.blockMs"),
    ])
    def test_unusable_specs_name_the_field_and_reason(self, fields: dict[str, Any], reason: str,
                                                       mentions: str) -> None:
        result = parse_pool_spec(fields)
        assert isinstance(result, Blocker)
        assert result.reason == reason and mentions in result.message

    def test_defaults(self) -> None:
        parsed = spec()
        assert parsed.mode == "PerWorkItem" and parsed.maxWorkers == 10 and parsed.poll.blockMs == 900

    @pytest.mark.parametrize(("entries", "expected"), [
        ([], "EnvironmentNotFound"),
        ([EnvironmentEntry("e", None, "self_hosted", False)], "EnvironmentNotReady"),
        ([EnvironmentEntry("e", "env_9", "cloud", False)], "EnvironmentNotSelfHosted"),
        ([EnvironmentEntry("e", "env_9", "self_hosted", True)], "EnvironmentArchived"),
        ([EnvironmentEntry("e", "env_9", "self_hosted", False)], "env_9"),
        ([EnvironmentEntry("e", "env_9", None, False)], "env_9"),
    ])
    def test_environment_ref_resolution(self, entries: list[EnvironmentEntry], expected: str) -> None:
        pool = WorkerPoolSpec.model_validate({"environmentRef": {"name": "e"}, "environmentKeySecretRef": KEY_REF})
        result = resolve_environment(pool, "ns", {("ns", "e"): entries})
        assert (result.reason if isinstance(result, Blocker) else result) == expected
        if isinstance(result, Blocker):
            assert "'e'" in result.message

    @pytest.mark.parametrize("key", [("other-ns", "e"), ("ns", "other")])
    def test_environment_ref_is_looked_up_by_namespace_and_name(self, key: tuple[str, str]) -> None:
        pool = WorkerPoolSpec.model_validate({"environmentRef": {"name": "e"}, "environmentKeySecretRef": KEY_REF})
        index = {key: [EnvironmentEntry(key[1], "env_9", "self_hosted", False)]}
        result = resolve_environment(pool, "ns", index)
        assert isinstance(result, Blocker) and result.reason == "EnvironmentNotFound"

    def test_environment_id_needs_no_index(self) -> None:
        assert resolve_environment(spec(), "ns", {}) == "env_1"

    def test_environment_entry_prefers_the_api_type(self) -> None:
        entry = environment_entry("e", {"config": {"type": "cloud"}}, {"id": "env_2", "type": "self_hosted"})
        assert entry == EnvironmentEntry("e", "env_2", "self_hosted", False)
        assert environment_entry("e", {"config": {"type": "self_hosted"}}, {}).type == "self_hosted"


class TestCapacity:
    @pytest.mark.parametrize(("max_workers", "occupied", "polling", "allowed"), [
        (1, 0, 0, True),
        (1, 0, 1, False),   # the poll in flight may return the one item that fits
        (1, 1, 0, False),   # at capacity: do not poll, items stay queued
        (10, 7, 2, True),
        (10, 7, 3, False),
    ])
    def test_can_start_poll(self, max_workers: int, occupied: int, polling: int, allowed: bool) -> None:
        assert can_start_poll(max_workers=max_workers, occupied=occupied, polling=polling) is allowed

    def test_dispatching_items_and_pods_of_the_same_item_count_once(self) -> None:
        assert occupied_slots({"w1", "w2"}, {"w2", "w3"}) == 3

    @pytest.mark.parametrize(("pollers", "polling", "occupied", "added"), [
        (1, 0, 1, True),
        (MAX_CONCURRENT_POLLS, 0, 1, False),
        (3, 2, 8, False),
        (3, 1, 8, True),
    ])
    def test_pollers_grow_one_per_claim_within_capacity_and_cap(self, pollers: int, polling: int, occupied: int,
                                                                added: bool) -> None:
        assert should_add_poller(max_workers=10, occupied=occupied, polling=polling, pollers=pollers) is added

    @pytest.mark.parametrize(("pollers", "empty", "retire"), [(1, True, False), (2, True, True), (5, False, False)])
    def test_empty_polls_shrink_the_pollers_to_one(self, pollers: int, empty: bool, retire: bool) -> None:
        assert poller_should_retire(pollers=pollers, poll_was_empty=empty) is retire

    def test_a_burst_is_served_by_pipelined_pollers_after_a_few_round_trips(self) -> None:
        """Each claim adds a poller, so the pollers double every round trip until the cap."""
        pollers, rounds = 1, 0
        while pollers < MAX_CONCURRENT_POLLS:
            added = sum(should_add_poller(max_workers=500, occupied=0, polling=0, pollers=pollers + i)
                        for i in range(pollers))
            pollers += added
            rounds += 1
        assert rounds <= 4

    @pytest.mark.parametrize(("attempt", "seconds"), [(1, 0.5), (2, 1.0), (3, 2.0), (20, 30.0)])
    def test_backoff(self, attempt: int, seconds: float) -> None:
        assert backoff_seconds(attempt) == seconds


def pod_body(name: str = "work-a", work_id: str = "work_A", phase: str | None = None, **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns",
                     "labels": {"managedagents.dev/worker-pool": "pool", "managedagents.dev/work-id": work_id},
                     "annotations": {"managedagents.dev/work-id": work_id}},
        "status": dict(status),
    }
    if phase:
        body["status"]["phase"] = phase
    return body


def view(name: str, phase: str, *, created: datetime | None = T0, finished: datetime | None = None,
         deleting: bool = False, cause: str | None = None, gated: bool = False,
         deletion_deadline: datetime | None = None) -> WorkerPodView:
    return WorkerPodView(name=name, namespace="ns", pool="pool", work_id=f"id-{name}", phase=phase,
                         deleting=deleting or deletion_deadline is not None, created_at=created, finished_at=finished,
                         cause=cause, uid=f"uid-{name}", scheduling_gates=(SCHEDULING_GATE,) if gated else (),
                         deletion_deadline=deletion_deadline)


class TestPodView:
    def test_a_pod_without_phase_is_pending(self) -> None:
        parsed = worker_pod_view(pod_body())
        assert parsed is not None and parsed.phase == "Pending" and parsed.state == "starting"

    def test_image_pull_backoff_is_the_cause(self) -> None:
        parsed = worker_pod_view(pod_body(phase="Pending", containerStatuses=[{
            "name": "worker", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull failed"}}}]))
        assert parsed is not None and parsed.cause == "container worker: ImagePullBackOff: pull failed"

    def test_unschedulable_is_the_cause(self) -> None:
        parsed = worker_pod_view(pod_body(phase="Pending", conditions=[{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}]))
        assert parsed is not None and parsed.cause == "Unschedulable: 0/3 nodes"

    def test_failed_container_and_finish_time(self) -> None:
        parsed = worker_pod_view(pod_body(phase="Failed", containerStatuses=[{"name": "worker", "state": {
            "terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-05-01T12:00:05Z"}}}]))
        assert parsed is not None and parsed.state == "failed"
        assert parsed.cause == "container worker terminated: OOMKilled (exit code 137)"
        assert parsed.finished_at == T0 + timedelta(seconds=5)

    def test_exact_work_id_comes_from_the_annotation(self) -> None:
        body = pod_body(work_id="work_AbC")
        body["metadata"]["labels"]["managedagents.dev/work-id"] = "hashed"
        parsed = worker_pod_view(body)
        assert parsed is not None and parsed.work_id == "work_AbC"

    def test_gate_environment_and_deletion_deadline(self) -> None:
        body = pod_body(phase="Pending")
        body["metadata"].update(uid="u1", deletionTimestamp="2026-05-01T12:00:30Z")
        body["metadata"]["annotations"]["managedagents.dev/environment-id"] = "env_old"
        body["spec"] = {"schedulingGates": [{"name": "example.com/other"}, {"name": SCHEDULING_GATE}]}
        parsed = worker_pod_view(body)
        assert parsed is not None and parsed.gated and parsed.uid == "u1" and parsed.environment_id == "env_old"
        assert parsed.scheduling_gates == ("example.com/other", SCHEDULING_GATE)
        assert parsed.deletion_deadline == T0 + timedelta(seconds=30)
        assert not parsed.stuck_terminating(T0 + timedelta(seconds=30))
        assert parsed.stuck_terminating(T0 + timedelta(seconds=31))
        body["spec"] = {"schedulingGates": [{"name": "example.com/other"}]}
        assert not worker_pod_view(body).gated  # type: ignore[union-attr]

    def test_foreign_pods_are_ignored(self) -> None:
        assert worker_pod_view({"metadata": {"name": "x", "labels": {}}}) is None

    def test_unfinished_and_counts(self) -> None:
        views = [view("a", "Pending"), view("b", "Running"), view("c", "Succeeded"), view("d", "Failed"),
                 view("e", "Unknown")]
        assert unfinished_work_ids(views, T0) == {"id-a", "id-b", "id-e"}
        counts = worker_counts(views)
        assert (counts.starting, counts.running, counts.succeeded, counts.failed) == (1, 2, 1, 1)


def plan(views: list[WorkerPodView], memory: PodMemory, now: datetime, *, startup: float = 60,
         ttl: float = 30) -> Any:
    return plan_lifecycle(views, memory, now=now, startup_timeout_seconds=startup, ttl_seconds_after_finished=ttl)


class TestLifecycle:
    def test_pending_past_the_startup_timeout_is_timed_out_once(self) -> None:
        memory = PodMemory()
        pending = view("a", "Pending", cause="container worker: ImagePullBackOff")
        first = plan([pending], memory, T0 + timedelta(seconds=59))
        assert first.timed_out == () and first.next_check_in == pytest.approx(1)
        second = plan([pending], memory, T0 + timedelta(seconds=60))
        assert second.timed_out == (pending,)
        assert "ImagePullBackOff" in start_timeout_message(pending, 60)
        assert plan([pending], memory, T0 + timedelta(seconds=61)).timed_out == ()

    def test_gated_pods_never_time_out_and_are_looked_at_once_their_dispatch_is_over(self) -> None:
        memory = PodMemory()
        gated = view("a", "Pending", gated=True)
        early = plan([gated], memory, T0 + timedelta(seconds=UNRELEASED_CHECK_AFTER_SECONDS - 1))
        assert early.unreleased == () and early.next_check_in == pytest.approx(1)
        late = plan([gated], memory, T0 + timedelta(seconds=600))
        assert late.timed_out == () and late.unreleased == (gated,)
        in_flight = plan_lifecycle([gated], memory, now=T0 + timedelta(seconds=600), startup_timeout_seconds=60,
                                   ttl_seconds_after_finished=30, in_flight={"id-a"})
        assert in_flight.unreleased == ()

    def test_pods_stuck_terminating_are_force_deleted_after_their_grace(self) -> None:
        memory = PodMemory()
        stuck = view("a", "Running", deletion_deadline=T0 + timedelta(seconds=30))
        before = plan([stuck], memory, T0 + timedelta(seconds=29))
        assert before.stuck_terminating == () and before.next_check_in == pytest.approx(1, abs=0.01)
        assert plan([stuck], memory, T0 + timedelta(seconds=31)).stuck_terminating == (stuck,)
        assert stuck.holds_slot(T0 + timedelta(seconds=29)) and not stuck.holds_slot(T0 + timedelta(seconds=31))
        assert unfinished_work_ids([stuck], T0 + timedelta(seconds=31)) == set()

    def test_pending_without_creation_time_counts_from_first_sight(self) -> None:
        memory = PodMemory()
        pending = view("a", "Pending", created=None)
        assert plan([pending], memory, T0).timed_out == ()
        assert plan([pending], memory, T0 + timedelta(seconds=60)).timed_out == (pending,)

    def test_running_pods_have_no_startup_deadline(self) -> None:
        result = plan([view("a", "Running", created=T0 - timedelta(hours=1))], PodMemory(), T0)
        assert result.timed_out == () and result.next_check_in is None

    def test_failed_pod_is_reported_once_and_kept_until_its_ttl(self) -> None:
        memory = PodMemory()
        failed = view("a", "Failed", finished=T0)
        first = plan([failed], memory, T0 + timedelta(seconds=1))
        assert first.failed == (failed,) and first.expired == ()
        second = plan([failed], memory, T0 + timedelta(seconds=30))
        assert second.failed == () and second.expired == (failed,)

    def test_succeeded_pod_expires_after_ttl_without_being_reported(self) -> None:
        memory = PodMemory()
        done = view("a", "Succeeded", finished=T0)
        assert plan([done], memory, T0 + timedelta(seconds=10)).next_check_in == pytest.approx(20)
        result = plan([done], memory, T0 + timedelta(seconds=30))
        assert result.expired == (done,) and result.failed == ()

    def test_finish_time_falls_back_to_first_sight_of_the_finished_pod(self) -> None:
        memory = PodMemory()
        done = view("a", "Succeeded")
        assert plan([done], memory, T0).expired == ()
        assert plan([done], memory, T0 + timedelta(seconds=30)).expired == (done,)

    def test_zero_ttl_expires_at_once(self) -> None:
        assert plan([view("a", "Succeeded", finished=T0)], PodMemory(), T0, ttl=0).expired

    @pytest.mark.parametrize(("phase", "vanished"), [("Pending", True), ("Running", True), ("Succeeded", False)])
    def test_a_pod_gone_before_finishing_has_vanished(self, phase: str, vanished: bool) -> None:
        memory = PodMemory()
        pod = view("a", phase)
        plan([pod], memory, T0)
        result = plan([], memory, T0 + timedelta(seconds=1))
        assert result.vanished == ((pod,) if vanished else ())
        assert plan([], memory, T0 + timedelta(seconds=2)).vanished == ()

    def test_pods_deleted_by_the_controller_have_not_vanished(self) -> None:
        memory = PodMemory()
        plan([view("a", "Running")], memory, T0)
        memory.deleted["uid-a"] = T0
        assert plan([], memory, T0 + timedelta(seconds=1)).vanished == ()

    def test_a_new_pod_under_a_deleted_pods_name_is_watched_again(self) -> None:
        memory = PodMemory()
        old = view("a", "Succeeded", finished=T0)
        plan([old], memory, T0)
        memory.deleted["uid-a"] = T0
        # The item came back and was dispatched to a fresh pod of the same name (another UID); a stale
        # index may even still hold the old one beside it.
        fresh = dataclasses.replace(view("a", "Pending", created=T0 + timedelta(seconds=2)), uid="uid-a2")
        assert plan([old, fresh], memory, T0 + timedelta(seconds=62)).timed_out == (fresh,)

    def test_a_failed_pod_that_then_vanishes_is_reported_once(self) -> None:
        memory = PodMemory()
        failed = view("a", "Failed", finished=T0)
        assert plan([failed], memory, T0).failed == (failed,)
        assert plan([], memory, T0 + timedelta(seconds=1)).vanished == ()

    def test_a_pod_being_deleted_is_not_timed_out(self) -> None:
        assert plan([view("a", "Pending", deleting=True)], PodMemory(), T0 + timedelta(hours=1)).timed_out == ()


class TestStatus:
    @pytest.mark.parametrize(("max_workers", "active", "depth", "desired"), [
        (10, 2, 3, 5), (10, 8, 5, 10), (10, 0, None, 0), (1, 0, 100, 1),
    ])
    def test_desired_workers(self, max_workers: int, active: int, depth: int | None, desired: int) -> None:
        assert desired_workers(max_workers=max_workers, active=active, depth=depth) == desired

    def conditions(self, **overrides: Any) -> list[dict[str, Any]]:
        arguments: dict[str, Any] = {"blocker": None, "environment_id": "env_1", "max_workers": 2, "active": 0,
                                     "depth": 0, "dispatch_failure": None, "generation": 3, "now": T0}
        return pool_conditions(None, **{**arguments, **overrides})

    def test_ready_when_serving(self) -> None:
        ready = get_condition(self.conditions(), "Ready")
        assert ready is not None and ready["status"] == "True" and ready["observedGeneration"] == 3

    def test_blocker_makes_ready_false_with_its_reason(self) -> None:
        ready = get_condition(self.conditions(blocker=Blocker("EnvironmentNotFound", "missing")), "Ready")
        assert ready is not None and (ready["status"], ready["reason"], ready["message"]) == (
            "False", "EnvironmentNotFound", "missing")

    def test_at_capacity_reports_the_backlog(self) -> None:
        at_capacity = get_condition(self.conditions(active=2, depth=7), "AtCapacity")
        assert at_capacity is not None and at_capacity["status"] == "True"
        assert "7 items waiting" in at_capacity["message"]

    def test_dispatch_failing_says_why(self) -> None:
        failure = dispatch_failure("Pod", 403, "Forbidden", 'exceeded quota: "pods"', "work_A")
        assert failure == DispatchFailure("PodCreationForbidden", failure.message)
        assert "exceeded quota" in failure.message and "work_A" in failure.message
        failing = get_condition(self.conditions(dispatch_failure=failure), "DispatchFailing")
        assert failing is not None and failing["status"] == "True" and failing["reason"] == "PodCreationForbidden"

    @pytest.mark.parametrize(("status", "reason"), [(403, "PodCreationForbidden"), (422, "PodInvalid"),
                                                     (500, "PodCreationFailed")])
    def test_dispatch_failure_reasons(self, status: int, reason: str) -> None:
        assert dispatch_failure("Pod", status, "", "", "w").reason == reason

    def test_queue_status_from_api_stats(self) -> None:
        queue = queue_status_from_stats({"depth": 4, "pending": 1, "oldest_queued_at": "2026-05-01T12:00:00Z",
                                         "workers_polling": 2, "type": "work_queue_stats"})
        assert queue.model_dump(mode="json") == {"depth": 4, "pending": 1, "oldestQueuedAt": "2026-05-01T12:00:00Z",
                                                 "workersPolling": 2}


def secret(work_id: str, created: str | None = "2026-05-01T11:00:00Z", owner: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": f"secret-of-{work_id}", "annotations": {"managedagents.dev/work-id": work_id}}
    if created:
        metadata["creationTimestamp"] = created
    if owner:
        metadata["ownerReferences"] = [{"kind": "Pod", "name": owner, "uid": "u"}]
    return {"metadata": metadata}


class TestOrphanedSecrets:
    @pytest.mark.parametrize(("work_id", "pods", "in_flight", "created", "orphan"), [
        ("w1", set(), set(), "2026-05-01T11:00:00Z", True),            # its pod is gone
        ("w1", {worker_pod_name("w1")}, set(), "2026-05-01T11:00:00Z", False),  # its pod exists
        ("w1", set(), {"w1"}, "2026-05-01T11:00:00Z", False),           # its pod is being created
        ("w1", set(), set(), "2026-05-01T11:59:30Z", False),            # too young: the pod may follow
        ("w1", set(), set(), None, True),                               # no creation time: judge by the pod
    ])
    def test_orphans_are_secrets_whose_pod_is_gone(self, work_id: str, pods: set[str], in_flight: set[str],
                                                   created: str | None, orphan: bool) -> None:
        result = orphaned_secrets([secret(work_id, created)], pods, in_flight, now=T0, grace_seconds=60)
        assert result == ([f"secret-of-{work_id}"] if orphan else [])

    @pytest.mark.parametrize(("pods", "orphan"), [
        ({"pool-warm-abcde"}, False),              # the warm pod it is bound to exists
        ({worker_pod_name("w1")}, True),           # a pod named after the item is not its owner
    ])
    def test_a_secret_belongs_to_the_pod_its_owner_reference_names(self, pods: set[str], orphan: bool) -> None:
        result = orphaned_secrets([secret("w1", owner="pool-warm-abcde")], pods, set(), now=T0, grace_seconds=60)
        assert result == (["secret-of-w1"] if orphan else [])


@pytest.mark.parametrize(
    ("status", "retryable", "expected"),
    [
        (0, True, "offer_again"),      # no answer: the item comes back and meets its gated pod
        (503, True, "offer_again"),
        (429, True, "offer_again"),
        (409, False, "ask_state"),     # past queued: acknowledged after all (starting), or held or stopped
        (404, False, "remove_pod"),    # the item is gone
        (403, False, "remove_pod"),    # the key is refused
    ],
)
def test_after_failed_ack(status: int, retryable: bool, expected: str) -> None:
    from environments_operator.domain.dispatch import after_failed_ack

    # The pod is gated whenever an ack fails, so removing it can never end a worker.
    assert after_failed_ack(status=status, retryable=retryable) == expected


class TestPollFailure:
    @pytest.mark.parametrize(
        ("failures", "status", "retryable", "retry_after", "reason", "pause", "reread_key"),
        [
            (1, 401, False, None, "EnvironmentKeyRejected", 0.5, True),   # reported at once; the key is re-read
            (1, 403, False, None, "EnvironmentKeyRejected", 0.5, True),
            (1, 400, False, None, "PollRejected", 0.5, False),            # a refusal retrying will not mend
            (1, 503, True, None, None, 0.5, False),                       # transient: not reported yet
            (POLL_FAILURES_BEFORE_NOT_READY - 1, 0, True, None, None, 1.0, False),
            (POLL_FAILURES_BEFORE_NOT_READY, 0, True, None, "WorkQueueUnavailable", 2.0, False),
            (2, 429, True, 7.0, None, 7.0, False),                        # Retry-After beyond the backoff wins
            (4, 429, True, 1.0, "WorkQueueUnavailable", 4.0, False),      # the backoff beyond Retry-After wins
            (20, 503, True, None, "WorkQueueUnavailable", 30.0, False),   # the backoff is capped
        ],
    )
    def test_after_failed_poll(self, failures: int, status: int, retryable: bool, retry_after: float | None,
                               reason: str | None, pause: float, reread_key: bool) -> None:
        plan = after_failed_poll(failures=failures, status=status, retryable=retryable,
                                 credential_rejected=status in (401, 403), retry_after=retry_after,
                                 api_message="the API says no", error="poll failed (503): the API says no")
        assert (plan.blocker.reason if plan.blocker else None) == reason
        assert plan.pause_seconds == pause and plan.reread_key is reread_key

    def test_messages_say_what_failed(self) -> None:
        rejected = after_failed_poll(failures=1, status=401, retryable=False, credential_rejected=True,
                                     retry_after=None, api_message="invalid key", error="poll failed (401): x")
        assert rejected.blocker == Blocker("EnvironmentKeyRejected",
                                           "the API rejected the environment key (401): invalid key")
        refused = after_failed_poll(failures=1, status=400, retryable=False, credential_rejected=False,
                                    retry_after=None, api_message="bad", error="poll failed (400): bad")
        assert refused.blocker == Blocker("PollRejected", "polling the work queue failed: poll failed (400): bad")
        unavailable = after_failed_poll(failures=3, status=0, retryable=True, credential_rejected=False,
                                        retry_after=None, api_message="timeout",
                                        error="poll failed (no response): timeout")
        assert unavailable.blocker == Blocker(
            "WorkQueueUnavailable",
            "3 polls in a row failed, retrying with backoff; last: poll failed (no response): timeout")


@pytest.mark.parametrize(
    ("pod", "action"),
    [
        (view("work-a", "Pending", gated=True), "serve"),        # a dispatch stopped before the release
        (view("work-a", "Pending"), "leave"),                    # released: a worker may be starting
        (view("work-a", "Running"), "leave"),                    # a lost lease, the pod still Running
        (view("work-a", "Unknown"), "leave"),                    # node unreachable: wait for the pod to end
        (view("work-a", "Succeeded"), "clear"),                  # the item came back after its pod ended
        (view("work-a", "Failed"), "clear"),
        (view("work-a", "Running", deleting=True), "clear"),     # on its way out
        (view("work-a", "Pending", gated=True, deleting=True), "clear"),
    ],
)
def test_existing_pod_action(pod: WorkerPodView, action: str) -> None:
    assert existing_pod_action(pod) == action


@pytest.mark.parametrize(
    ("state", "age", "action"),
    [
        ("starting", 15, "release"),     # acknowledged, never released (a crash between the two)
        ("starting", 900, "release"),
        ("queued", 15, "wait"),          # not acknowledged: served into this pod when offered again
        ("queued", 60, "delete"),        # past the startup timeout: a fresh pod later
        ("active", 15, "delete"),        # another worker holds it
        ("stopping", 15, "delete"),
        ("stopped", 15, "delete"),
        (None, 15, "delete"),            # no such item
        ("unknown", 900, "wait"),        # not among the newest items: it may be starting
    ],
)
def test_unreleased_pod_action(state: str | None, age: float, action: str) -> None:
    assert unreleased_pod_action(state, age_seconds=age, startup_timeout_seconds=60) == action


@pytest.mark.parametrize(
    ("state", "dispatching", "action"),
    [
        ("queued", False, "drop"),      # offered again since the pod ended: a fresh pod serves it
        ("starting", True, "drop"),     # claimed again by this pool right now
        (None, True, "drop"),
        ("starting", False, "stop"),    # acked, never heartbeat: no lease will ever run out
        ("active", False, "stop"),     # held by a worker that no longer exists
        ("stopping", False, "stop"),
        ("unknown", False, "stop"),     # not among the newest items: stop rather than leave it hanging
        (None, False, "stop"),          # gone: a harmless 404
    ],
)
def test_owed_stop_action(state: str | None, dispatching: bool, action: str) -> None:
    assert owed_stop_action(state, dispatching=dispatching) == action


def _ready(status: str, reason: str, message: str = "m") -> list[dict[str, Any]]:
    return [{"type": "Ready", "status": status, "reason": reason, "message": message}]


@pytest.mark.parametrize(("before", "after", "event"), [
    (None, _ready("False", "EnvironmentKeyUnavailable", "no key"), ("Warning", "EnvironmentKeyUnavailable", "no key")),
    (_ready("True", "Serving"), _ready("False", "WorkQueueUnavailable", "x"), ("Warning", "WorkQueueUnavailable", "x")),
    (_ready("False", "EnvironmentNotFound"), _ready("False", "EnvironmentKeyUnavailable", "k"),
     ("Warning", "EnvironmentKeyUnavailable", "k")),                             # a new reason: a new Event
    (_ready("False", "EnvironmentKeyUnavailable"), _ready("False", "EnvironmentKeyUnavailable"), None),  # no repeats
    (None, _ready("False", "Suspended", "s"), ("Normal", "Suspended", "s")),    # deliberate: not a warning
    (_ready("False", "Suspended"), _ready("True", "Serving", "serving q"),
     ("Normal", "Serving", "ready again (was Suspended): serving q")),
    (None, _ready("True", "Serving"), None),                                     # a new pool that just works
    (_ready("True", "Serving"), _ready("True", "Serving"), None),
])
def test_ready_event(before: list[dict[str, Any]] | None, after: list[dict[str, Any]],
                     event: tuple[str, str, str] | None) -> None:
    from environments_operator.domain.dispatch import ready_event

    assert ready_event(before, after) == event  # type: ignore[arg-type]


@pytest.mark.parametrize(("owners", "pod_uid", "belongs"), [
    ([{"kind": "Pod", "uid": "old"}], "old", True),
    ([{"kind": "Pod", "uid": "fresh"}], "old", False),   # the fresh pod's Secret: an old pod's cleanup keeps it
    ([{"kind": "WorkerPool", "uid": "pool"}], "old", True),  # made before Secrets belonged to their pods
    ([], "old", True),
])
def test_a_secret_goes_only_with_its_own_pod(owners: list[dict[str, str]], pod_uid: str, belongs: bool) -> None:
    from environments_operator.domain.worker_lifecycle import secret_belongs_to

    assert secret_belongs_to({"metadata": {"ownerReferences": owners}}, pod_uid) is belongs
