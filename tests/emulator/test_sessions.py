"""Scripted agents and session events, through the SDK's sessions resource (list, stream, send).

The SDK parses every event into its ``BetaManagedAgents*Event`` models, so a shape the emulator got
wrong fails here as a parse error or a missing attribute.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from anthropic import AsyncAnthropic, PermissionDeniedError

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import AGENT_ID, SelfHostedEnvironment, environment_client, sessions_token
from tests.harness.sessions import scripted_agent, session_events

TWO_STEPS = [
    {"tool": "write", "input": {"file_path": "a.txt", "content": "a"}},
    {"tool": "bash", "input": {"command": "cat a.txt"}},
]


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


async def answer(client: AsyncAnthropic, session_id: str, tool_use_id: str, output: str = "ok") -> None:
    await client.beta.sessions.events.send(
        session_id, events=[{"type": "user.tool_result", "tool_use_id": tool_use_id, "content": [text(output)]}]
    )


async def open_tool_use(client: AsyncAnthropic, session_id: str) -> str:
    """The tool_use the session waits on, read from its last ``requires_action`` idle."""
    last = (await session_events(client, session_id))[-1]
    assert last.type == "session.status_idle" and last.stop_reason.type == "requires_action", last
    (tool_use_id,) = last.stop_reason.event_ids
    return tool_use_id


class TestScriptedTurn:
    async def test_the_turn_waits_on_each_result_then_replies_and_ends(
        self, emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
    ) -> None:
        agent = await scripted_agent(api, TWO_STEPS, reply="both done")
        session = await api.beta.sessions.create(agent=agent, environment_id=pool.id)
        events = await session_events(api, session.id)
        assert [event.type for event in events] == ["session.status_running", "agent.tool_use", "session.status_idle"]
        first = events[1]
        assert (first.name, first.input, first.evaluated_permission) == ("write", TWO_STEPS[0]["input"], "allow")
        assert events[2].stop_reason.event_ids == [first.id]
        assert (await api.beta.sessions.retrieve(session.id)).status == "idle"

        await answer(api, session.id, first.id)
        second = await open_tool_use(api, session.id)
        await answer(api, session.id, second, "a")

        events = await session_events(api, session.id)
        assert [event.type for event in events[3:]] == [
            "user.tool_result", "session.status_running", "agent.tool_use", "session.status_idle",
            "user.tool_result", "session.status_running", "agent.message", "session.status_idle",
        ]
        assert events[-2].content[0].text == "both done"
        assert events[-1].stop_reason.type == "end_turn"
        assert events[7].tool_use_id == second and events[7].content[0].text == "a"

    async def test_an_agent_never_scripted_has_an_empty_turn(
        self, api: AsyncAnthropic, pool: SelfHostedEnvironment
    ) -> None:
        session = await api.beta.sessions.create(agent=AGENT_ID, environment_id=pool.id)
        events = await session_events(api, session.id)
        assert [event.type for event in events] == ["session.status_running", "session.status_idle"]
        assert events[-1].stop_reason.type == "end_turn"

    async def test_initial_messages_come_before_the_first_turn(
        self, api: AsyncAnthropic, pool: SelfHostedEnvironment
    ) -> None:
        session = await api.post(
            "/v1/sessions",
            cast_to=object,
            body={"agent": AGENT_ID, "environment_id": pool.id,
                  "initial_events": [{"type": "user.message", "content": [text("hi")]}]},
        )
        assert isinstance(session, dict)
        events = await session_events(api, session["id"])
        assert events[0].type == "user.message" and events[0].content[0].text == "hi"
        assert events[1].type == "session.status_running"


class TestFollowUpMessages:
    async def test_a_message_to_an_idle_session_plays_the_script_again(
        self, emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
    ) -> None:
        session = await api.beta.sessions.create(agent=await scripted_agent(api, TWO_STEPS[:1]), environment_id=pool.id)
        await answer(api, session.id, await open_tool_use(api, session.id))
        await api.beta.sessions.events.send(session.id, events=[{"type": "user.message", "content": [text("more")]}])
        events = await session_events(api, session.id)
        assert [event.type for event in events].count("agent.tool_use") == 2
        # Its first work item is still queued: a worker will see the new turn, so nothing more is queued.
        assert len(emulator.state.work) == 1

    async def test_a_message_to_a_dormant_session_queues_a_new_work_item(
        self, emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment, worker: AsyncAnthropic
    ) -> None:
        session = await api.beta.sessions.create(agent=await scripted_agent(api, TWO_STEPS[:1]), environment_id=pool.id)
        (first,) = emulator.state.work.values()
        await worker.beta.environments.work.stop(first.id, environment_id=pool.id, force=True)
        await api.beta.sessions.events.send(session.id, events=[{"type": "user.message", "content": [text("more")]}])
        item = await worker.beta.environments.work.poll(pool.id, block_ms=100)
        assert item is not None and item.id != first.id and item.data.id == session.id

    async def test_a_message_to_a_session_whose_environment_is_gone_queues_nothing(
        self, emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment
    ) -> None:
        session = await api.beta.sessions.create(agent=AGENT_ID, environment_id=pool.id)
        await api.beta.environments.delete(pool.id)
        await api.beta.sessions.events.send(session.id, events=[{"type": "user.message", "content": [text("?")]}])
        assert emulator.state.work == {}
        assert [event.type for event in await session_events(api, session.id)][-1] == "session.status_idle"

    async def test_a_message_during_a_turn_is_played_after_it(
        self, api: AsyncAnthropic, pool: SelfHostedEnvironment
    ) -> None:
        session = await api.beta.sessions.create(agent=await scripted_agent(api, TWO_STEPS[:1]), environment_id=pool.id)
        tool_use = await open_tool_use(api, session.id)
        await api.beta.sessions.events.send(session.id, events=[{"type": "user.message", "content": [text("later")]}])
        assert [event.type for event in await session_events(api, session.id)].count("agent.tool_use") == 1
        await answer(api, session.id, tool_use)
        types = [event.type for event in await session_events(api, session.id)]
        assert types.count("agent.tool_use") == 2
        assert types.index("agent.message") < len(types) - 4  # the first turn ended before the second began


class TestEventsList:
    @pytest.fixture
    async def session_id(self, api: AsyncAnthropic, pool: SelfHostedEnvironment) -> str:
        session = await api.beta.sessions.create(agent=await scripted_agent(api, TWO_STEPS), environment_id=pool.id)
        await answer(api, session.id, await open_tool_use(api, session.id))
        await answer(api, session.id, await open_tool_use(api, session.id))
        return session.id

    async def test_pages_in_either_order_give_the_whole_log_once(self, api: AsyncAnthropic, session_id: str) -> None:
        everything = await session_events(api, session_id)
        assert len(everything) == 11
        assert [event.id for event in await session_events(api, session_id, page_size=3)] == [
            event.id for event in everything
        ]
        newest_first = [event async for event in api.beta.sessions.events.list(session_id, limit=4, order="desc")]
        assert [event.id for event in newest_first] == [event.id for event in reversed(everything)]

    async def test_types_and_time_bounds_filter(self, api: AsyncAnthropic, session_id: str) -> None:
        everything = await session_events(api, session_id)
        uses = [event async for event in api.beta.sessions.events.list(session_id, types=["agent.tool_use"])]
        assert [event.type for event in uses] == ["agent.tool_use"] * 2
        cut = everything[5].processed_at
        later = [event async for event in api.beta.sessions.events.list(session_id, created_at_gt=cut)]
        assert [event.id for event in later] == [event.id for event in everything if event.processed_at > cut]


class TestEventStream:
    async def test_the_stream_delivers_new_events_live(self, api: AsyncAnthropic, pool: SelfHostedEnvironment) -> None:
        session = await api.beta.sessions.create(agent=await scripted_agent(api, TWO_STEPS), environment_id=pool.id)
        tool_use = await open_tool_use(api, session.id)
        async with await api.beta.sessions.events.stream(session.id) as stream:
            await answer(api, session.id, tool_use)
            received = []
            async with asyncio.timeout(10):
                async for event in stream:
                    received.append(event)
                    if event.type == "session.status_idle":
                        break
        assert [event.type for event in received] == [
            "user.tool_result", "session.status_running", "agent.tool_use", "session.status_idle"
        ]
        assert received[2].name == "bash"


class TestCredentials:
    async def test_a_work_items_sessions_token_reaches_its_own_session_only(
        self, emulator: EmulatorServer, api: AsyncAnthropic, pool: SelfHostedEnvironment, worker: AsyncAnthropic
    ) -> None:
        agent = await scripted_agent(api, TWO_STEPS)
        mine = await api.beta.sessions.create(agent=agent, environment_id=pool.id)
        theirs = await api.beta.sessions.create(agent=agent, environment_id=pool.id)
        item = await worker.beta.environments.work.poll(pool.id, block_ms=100)
        assert item is not None and item.secret and item.data.id == mine.id
        async with environment_client(emulator, sessions_token(item.secret)) as pod:
            assert len(await session_events(pod, mine.id)) == 3
            await answer(pod, mine.id, await open_tool_use(pod, mine.id))
            with pytest.raises(PermissionDeniedError):
                await session_events(pod, theirs.id)
            with pytest.raises(PermissionDeniedError):
                await answer(pod, theirs.id, await open_tool_use(api, theirs.id))
        # The environment key of the session's environment reads it too.
        assert len(await session_events(worker, theirs.id)) == 3
