"""Fault injection: error rates, 429 bursts with retry-after, added latency, dropped connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import pytest
from anthropic import AsyncAnthropic

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import (
    API_KEY,
    SelfHostedEnvironment,
    api_client,
    enqueue_sessions,
    environment_client,
    error_of,
    running_emulator,
    self_hosted_environment,
)


@pytest.fixture
async def http(emulator: EmulatorServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=emulator.base_url, headers={"x-api-key": API_KEY}) as session:
        yield session


async def set_faults(http: aiohttp.ClientSession, *rules: dict[str, object], seed: int | None = None) -> None:
    document: dict[str, object] = {"faults": list(rules)}
    if seed is not None:
        document["seed"] = seed
    async with http.post("/_emulator/faults", json=document) as response:
        assert response.status == 200, await response.text()


async def test_error_rate_fails_about_that_share_of_requests(
    http: aiohttp.ClientSession, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    await set_faults(http, {"route": "work.poll", "effect": "error", "status": 503, "rate": 0.3}, seed=7)
    failures = 0
    for _ in range(200):
        try:
            await worker.beta.environments.work.poll(pool.id)
        except anthropic.APIStatusError as error:
            assert error.status_code == 503
            assert error_of(error)["type"] == "overloaded_error"
            failures += 1
    assert 30 <= failures <= 90
    # Other routes are untouched.
    await worker.beta.environments.work.stats(pool.id)


async def test_429_burst_carries_retry_after_and_the_sdk_rides_it_out(
    emulator: EmulatorServer, http: aiohttp.ClientSession, pool: SelfHostedEnvironment
) -> None:
    await set_faults(http, {"route": "work.stats", "effect": "error", "status": 429, "retry_after_ms": 50, "times": 2})
    async with http.get(
        f"/v1/environments/{pool.id}/work/stats", headers={"x-api-key": "", "Authorization": f"Bearer {pool.key}"}
    ) as response:
        assert response.status == 429
        assert response.headers["retry-after"] == "1"
        assert response.headers["retry-after-ms"] == "50"
        assert (await response.json())["error"]["type"] == "rate_limit_error"
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with environment_client(emulator, pool, max_retries=2) as patient:
        stats = await patient.beta.environments.work.stats(pool.id)
    assert stats.type == "work_queue_stats"
    # One 429 was left, and the SDK waited its 50 ms rather than its default backoff.
    assert loop.time() - started < 0.4
    assert emulator.faults.rules == []


async def test_latency_delays_only_the_matching_route(
    http: aiohttp.ClientSession, api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    await set_faults(http, {"route": "environments.list", "effect": "latency", "latency_ms": 300})
    loop = asyncio.get_running_loop()
    started = loop.time()
    await api.beta.environments.list()
    assert loop.time() - started >= 0.3
    started = loop.time()
    await worker.beta.environments.work.poll(pool.id)
    assert loop.time() - started < 0.25


async def test_drop_before_changes_nothing(
    emulator: EmulatorServer, http: aiohttp.ClientSession, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    await set_faults(http, {"route": "work.ack", "effect": "drop", "times": 1})
    with pytest.raises(anthropic.APIConnectionError):
        await worker.beta.environments.work.ack(item.id, environment_id=pool.id)
    assert emulator.state.work[item.id].state == "queued"
    assert (await worker.beta.environments.work.ack(item.id, environment_id=pool.id)).state == "starting"


async def test_drop_after_ack_takes_effect_and_the_sdk_retry_is_idempotent(
    emulator: EmulatorServer, http: aiohttp.ClientSession, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    await set_faults(http, {"route": "work.ack", "effect": "drop", "when": "after", "times": 1})
    async with environment_client(emulator, pool, max_retries=1) as worker:
        acked = await worker.beta.environments.work.ack(item.id, environment_id=pool.id)
    assert acked.state == "starting"
    assert emulator.state.work[item.id].state == "starting"


async def test_error_after_stop_still_stops(
    emulator: EmulatorServer, http: aiohttp.ClientSession, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    await set_faults(http, {"route": "work.stop", "effect": "error", "status": 500, "when": "after"})
    with pytest.raises(anthropic.InternalServerError):
        await worker.beta.environments.work.stop(item.id, environment_id=pool.id, force=True)
    assert emulator.state.work[item.id].state == "stopped"


async def test_faults_are_listed_and_cleared(http: aiohttp.ClientSession, api: AsyncAnthropic) -> None:
    await set_faults(http, {"route": "*", "effect": "error", "status": 500})
    with pytest.raises(anthropic.InternalServerError):
        await api.beta.environments.list()
    async with http.get("/_emulator/faults") as response:
        listed = (await response.json())["faults"]
    assert [(rule["route"], rule["effect"], rule["status"], rule["fired"]) for rule in listed] == [
        ("*", "error", 500, 1)
    ]
    # The emulator's own routes are never faulted, so faults can always be cleared.
    async with http.delete("/_emulator/faults") as response:
        assert response.status == 200
    assert (await api.beta.environments.list()).data == []


async def test_faults_can_be_configured_at_start() -> None:
    faults = {"faults": [{"route": "environments.create", "effect": "error", "status": 529, "times": 1}]}
    async with running_emulator(faults=faults) as emulator, api_client(emulator) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.beta.environments.create(name="x")
        assert caught.value.status_code == 529
        assert (await client.beta.environments.create(name="x")).name == "x"
        pool = self_hosted_environment(emulator)
        assert pool.id in emulator.state.environments
