"""Many pollers at once: every item is claimed exactly once, none is lost, long-polls wake promptly."""

from __future__ import annotations

import asyncio
from collections import Counter

from anthropic import AsyncAnthropic

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import SelfHostedEnvironment, enqueue_sessions, environment_client

ITEMS = 1000
POLLERS = 16
LONG_POLLERS = 300


async def test_1000_items_16_sdk_pollers_each_claimed_exactly_once(
    emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    queued = {item.id for item in enqueue_sessions(emulator, pool.id, count=ITEMS)}

    async def drain(worker_id: str) -> list[str]:
        return [
            item.id
            async for item in api.beta.environments.work.poller(
                environment_id=pool.id,
                environment_key=pool.key,
                worker_id=worker_id,
                drain=True,
                auto_stop=False,
                block_ms=None,
            )
        ]

    claims = await asyncio.wait_for(asyncio.gather(*(drain(f"poller-{index}") for index in range(POLLERS))), timeout=45)
    counts = Counter(work_id for claimed in claims for work_id in claimed)
    assert set(counts) == queued
    assert max(counts.values()) == 1
    # Work spread over the pollers rather than one taking everything.
    assert sum(1 for claimed in claims if claimed) > POLLERS // 2
    assert {item.state for item in emulator.state.work.values()} == {"starting"}
    async with environment_client(emulator, pool) as worker:
        stats = await worker.beta.environments.work.stats(pool.id)
    assert (stats.depth, stats.pending, stats.workers_polling) == (0, 0, POLLERS)


async def test_hundreds_of_blocked_long_polls_each_get_one_new_item(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    queue = emulator.state.environments[pool.id].queue
    empty_polls = 0

    async def poll_until_claimed() -> str:
        nonlocal empty_polls
        while True:
            item = await worker.beta.environments.work.poll(pool.id, block_ms=999)
            if item is not None:
                return item.id
            empty_polls += 1

    pollers = [asyncio.create_task(poll_until_claimed()) for _ in range(LONG_POLLERS)]
    async with asyncio.timeout(10):
        while queue.waiting < LONG_POLLERS:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    items = enqueue_sessions(emulator, pool.id, count=LONG_POLLERS)
    claimed = await asyncio.wait_for(asyncio.gather(*pollers), timeout=20)
    elapsed = loop.time() - started

    assert sorted(claimed) == sorted(item.id for item in items)
    # Waiters are woken one per item, so they do not all re-poll empty-handed.
    assert empty_polls < LONG_POLLERS // 2
    assert elapsed < 5
    assert queue.waiting == 0
