"""Pure decisions of one WorkerPool loop: when it sleeps, when a poll may start, when to report, how long to wait.

The ``handlers/workerpool`` parts read their own state and ask these functions; every number the loop
waits for is named here with the reason for its value. This module owns no state and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from environments_operator.domain.dispatch import can_start_poll

# Queue stats feed status only; at capacity (when the pool does not poll) they are the only signal
# of the backlog, so they are read more often then.
STATS_INTERVAL_SECONDS = 10.0
STATS_INTERVAL_AT_CAPACITY_SECONDS = 2.0
# Status is a summary, not a log: one write per second at most, however busy the pool is.
STATUS_MIN_INTERVAL_SECONDS = 1.0
# While blocked, the loop looks again this often (Secrets are read, not watched).
BLOCKED_RETRY_SECONDS = 5.0
# Upper bound of the loop's sleep: a missed wake-up costs at most this much.
MAX_NAP_SECONDS = 30.0
# A pass that raised is retried soon, but not in a tight loop that would flood the log.
FAILED_PASS_RETRY_SECONDS = 1.0
# A poller that crashed on a bug pauses polling this long, for the same reason.
POLLER_CRASH_PAUSE_SECONDS = 1.0
# Force-stops that failed (or could not be sent: no queue client yet) are retried on this beat; the
# item's lease runs meanwhile, so a slower beat only delays the end of a session already lost.
STOP_RETRY_SECONDS = 5.0
# A refused Pod or Secret creation pauses dispatch; quotas and admission policies are fixed by people,
# so the pause grows to a minute rather than hammering the apiserver.
DISPATCH_BACKOFF_BASE_SECONDS, DISPATCH_BACKOFF_CAP_SECONDS = 1.0, 60.0
# An unreadable key Secret is re-read with backoff; people create or fix it, and a Secret is not watched.
KEY_BACKOFF_BASE_SECONDS, KEY_BACKOFF_CAP_SECONDS = 1.0, 30.0
# A failure that repeats is posted as an Event on its first and then every tenth occurrence: enough
# to be seen in ``kubectl describe``, few enough not to bury the pool's other Events.
REPEATED_FAILURE_EVENT_EVERY = 10


def stats_interval(*, max_workers: int | None, occupied: int) -> float:
    """How often queue stats are read: more often at capacity, where they are the only sign of backlog."""
    at_capacity = max_workers is not None and occupied >= max_workers
    return STATS_INTERVAL_AT_CAPACITY_SECONDS if at_capacity else STATS_INTERVAL_SECONDS


def may_poll(
    *,
    stopping: bool,
    max_workers: int | None,
    blocked: bool,
    has_queue: bool,
    now: float,
    poll_paused_until: float,
    dispatch_paused_until: float,
    occupied: int,
    polls_in_flight: int,
) -> bool:
    """Whether a poller may send one more poll; ``max_workers`` is None while the spec is invalid."""
    return (
        not stopping and max_workers is not None and not blocked and has_queue
        and now >= poll_paused_until and now >= dispatch_paused_until
        and can_start_poll(max_workers=max_workers, occupied=occupied, polling=polls_in_flight)
    )


def should_post_failure_event(*, failures: int, reason_is_new: bool) -> bool:
    """Post an Event for a new kind of failure, and for the 1st, 11th, 21st... of a run of the same one."""
    return reason_is_new or failures % REPEATED_FAILURE_EVENT_EVERY == 1


@dataclass(frozen=True)
class NapInputs:
    """The deadlines one pass leaves behind, as loop-clock times (None: no such deadline)."""

    now: float
    stats_due_at: float | None = None
    lifecycle_check_in: float | None = None  # already relative: seconds from now
    key_retry_at: float | None = None  # set only while the pool is blocked
    poll_paused_until: float = 0.0
    dispatch_paused_until: float = 0.0
    stop_retry_at: float | None = None  # set only while force-stops are owed
    status_write_due_at: float | None = None  # set only while composed status differs from the written one
    relist_at: float | None = None  # the next list of the pool's pods


def nap_length(inputs: NapInputs) -> float:
    """How long the loop may sleep unless woken: until the earliest deadline, at most ``MAX_NAP_SECONDS``."""
    now = inputs.now
    deadlines = [MAX_NAP_SECONDS]
    if inputs.stats_due_at is not None:
        deadlines.append(max(0.0, inputs.stats_due_at - now))
    if inputs.lifecycle_check_in is not None:
        deadlines.append(inputs.lifecycle_check_in)
    if inputs.key_retry_at is not None:
        # Environment and spec changes wake the loop; a Secret (not watched) is re-read on this beat.
        deadlines.append(max(inputs.key_retry_at - now, BLOCKED_RETRY_SECONDS))
    for until in (inputs.poll_paused_until, inputs.dispatch_paused_until):
        if until > now:
            deadlines.append(until - now)
    if inputs.stop_retry_at is not None:
        deadlines.append(max(0.0, inputs.stop_retry_at - now))
    if inputs.status_write_due_at is not None:
        deadlines.append(max(0.0, inputs.status_write_due_at - now))
    if inputs.relist_at is not None:
        deadlines.append(max(0.0, inputs.relist_at - now))
    return min(deadlines)
