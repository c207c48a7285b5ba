"""Credentials: API key vs environment key vs a work item's sessions token, classified by value."""

from __future__ import annotations

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
    sessions_token,
)


async def test_api_key_is_accepted_as_x_api_key_and_as_bearer(emulator: EmulatorServer) -> None:
    async with aiohttp.ClientSession(base_url=emulator.base_url) as http:
        for headers in ({"x-api-key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
            async with http.get("/v1/environments", headers=headers) as response:
                assert response.status == 200
                assert await response.json() == {"data": [], "next_page": None}


async def test_only_listed_api_keys_are_accepted(emulator: EmulatorServer) -> None:
    async with api_client(emulator, api_key="sk-ant-someone-else") as stranger:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await stranger.beta.environments.list()
    assert error_of(caught.value) == {"type": "authentication_error", "message": "invalid API key"}


async def test_any_api_key_is_accepted_without_a_list() -> None:
    async with running_emulator(api_keys=None) as emulator, api_client(emulator, api_key="anything") as client:
        assert (await client.beta.environments.create(name="x")).name == "x"


async def test_environment_key_is_issued_over_http_for_self_hosted_only(
    emulator: EmulatorServer, api: AsyncAnthropic
) -> None:
    environment = await api.beta.environments.create(name="pool", config={"type": "self_hosted"})
    async with aiohttp.ClientSession(base_url=emulator.base_url) as http:
        path = f"/_emulator/environments/{environment.id}/environment-key"
        async with http.post(path, headers={"x-api-key": API_KEY}) as response:
            assert response.status == 200
            body = await response.json()
        assert set(body) == {"environment_key"}
        async with http.post(path, headers={"Authorization": f"Bearer {body['environment_key']}"}) as response:
            assert response.status == 403
    async with environment_client(emulator, body["environment_key"]) as worker:
        assert await worker.beta.environments.work.poll(environment.id) is None


async def test_environment_key_is_refused_where_an_api_key_is_required(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    with pytest.raises(anthropic.PermissionDeniedError, match="takes an API key"):
        await worker.beta.environments.retrieve(pool.id)
    with pytest.raises(anthropic.PermissionDeniedError, match="takes an API key"):
        await worker.beta.environments.work.retrieve(item.id, environment_id=pool.id)
    assert emulator.state.work[item.id].state == "queued"


async def test_api_key_is_refused_on_poll_ack_heartbeat_and_list(
    emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    (item,) = enqueue_sessions(emulator, pool.id)
    work = api.beta.environments.work
    refusal = f"takes the environment key of {pool.id}, not an API key"
    with pytest.raises(anthropic.PermissionDeniedError, match=refusal):
        await work.poll(pool.id)
    with pytest.raises(anthropic.PermissionDeniedError, match=refusal):
        await work.ack(item.id, environment_id=pool.id)
    with pytest.raises(anthropic.PermissionDeniedError, match=refusal):
        await work.heartbeat(item.id, environment_id=pool.id)
    with pytest.raises(anthropic.PermissionDeniedError, match=refusal):
        await work.list(pool.id)
    assert emulator.state.work[item.id].state == "queued"
    assert emulator.state.work[item.id].delivery_count == 0


async def test_api_key_reads_stats_and_stops_work_as_the_sdk_workspace_header_implies(
    emulator: EmulatorServer, api: AsyncAnthropic, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    running, queued = enqueue_sessions(emulator, pool.id, count=2)
    work = api.beta.environments.work
    # The SDK sends workspace_id as the anthropic-workspace-id header; the emulator has one workspace.
    workspace = "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ"
    response = await work.with_raw_response.stats(pool.id, workspace_id=workspace)
    assert response.http_request.headers["anthropic-workspace-id"] == workspace
    stats = await response.parse()
    assert (stats.depth, stats.pending, stats.workers_polling) == (2, 0, 0)

    polled = await worker.beta.environments.work.poll(pool.id)
    assert polled is not None and polled.id == running.id
    await worker.beta.environments.work.ack(running.id, environment_id=pool.id)
    await worker.beta.environments.work.heartbeat(running.id, environment_id=pool.id)
    assert (await work.stats(pool.id)).depth == 1

    stopping = await work.stop(running.id, environment_id=pool.id, workspace_id=workspace)
    assert stopping.state == "stopping"
    assert (await work.stop(running.id, environment_id=pool.id, force=True)).state == "stopped"
    assert (await work.stop(queued.id, environment_id=pool.id)).state == "stopped"
    assert (await work.stats(pool.id)).depth == 0
    # The environment key still serves both (that stop is a 409, not a 403).
    assert (await worker.beta.environments.work.stats(pool.id)).depth == 0
    with pytest.raises(anthropic.ConflictError, match="already stopped"):
        await worker.beta.environments.work.stop(queued.id, environment_id=pool.id)

    # An API key spans environments: a cloud environment's queue is readable, and always empty.
    cloud = await api.beta.environments.create(name="cloud")
    assert (await work.stats(cloud.id)).depth == 0


async def test_sessions_token_is_refused_on_stats(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    enqueue_sessions(emulator, pool.id)
    polled = await worker.beta.environments.work.poll(pool.id)
    assert polled is not None and polled.secret is not None
    async with environment_client(emulator, sessions_token(polled.secret)) as pod:
        with pytest.raises(
            anthropic.PermissionDeniedError, match=f"takes the environment key of {pool.id} or an API key"
        ):
            await pod.beta.environments.work.stats(pool.id)


async def test_environment_key_is_bound_to_its_environment(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    other = self_hosted_environment(emulator, "other")
    (item,) = enqueue_sessions(emulator, other.id)
    with pytest.raises(anthropic.PermissionDeniedError, match="another environment"):
        await worker.beta.environments.work.poll(other.id)
    with pytest.raises(anthropic.PermissionDeniedError, match="another environment"):
        await worker.beta.environments.work.ack(item.id, environment_id=other.id)
    assert emulator.state.work[item.id].state == "queued"


async def test_sessions_token_serves_only_its_own_work_item(
    emulator: EmulatorServer, worker: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    mine, theirs = enqueue_sessions(emulator, pool.id, count=2)
    polled = await worker.beta.environments.work.poll(pool.id)
    assert polled is not None and polled.id == mine.id and polled.secret is not None
    await worker.beta.environments.work.ack(mine.id, environment_id=pool.id)
    async with environment_client(emulator, sessions_token(polled.secret)) as pod:
        beat = await pod.beta.environments.work.heartbeat(mine.id, environment_id=pool.id)
        assert beat.state == "active"
        assert (await pod.beta.sessions.retrieve(mine.session_id)).id == mine.session_id
        with pytest.raises(anthropic.PermissionDeniedError, match="another work item"):
            await pod.beta.environments.work.stop(theirs.id, environment_id=pool.id)
        with pytest.raises(anthropic.PermissionDeniedError):
            await pod.beta.sessions.retrieve(theirs.session_id)
        with pytest.raises(anthropic.PermissionDeniedError):
            await pod.beta.environments.work.poll(pool.id)
        with pytest.raises(anthropic.PermissionDeniedError):
            await pod.beta.environments.list()
        assert (await pod.beta.environments.work.stop(mine.id, environment_id=pool.id, force=True)).state == "stopped"
    assert emulator.state.work[theirs.id].state == "queued"


async def test_unknown_or_revoked_environment_key_is_401(
    emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
) -> None:
    async with environment_client(emulator, "sk-ant-envkey-made-up") as forged:
        with pytest.raises(anthropic.AuthenticationError, match="invalid environment key"):
            await forged.beta.environments.work.poll(pool.id)
    await api.beta.environments.delete(pool.id)
    async with environment_client(emulator, pool) as revoked:
        with pytest.raises(anthropic.AuthenticationError, match="invalid environment key"):
            await revoked.beta.environments.work.poll(pool.id)


async def test_malformed_authorization_header_is_401(emulator: EmulatorServer) -> None:
    async with aiohttp.ClientSession(base_url=emulator.base_url) as http:
        async with http.get("/v1/environments", headers={"Authorization": f"Basic {API_KEY}"}) as response:
            assert response.status == 401
            assert "Bearer" in (await response.json())["error"]["message"]
