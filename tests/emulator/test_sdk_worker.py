"""The SDK's own worker pieces against the emulator: EnvironmentWorker's lease heartbeat and handle_item.

``_heartbeat_loop`` and ``_Lease`` are the SDK's private building blocks of ``EnvironmentWorker``; they
are driven here directly because the full worker would also run an agent session. The heartbeat
loop beats every ``max(1, ttl / 2)`` seconds, so the emulator's default lease TTL is 2 s here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from anthropic.lib.environments import EnvironmentWorker
from anthropic.lib.environments._worker import _heartbeat_loop, _Lease, _LeaseEndReason

from tests.harness.emulator import (
    QueueSetup,
    api_client,
    environment_client,
    running_queue,
    sessions_token,
)

LEASE_TTL_SECONDS = 2


@dataclass(frozen=True)
class Claimed:
    work_id: str
    session_id: str
    secret: str


async def claim_with_sdk_poller(queue: QueueSetup) -> Claimed:
    """Claim one queued item the way the operator does: the SDK poller in drain-and-dispatch shape."""
    async with api_client(queue.emulator) as client:
        async for item in client.beta.environments.work.poller(
            environment_id=queue.pool.id, environment_key=queue.pool.key, drain=True, auto_stop=False, block_ms=None
        ):
            assert item.secret is not None
            return Claimed(item.id, item.data.id, item.secret)
    raise AssertionError("nothing to claim")


@dataclass(frozen=True)
class Heartbeating:
    queue: QueueSetup
    claimed: Claimed
    lease: _Lease
    loop: asyncio.Task[None]

    async def beats(self, count: int, *, timeout: float = 5.0) -> None:
        """Wait until the emulator has recorded ``count`` distinct heartbeats of the item."""
        seen: set[str] = set()
        async with asyncio.timeout(timeout):
            while len(seen) < count:
                beat = self.queue.emulator.state.work[self.claimed.work_id].latest_heartbeat_at
                if beat is not None:
                    seen.add(beat)
                await asyncio.sleep(0.02)


@asynccontextmanager
async def heartbeating() -> AsyncIterator[Heartbeating]:
    """A claimed item whose lease the SDK's heartbeat loop holds, on the pod's credential alone."""
    async with running_queue(default_lease_ttl_seconds=LEASE_TTL_SECONDS) as queue:
        claimed = await claim_with_sdk_poller(queue)
        lease = _Lease()
        # The pod's credential: the sessions token from the item's secret, not the environment key.
        async with environment_client(queue.emulator, sessions_token(claimed.secret)) as pod:
            loop = asyncio.create_task(
                _heartbeat_loop(
                    pod.beta.environments.work, work_id=claimed.work_id, environment_id=queue.pool.id, lease=lease
                )
            )
            try:
                yield Heartbeating(queue, claimed, lease, loop)
            finally:
                lease.finish(_LeaseEndReason.RUNNER_DONE)
                await asyncio.wait_for(loop, timeout=5)


async def test_heartbeat_loop_holds_the_lease_then_sees_the_stop() -> None:
    async with heartbeating() as running:
        await running.beats(2)
        item = running.queue.emulator.state.work[running.claimed.work_id]
        assert item.state == "active" and not running.lease.ended
        assert item.lease_ttl_seconds == LEASE_TTL_SECONDS
        await running.queue.work.stop(item.id, environment_id=running.queue.pool.id)
        await asyncio.wait_for(asyncio.shield(running.loop), timeout=3)
        assert running.lease._end_reason is _LeaseEndReason.HEARTBEAT_STOP
        assert not running.lease.lost


async def test_heartbeat_loop_detects_a_lost_lease() -> None:
    async with heartbeating() as running:
        await running.beats(1)
        queue, work_id = running.queue, running.claimed.work_id
        # The lease runs out (say the pod was partitioned), and another worker takes the item.
        queue.emulator.state.expire_lease(work_id)
        assert (await claim_with_sdk_poller(queue)).work_id == work_id
        await queue.work.heartbeat(work_id, environment_id=queue.pool.id, expected_last_heartbeat="NO_HEARTBEAT")
        await asyncio.wait_for(asyncio.shield(running.loop), timeout=3)
        assert running.lease._end_reason is _LeaseEndReason.LEASE_LOST
        assert running.lease.lost
        assert queue.emulator.state.work[work_id].state == "active"


async def test_handle_item_runs_on_the_work_secret_alone(tmp_path: Path) -> None:
    async with running_queue(default_lease_ttl_seconds=LEASE_TTL_SECONDS) as queue:
        claimed = await claim_with_sdk_poller(queue)
        # A terminated session has nothing to run: the worker retrieves it, then force-stops the item.
        queue.emulator.state.sessions[claimed.session_id].status = "terminated"
        async with api_client(queue.emulator, api_key="not-used-by-the-per-item-calls") as client:
            worker = EnvironmentWorker(client, workdir=tmp_path, memory_sync_interval=None)
            await asyncio.wait_for(
                worker.handle_item(
                    work_id=claimed.work_id,
                    environment_id=queue.pool.id,
                    session_id=claimed.session_id,
                    work_secret=claimed.secret,
                ),
                timeout=5,
            )
        item = queue.emulator.state.work[claimed.work_id]
        assert item.state == "stopped"
        assert item.stopped_at is not None
