"""Reclaim of un-acked items and expiry of heartbeat leases, on short real timeouts or a manual clock."""

from __future__ import annotations

import asyncio

import anthropic
import pytest

from tests.harness.emulator import ManualClock, QueueSetup, error_of, running_queue


async def claim_and_beat(queue: QueueSetup, *, ttl: int) -> str:
    """Poll, ack and send the first heartbeat with lease TTL ``ttl``; returns the last_heartbeat."""
    work_id = queue.items[0].id
    item = await queue.work.poll(queue.pool.id)
    assert item is not None and item.id == work_id
    await queue.work.ack(work_id, environment_id=queue.pool.id)
    beat = await queue.work.heartbeat(
        work_id, environment_id=queue.pool.id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=ttl
    )
    return beat.last_heartbeat


async def test_unacked_item_is_reclaimed_after_the_default_5000_ms() -> None:
    clock = ManualClock()
    async with running_queue(clock=clock) as queue:
        first = await queue.work.poll(queue.pool.id)
        assert first is not None and first.id == queue.items[0].id
        clock.advance(4.999)
        assert await queue.work.poll(queue.pool.id) is None
        clock.advance(0.001)
        again = await queue.work.poll(queue.pool.id)
        assert again is not None and again.id == first.id
        # The same per-item secret on every delivery: a pod made from the first one keeps working.
        assert again.secret == first.secret
        assert queue.items[0].delivery_count == 2


async def test_blocking_poll_wakes_when_a_short_reclaim_window_passes() -> None:
    async with running_queue() as queue:
        assert await queue.work.poll(queue.pool.id, reclaim_older_than_ms=150) is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        again = await queue.work.poll(queue.pool.id, block_ms=999, reclaim_older_than_ms=150)
        elapsed = loop.time() - started
        assert again is not None and again.id == queue.items[0].id
        assert 0.1 <= elapsed < 0.6


async def test_acked_item_is_never_reclaimed() -> None:
    clock = ManualClock()
    async with running_queue(clock=clock) as queue:
        await queue.work.poll(queue.pool.id)
        await queue.work.ack(queue.items[0].id, environment_id=queue.pool.id)
        clock.advance(3600)
        assert await queue.work.poll(queue.pool.id, reclaim_older_than_ms=0) is None
        assert queue.items[0].state == "starting"


async def test_expired_lease_requeues_at_the_front_and_the_old_holder_gets_412() -> None:
    clock = ManualClock()
    async with running_queue(items=2, clock=clock) as queue:
        first, second = queue.items
        last_heartbeat = await claim_and_beat(queue, ttl=5)
        clock.advance(4.9)
        assert queue.emulator.state.get_work(queue.pool.id, first.id).state == "active"
        clock.advance(0.1)
        stats = await queue.work.stats(queue.pool.id)
        assert (stats.depth, stats.pending) == (2, 0)
        with pytest.raises(anthropic.PreconditionFailedError) as caught:
            await queue.work.heartbeat(first.id, environment_id=queue.pool.id, expected_last_heartbeat=last_heartbeat)
        assert error_of(caught.value)["details"]["current_state"]["state"] == "queued"
        requeued = await queue.work.poll(queue.pool.id)
        assert requeued is not None and requeued.id == first.id
        assert (requeued.state, requeued.acknowledged_at, requeued.started_at, requeued.latest_heartbeat_at) == (
            "queued",
            None,
            None,
            None,
        )
        assert second.state == "queued"


async def test_lease_timer_requeues_in_real_time_and_wakes_a_blocked_poll() -> None:
    async with running_queue() as queue:
        await claim_and_beat(queue, ttl=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(0.5)
        assert await queue.work.poll(queue.pool.id) is None
        reclaimed = await queue.work.poll(queue.pool.id, block_ms=999)
        assert reclaimed is not None and reclaimed.id == queue.items[0].id
        assert 0.9 <= loop.time() - started < 1.5


async def test_expired_lease_of_a_stopping_item_stops_it() -> None:
    clock = ManualClock()
    async with running_queue(clock=clock) as queue:
        await claim_and_beat(queue, ttl=2)
        await queue.work.stop(queue.items[0].id, environment_id=queue.pool.id)
        clock.advance(2)
        listed = [entry async for entry in queue.work.list(queue.pool.id)]
        assert [(entry.id, entry.state) for entry in listed] == [(queue.items[0].id, "stopped")]
        assert await queue.work.poll(queue.pool.id) is None
