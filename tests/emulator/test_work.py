"""The work queue through the SDK: sessions, poll, ack, heartbeat, stop, list, retrieve, update, stats."""

from __future__ import annotations

import asyncio
import re

import anthropic
import pytest
from anthropic import AsyncAnthropic

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import (
    AGENT_ID,
    ManualClock,
    SelfHostedEnvironment,
    enqueue_sessions,
    environment_client,
    error_of,
    running_emulator,
    running_queue,
    self_hosted_environment,
    sessions_token,
)

WORK_KEYS = {
    "id",
    "acknowledged_at",
    "created_at",
    "data",
    "environment_id",
    "latest_heartbeat_at",
    "metadata",
    "started_at",
    "state",
    "stop_requested_at",
    "stopped_at",
    "type",
}


async def claim(worker: AsyncAnthropic, pool: SelfHostedEnvironment) -> str:
    """Poll and ack one item; returns its ID."""
    item = await worker.beta.environments.work.poll(pool.id)
    assert item is not None
    await worker.beta.environments.work.ack(item.id, environment_id=pool.id)
    return item.id


async def test_session_create_queues_a_session_work_item(
    api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    session = await api.beta.sessions.create(agent=AGENT_ID, environment_id=pool.id)
    assert session.environment_id == pool.id
    assert session.status == "idle"
    response = await worker.beta.environments.work.with_raw_response.poll(pool.id)
    body = response.http_response.json()
    assert set(body) == WORK_KEYS | {"secret"}
    item = await response.parse()
    assert item is not None
    assert re.fullmatch(r"work_[0-9A-Za-z]{24}", item.id)
    assert item.data.model_dump() == {"id": session.id, "type": "session"}
    assert item.state == "queued"
    assert item.secret is not None
    assert sessions_token(item.secret).startswith("sk-ant-sesstok-")
    # The secret is only handed out by poll.
    retrieved = await api.beta.environments.work.with_raw_response.retrieve(item.id, environment_id=pool.id)
    assert set(retrieved.http_response.json()) == WORK_KEYS


async def test_session_create_accepts_an_agent_object(api: AsyncAnthropic, pool: SelfHostedEnvironment) -> None:
    session = await api.beta.sessions.create(
        agent={"type": "agent", "id": AGENT_ID, "version": 3}, environment_id=pool.id
    )
    assert session.agent.id == AGENT_ID
    assert session.agent.version == 3
    assert (await api.beta.sessions.retrieve(session.id)).id == session.id


async def test_session_for_unknown_or_archived_environment_is_rejected(
    api: AsyncAnthropic, emulator: EmulatorServer, pool: SelfHostedEnvironment
) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await api.beta.sessions.create(agent=AGENT_ID, environment_id="env_000000000000000000000000")
    assert caught.value.error_code == "environment_not_found"
    await api.beta.environments.archive(pool.id)
    with pytest.raises(anthropic.BadRequestError, match="archived"):
        await api.beta.sessions.create(agent=AGENT_ID, environment_id=pool.id)
    assert emulator.state.sessions == {}


async def test_cloud_environment_sessions_queue_no_work(api: AsyncAnthropic, emulator: EmulatorServer) -> None:
    cloud = await api.beta.environments.create(name="cloud")
    await api.beta.sessions.create(agent=AGENT_ID, environment_id=cloud.id)
    assert emulator.state.work == {}


async def test_non_blocking_poll_returns_null(worker: AsyncAnthropic, pool: SelfHostedEnvironment) -> None:
    assert await worker.beta.environments.work.poll(pool.id) is None


async def test_blocking_poll_returns_an_item_that_arrives_while_waiting(
    api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(worker.beta.environments.work.poll(pool.id, block_ms=999))
    await asyncio.sleep(0.1)
    session = await api.beta.sessions.create(agent=AGENT_ID, environment_id=pool.id)
    item = await waiting
    assert item is not None and item.data.id == session.id
    assert loop.time() - started < 0.9


async def test_blocking_poll_times_out_with_null(worker: AsyncAnthropic, pool: SelfHostedEnvironment) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await worker.beta.environments.work.poll(pool.id, block_ms=200) is None
    assert 0.19 <= loop.time() - started < 0.8


@pytest.mark.parametrize("block_ms", [0, 1000, -1])
async def test_block_ms_outside_1_to_999_is_rejected(
    worker: AsyncAnthropic, pool: SelfHostedEnvironment, block_ms: int
) -> None:
    with pytest.raises(anthropic.BadRequestError, match="block_ms"):
        await worker.beta.environments.work.poll(pool.id, block_ms=block_ms)


async def test_sdk_poller_drains_claims_and_acks(
    emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    items = enqueue_sessions(emulator, pool.id, count=3)
    claimed = [
        item.id
        async for item in api.beta.environments.work.poller(
            environment_id=pool.id, environment_key=pool.key, drain=True, auto_stop=False, block_ms=None
        )
    ]
    assert claimed == [item.id for item in items]
    for item in items:
        retrieved = await api.beta.environments.work.retrieve(item.id, environment_id=pool.id)
        assert retrieved.state == "starting"
        assert retrieved.acknowledged_at is not None
    stats = await environment_client(emulator, pool).beta.environments.work.stats(pool.id)
    assert (stats.depth, stats.pending, stats.oldest_queued_at) == (0, 0, None)


async def test_ack_is_idempotent_while_starting_and_409_after(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    enqueue_sessions(emulator, pool.id)
    work_id = await claim(worker, pool)
    first = emulator.state.work[work_id].acknowledged_at
    again = await worker.beta.environments.work.ack(work_id, environment_id=pool.id)
    assert again.state == "starting"
    assert again.acknowledged_at == first
    await worker.beta.environments.work.heartbeat(work_id, environment_id=pool.id)
    with pytest.raises(anthropic.ConflictError, match="active"):
        await worker.beta.environments.work.ack(work_id, environment_id=pool.id)


async def test_heartbeat_lease_flow(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    enqueue_sessions(emulator, pool.id)
    work_id = await claim(worker, pool)
    work = worker.beta.environments.work
    first = await work.heartbeat(
        work_id, environment_id=pool.id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=30
    )
    assert (first.state, first.lease_extended, first.ttl_seconds) == ("active", True, 30)
    item = emulator.state.work[work_id]
    assert item.started_at == first.last_heartbeat == item.latest_heartbeat_at

    second = await work.heartbeat(work_id, environment_id=pool.id, expected_last_heartbeat=first.last_heartbeat)
    assert second.last_heartbeat != first.last_heartbeat
    assert second.ttl_seconds == 90  # the default when no TTL is asked for

    # A stale echo, or a second claimer, meets the precondition.
    for stale in ("NO_HEARTBEAT", first.last_heartbeat):
        with pytest.raises(anthropic.PreconditionFailedError) as caught:
            await work.heartbeat(work_id, environment_id=pool.id, expected_last_heartbeat=stale)
        assert caught.value.error_code == "heartbeat_precondition_failed"
        assert error_of(caught.value)["details"]["current_state"] == {
            "last_heartbeat": second.last_heartbeat,
            "lease_extended": False,
            "state": "active",
            "ttl_seconds": 90,
        }
    assert emulator.state.work[work_id].latest_heartbeat_at == second.last_heartbeat

    huge = await work.heartbeat(work_id, environment_id=pool.id, desired_ttl_seconds=10**6)
    assert huge.ttl_seconds == 3600


# (desired_ttl_seconds as sent, the TTL applied): the reference gives no range, so none is refused.
TTL_CLAMPS = [
    ("0", 1),
    ("-5", 1),
    ("1", 1),
    ("3600", 3600),
    ("3601", 3600),
    (str(2**63), 3600),
    ("9" * 5000, 3600),  # more digits than int() converts
    ("-" + "9" * 5000, 1),
    ("0" * 5000 + "42", 42),
]


async def test_heartbeat_clamps_an_out_of_range_ttl_and_reports_the_applied_one() -> None:
    clock = ManualClock()
    async with running_queue(clock=clock) as queue:
        work_id = queue.items[0].id
        assert await queue.work.poll(queue.pool.id) is not None
        await queue.work.ack(work_id, environment_id=queue.pool.id)
        item = queue.emulator.state.work[work_id]
        for desired, applied in TTL_CLAMPS:
            # As a string through extra_query: the SDK's int parameter cannot carry 5000 digits.
            beat = await queue.work.heartbeat(
                work_id, environment_id=queue.pool.id, extra_query={"desired_ttl_seconds": desired}
            )
            assert (beat.lease_extended, beat.ttl_seconds) == (True, applied), desired[:12]
            assert item.lease_expires_at == clock.now + applied
        zero = await queue.work.heartbeat(work_id, environment_id=queue.pool.id, desired_ttl_seconds=0)
        assert zero.ttl_seconds == 1
        # Not an integer at all is still refused, and leaves the lease as it was.
        with pytest.raises(anthropic.BadRequestError, match="desired_ttl_seconds: expected an integer"):
            await queue.work.heartbeat(
                work_id, environment_id=queue.pool.id, extra_query={"desired_ttl_seconds": "ten"}
            )
        assert item.lease_ttl_seconds == 1


async def test_heartbeat_of_a_queued_item_is_a_lost_lease(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    with pytest.raises(anthropic.PreconditionFailedError) as caught:
        await worker.beta.environments.work.heartbeat(
            item.id, environment_id=pool.id, expected_last_heartbeat="NO_HEARTBEAT"
        )
    assert error_of(caught.value)["details"]["current_state"]["state"] == "queued"
    assert emulator.state.work[item.id].state == "queued"


async def test_graceful_stop_then_second_stop_then_409(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    enqueue_sessions(emulator, pool.id)
    work_id = await claim(worker, pool)
    work = worker.beta.environments.work
    beat = await work.heartbeat(work_id, environment_id=pool.id, expected_last_heartbeat="NO_HEARTBEAT")

    stopping = await work.stop(work_id, environment_id=pool.id)
    assert stopping.state == "stopping"
    assert stopping.stop_requested_at is not None and stopping.stopped_at is None
    # The holder learns of the stop from its next beat; the precondition is not compared any more.
    told = await work.heartbeat(work_id, environment_id=pool.id, expected_last_heartbeat="whatever")
    assert (told.state, told.lease_extended) == ("stopping", True)
    assert told.last_heartbeat != beat.last_heartbeat

    stopped = await work.stop(work_id, environment_id=pool.id)
    assert stopped.state == "stopped"
    assert stopped.stopped_at is not None
    assert stopped.stop_requested_at == stopping.stop_requested_at
    after = await work.heartbeat(work_id, environment_id=pool.id, expected_last_heartbeat="NO_HEARTBEAT")
    assert (after.state, after.lease_extended) == ("stopped", False)

    with pytest.raises(anthropic.ConflictError, match="already stopped"):
        await work.stop(work_id, environment_id=pool.id)
    with pytest.raises(anthropic.ConflictError):
        await work.stop(work_id, environment_id=pool.id, force=True)


async def test_force_stop_and_stop_of_a_queued_item(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    running, queued = enqueue_sessions(emulator, pool.id, count=2)
    work_id = await claim(worker, pool)
    assert work_id == running.id
    forced = await worker.beta.environments.work.stop(work_id, environment_id=pool.id, force=True)
    assert forced.state == "stopped"
    assert forced.stop_requested_at is not None and forced.stopped_at is not None

    # Nobody runs a queued item, so even a graceful stop finishes it, and it leaves the queue.
    stopped = await worker.beta.environments.work.stop(queued.id, environment_id=pool.id)
    assert stopped.state == "stopped"
    assert await worker.beta.environments.work.poll(pool.id) is None


async def test_work_metadata_update_merges_and_null_deletes(
    emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    work = api.beta.environments.work
    first = await work.update(item.id, environment_id=pool.id, metadata={"pod": "p-1", "node": "n-1"})
    assert first.metadata == {"pod": "p-1", "node": "n-1"}
    second = await work.update(item.id, environment_id=pool.id, metadata={"pod": None, "zone": "z"})
    assert second.metadata == {"node": "n-1", "zone": "z"}
    assert (await work.retrieve(item.id, environment_id=pool.id)).metadata == second.metadata


async def test_work_list_paginates_newest_first(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    items = enqueue_sessions(emulator, pool.id, count=5)
    page = await worker.beta.environments.work.list(pool.id, limit=2)
    assert [item.id for item in page.data] == [item.id for item in items[::-1][:2]]
    listed = [item.id async for item in worker.beta.environments.work.list(pool.id, limit=2)]
    assert listed == [item.id for item in items[::-1]]


async def test_work_of_another_environment_is_not_found(
    emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    other = self_hosted_environment(emulator, "other")
    (item,) = enqueue_sessions(emulator, other.id)
    with pytest.raises(anthropic.NotFoundError):
        await api.beta.environments.work.retrieve(item.id, environment_id=pool.id)


async def test_stats_count_depth_pending_and_distinct_workers() -> None:
    clock = ManualClock()
    async with running_emulator(clock=clock) as emulator:
        pool = self_hosted_environment(emulator)
        items = enqueue_sessions(emulator, pool.id, count=4)
        async with environment_client(emulator, pool) as worker:
            work = worker.beta.environments.work
            await work.poll(pool.id, anthropic_worker_id="worker-a")
            await work.poll(pool.id, anthropic_worker_id="worker-b")
            clock.advance(1)
            await work.poll(pool.id, anthropic_worker_id="worker-a")
            await work.ack(items[0].id, environment_id=pool.id)
            stats = await work.stats(pool.id)
            # items[1] and items[2] were delivered but not acked; items[3] was never delivered.
            assert (stats.depth, stats.pending, stats.workers_polling) == (1, 2, 2)
            assert stats.oldest_queued_at == items[1].created_at
            clock.advance(29.5)
            assert (await work.stats(pool.id)).workers_polling == 1
            clock.advance(1)
            assert (await work.stats(pool.id)).workers_polling == 0


async def test_deleting_the_environment_ends_blocked_polls_with_404(
    api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    waiting = asyncio.create_task(worker.beta.environments.work.poll(pool.id, block_ms=999))
    await asyncio.sleep(0.05)
    await api.beta.environments.delete(pool.id)
    with pytest.raises(anthropic.NotFoundError):
        await asyncio.wait_for(waiting, timeout=0.5)


async def test_stopping_the_emulator_answers_pending_long_polls_at_once() -> None:
    async with running_queue(items=0) as queue:
        polls = [asyncio.create_task(queue.work.poll(queue.pool.id, block_ms=999)) for _ in range(20)]
        async with asyncio.timeout(5):
            while queue.emulator.state.environments[queue.pool.id].queue.waiting < len(polls):
                await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await queue.emulator.stop()
        assert await asyncio.gather(*polls) == [None] * len(polls)
        assert loop.time() - started < 0.5


async def test_archived_environment_still_serves_its_queued_work(
    emulator: EmulatorServer, api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    await api.beta.environments.archive(pool.id)
    polled = await worker.beta.environments.work.poll(pool.id)
    assert polled is not None and polled.id == item.id
    assert (await worker.beta.environments.work.ack(item.id, environment_id=pool.id)).state == "starting"


async def test_requests_are_counted_by_route(
    emulator: EmulatorServer, api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    await worker.beta.environments.work.poll(pool.id)
    await worker.beta.environments.work.poll(pool.id)
    await api.beta.environments.retrieve(pool.id)
    with pytest.raises(anthropic.NotFoundError):
        await api.get("/v1/no-such-route", cast_to=object)
    emulator.state.create_environment({"name": "in-process", "config": {"type": "cloud"}})  # not a request
    assert dict(emulator.requests) == {"work.poll": 2, "environments.retrieve": 1, "unmatched": 1}
