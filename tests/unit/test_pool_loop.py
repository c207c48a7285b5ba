"""Pure decisions of one WorkerPool loop: its sleep, whether a poll may start, Event throttling, stats interval."""

from __future__ import annotations

from typing import Any

import pytest

from environments_operator.domain.pool_loop import (
    BLOCKED_RETRY_SECONDS,
    MAX_NAP_SECONDS,
    REPEATED_FAILURE_EVENT_EVERY,
    STATS_INTERVAL_AT_CAPACITY_SECONDS,
    STATS_INTERVAL_SECONDS,
    NapInputs,
    may_poll,
    nap_length,
    should_post_failure_event,
    stats_interval,
)

NOW = 1000.0


@pytest.mark.parametrize(("inputs", "expected"), [
    pytest.param({}, MAX_NAP_SECONDS, id="nothing due: the cap"),
    pytest.param({"stats_due_at": NOW + 4}, 4.0, id="stats due"),
    pytest.param({"stats_due_at": NOW - 4}, 0.0, id="stats overdue: at once"),
    pytest.param({"lifecycle_check_in": 7.5}, 7.5, id="a pod to look at again"),
    pytest.param({"key_retry_at": NOW + 1}, BLOCKED_RETRY_SECONDS, id="blocked: not faster than the beat"),
    pytest.param({"key_retry_at": NOW + 20}, 20.0, id="blocked: key backoff longer than the beat"),
    pytest.param({"poll_paused_until": NOW + 3}, 3.0, id="poll pause ends"),
    pytest.param({"poll_paused_until": NOW - 3}, MAX_NAP_SECONDS, id="a past poll pause is no deadline"),
    pytest.param({"dispatch_paused_until": NOW + 2}, 2.0, id="dispatch pause ends"),
    pytest.param({"stop_retry_at": NOW - 1}, 0.0, id="owed force-stops overdue"),
    pytest.param({"status_write_due_at": NOW + 0.5}, 0.5, id="status to write"),
    pytest.param({"stats_due_at": NOW + 9, "lifecycle_check_in": 6.0, "poll_paused_until": NOW + 8}, 6.0,
                 id="the earliest wins"),
    pytest.param({"lifecycle_check_in": 90.0}, MAX_NAP_SECONDS, id="never past the cap"),
])
def test_nap_length_is_the_earliest_deadline(inputs: dict[str, Any], expected: float) -> None:
    assert nap_length(NapInputs(now=NOW, **inputs)) == pytest.approx(expected)


ALLOWED: dict[str, Any] = {
    "stopping": False, "max_workers": 4, "blocked": False, "has_queue": True, "now": NOW,
    "poll_paused_until": 0.0, "dispatch_paused_until": 0.0, "occupied": 1, "polls_in_flight": 1,
}


@pytest.mark.parametrize(("change", "allowed"), [
    pytest.param({}, True, id="capacity left, nothing paused"),
    pytest.param({"stopping": True}, False, id="stopping"),
    pytest.param({"max_workers": None}, False, id="no valid spec"),
    pytest.param({"blocked": True}, False, id="blocked"),
    pytest.param({"has_queue": False}, False, id="no queue client"),
    pytest.param({"poll_paused_until": NOW + 1}, False, id="polls paused"),
    pytest.param({"poll_paused_until": NOW}, True, id="poll pause just over"),
    pytest.param({"dispatch_paused_until": NOW + 1}, False, id="dispatch paused"),
    pytest.param({"occupied": 3}, False, id="every free slot already polled for"),
    pytest.param({"occupied": 2}, True, id="one slot nobody polls for"),
])
def test_may_poll(change: dict[str, Any], allowed: bool) -> None:
    assert may_poll(**{**ALLOWED, **change}) is allowed


@pytest.mark.parametrize(("failures", "reason_is_new", "posted"), [
    (1, False, True),
    (2, False, False),
    (REPEATED_FAILURE_EVENT_EVERY, False, False),
    (REPEATED_FAILURE_EVENT_EVERY + 1, False, True),
    (2 * REPEATED_FAILURE_EVENT_EVERY + 1, False, True),
    (5, True, True),
])
def test_repeated_failures_post_every_tenth_event(failures: int, reason_is_new: bool, posted: bool) -> None:
    assert should_post_failure_event(failures=failures, reason_is_new=reason_is_new) is posted


@pytest.mark.parametrize(("max_workers", "occupied", "expected"), [
    (None, 0, STATS_INTERVAL_SECONDS),
    (4, 3, STATS_INTERVAL_SECONDS),
    (4, 4, STATS_INTERVAL_AT_CAPACITY_SECONDS),
    (4, 5, STATS_INTERVAL_AT_CAPACITY_SECONDS),
])
def test_stats_are_read_more_often_at_capacity(max_workers: int | None, occupied: int, expected: float) -> None:
    assert stats_interval(max_workers=max_workers, occupied=occupied) == expected
