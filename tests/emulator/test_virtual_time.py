"""The emulator's state under looptime: leases and reclaims follow the loop's (virtual) clock.

No sockets here: the state is driven directly, so an hour of leases passes in no real time. This is
how other suites can test timeouts against the emulator's semantics without waiting for them.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from environments_operator.emulator.state import EmulatorState


def queue_one(state: EmulatorState) -> tuple[str, str]:
    environment = state.create_environment({"name": "pool", "config": {"type": "self_hosted"}})
    _, item = state.create_session({"agent": "agent_1", "environment_id": environment.id})
    assert item is not None
    return environment.id, item.id


@pytest.mark.looptime
async def test_lease_expires_and_reclaim_waits_in_virtual_time() -> None:
    loop = asyncio.get_running_loop()
    wall_started = time.monotonic()
    state = EmulatorState()
    environment_id, work_id = queue_one(state)
    assert await state.poll(environment_id, block_ms=None, reclaim_ms=None, worker_id="w") is not None
    state.ack(environment_id, work_id)
    state.heartbeat(environment_id, work_id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=3600)

    await asyncio.sleep(3599)
    assert state.work[work_id].state == "active"
    await asyncio.sleep(2)
    assert state.work[work_id].state == "queued"  # the lease timer fired on the virtual clock

    assert await state.poll(environment_id, block_ms=999, reclaim_ms=None, worker_id="w") is not None
    started = loop.time()
    polls = 0
    while await state.poll(environment_id, block_ms=999, reclaim_ms=None, worker_id="w") is None:
        polls += 1
    # Un-acked, it comes back after the default 5000 ms: five empty long-polls and a bit.
    assert loop.time() - started == pytest.approx(5.0, abs=0.01)
    assert polls == 5
    assert time.monotonic() - wall_started < 2
