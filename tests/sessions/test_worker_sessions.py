"""Real sessions served by the real ``environments-operator worker`` process, through the official SDK.

Each worker gets exactly the pod contract's variables (the per-item secret, never the environment
key) and runs the SDK's ``EnvironmentWorker.handle_item()``: its ``SessionToolRunner`` runs the agent's
toolset in the working directory and posts each result to the emulator's scripted session.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from anthropic import AsyncAnthropic

from environments_operator.emulator.server import EmulatorServer
from environments_operator.worker import TOOL_KILL_GRACE_SECONDS
from tests.harness.emulator import SelfHostedEnvironment, api_client, running_emulator, self_hosted_environment
from tests.harness.sessions import (
    WorkerProcess,
    claim,
    result_text,
    results_by_tool_use,
    scripted_agent,
    session_events,
    start_worker,
)

WRITE_READ_BASH = [
    {"tool": "write", "input": {"file_path": "notes/hello.txt", "content": "hello from the agent\n"}},
    {"tool": "read", "input": {"file_path": "notes/hello.txt"}},
    {"tool": "bash", "input": {"command": "wc -l < notes/hello.txt; echo \"cwd=$(pwd)\""}},
]


async def serve_one(
    emulator: EmulatorServer, pool: SelfHostedEnvironment, workdir: Path, **options: float
) -> WorkerProcess:
    """Claim the next item as the operator does, and run one worker process on it to the end."""
    contract = await claim(emulator, pool)
    worker = await (await start_worker(contract, workdir, **options)).finish()
    assert contract["ANTHROPIC_WORK_SECRET"] not in worker.stderr + worker.stdout
    assert pool.key not in worker.stderr + worker.stdout
    return worker


async def wait_for(predicate: object, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


class TestAScriptedSession:
    async def test_the_worker_runs_every_tool_and_posts_each_result_then_stops_the_item(self, tmp_path: Path) -> None:
        async with running_emulator() as emulator, api_client(emulator) as api:
            pool = self_hosted_environment(emulator)
            agent = await scripted_agent(api, WRITE_READ_BASH, reply="all done")
            session = await api.beta.sessions.create(agent=agent, environment_id=pool.id)

            worker = await serve_one(emulator, pool, tmp_path)

            assert worker.returncode == 0, worker.stderr
            pairs = list(results_by_tool_use(await session_events(api, session.id)).values())
            assert [tool_use.name for tool_use, _ in pairs] == ["write", "read", "bash"]
            assert all(result is not None and not result.is_error for _, result in pairs), pairs
            assert "hello from the agent" in result_text(pairs[1][1])
            assert result_text(pairs[2][1]).splitlines() == ["1", f"cwd={tmp_path}"]
            assert (tmp_path / "notes" / "hello.txt").read_text() == "hello from the agent\n"
            events = await session_events(api, session.id)
            assert events[-2].type == "agent.message" and events[-1].type == "session.status_idle"
            assert events[-1].stop_reason.type == "end_turn"
            (item,) = emulator.state.work.values()
            assert item.state == "stopped"

    async def test_a_failing_tool_is_an_error_result_and_the_session_goes_on(self, tmp_path: Path) -> None:
        script = [
            {"tool": "bash", "input": {"command": "echo about to fail; (exit 3)"}},
            {"tool": "read", "input": {"file_path": "does-not-exist.txt"}},
            {"tool": "edit", "input": {"file_path": "missing.txt", "old_string": "a", "new_string": "b"}},
            {"tool": "bash", "input": {"command": "echo still here"}},
        ]
        async with running_emulator() as emulator, api_client(emulator) as api:
            pool = self_hosted_environment(emulator)
            session = await api.beta.sessions.create(agent=await scripted_agent(api, script), environment_id=pool.id)

            worker = await serve_one(emulator, pool, tmp_path)

            assert worker.returncode == 0, worker.stderr
            results = [result for _, result in results_by_tool_use(await session_events(api, session.id)).values()]
            assert [result.is_error for result in results] == [True, True, True, False]
            assert "about to fail" in result_text(results[0])
            assert "does-not-exist.txt" in result_text(results[1])
            assert result_text(results[3]) == "still here"

    async def test_a_follow_up_message_to_a_dormant_session_is_served_by_a_second_worker(
        self, tmp_path: Path
    ) -> None:
        script = [{"tool": "bash", "input": {"command": "echo turn >> turns.log; wc -l < turns.log"}}]
        async with running_emulator() as emulator, api_client(emulator) as api:
            pool = self_hosted_environment(emulator)
            session = await api.beta.sessions.create(agent=await scripted_agent(api, script), environment_id=pool.id)
            assert (await serve_one(emulator, pool, tmp_path)).returncode == 0
            (first,) = emulator.state.work.values()
            assert first.state == "stopped"

            await api.beta.sessions.events.send(
                session.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "again"}]}]
            )
            second_items = [item for item in emulator.state.work.values() if item.id != first.id]
            assert [item.state for item in second_items] == ["queued"]
            second = await serve_one(emulator, pool, tmp_path)

            assert second.returncode == 0, second.stderr
            results = [result for _, result in results_by_tool_use(await session_events(api, session.id)).values()]
            assert [result_text(result) for result in results] == ["1", "2"]
            assert second_items[0].state == "stopped"


class TestFaults:
    async def test_sigterm_during_a_long_bash_step_ends_it_posts_its_error_and_stops_the_item(
        self, tmp_path: Path
    ) -> None:
        script = [{"tool": "bash", "input": {"command": "touch started; sleep 120; touch finished"}}]
        async with running_emulator() as emulator, api_client(emulator) as api:
            pool = self_hosted_environment(emulator)
            session = await api.beta.sessions.create(agent=await scripted_agent(api, script), environment_id=pool.id)
            contract = await claim(emulator, pool)
            worker = await start_worker(contract, tmp_path)
            try:
                await wait_for(lambda: (tmp_path / "started").exists())
                loop = asyncio.get_running_loop()
                signalled_at = loop.time()
                worker.process.send_signal(signal.SIGTERM)
                await worker.finish(timeout=20)
                took = loop.time() - signalled_at
            finally:
                worker.kill()

            assert worker.returncode == 143, worker.stderr
            # At once, not after the SIGKILL that follows a step which ignores SIGTERM.
            assert took < TOOL_KILL_GRACE_SECONDS - 1, f"the worker took {took:.1f}s to end after SIGTERM"
            assert not (tmp_path / "finished").exists()
            (item,) = emulator.state.work.values()
            assert item.state == "stopped"
            ((_, result),) = results_by_tool_use(await session_events(api, session.id)).values()
            assert result is not None and result.is_error

    async def test_a_stream_that_drops_is_reattached_and_every_step_is_served_once(self, tmp_path: Path) -> None:
        # Each of the first three streams is cut right after its first event; the runner reconnects
        # and reconciles from the history, which the emulator serves two events per page.
        faults = [
            {"route": "sessions.events.stream", "effect": "drop", "when": "after", "times": 3},
            {"route": "sessions.events.stream", "effect": "drop", "times": 1},
        ]
        async with running_emulator(faults=faults, events_page_cap=2) as emulator, api_client(emulator) as api:
            pool = self_hosted_environment(emulator)
            session = await api.beta.sessions.create(
                agent=await scripted_agent(api, WRITE_READ_BASH), environment_id=pool.id
            )

            worker = await serve_one(emulator, pool, tmp_path)

            assert worker.returncode == 0, worker.stderr
            assert emulator.faults.rules == []  # each rule fired as often as it may, then retired
            pairs = results_by_tool_use(await session_events(api, session.id, page_size=3))
            assert len(pairs) == 3 and all(result is not None and not result.is_error for _, result in pairs.values())


class TestToolConfirmation:
    async def test_an_allowed_call_runs_and_a_denied_one_never_does(self, tmp_path: Path) -> None:
        script = [
            {"tool": "bash", "input": {"command": "touch allowed"}, "permission": "ask"},
            {"tool": "bash", "input": {"command": "touch denied"}, "permission": "ask"},
            {"tool": "bash", "input": {"command": "touch refused-by-policy"}, "permission": "deny"},
            {"tool": "bash", "input": {"command": "touch after"}},
        ]
        async with running_emulator() as emulator, api_client(emulator) as api:
            pool = self_hosted_environment(emulator)
            session = await api.beta.sessions.create(agent=await scripted_agent(api, script), environment_id=pool.id)
            worker = await start_worker(await claim(emulator, pool), tmp_path, max_idle=2)
            try:
                await confirm_next(api, session.id, "allow")
                await wait_for(lambda: (tmp_path / "allowed").exists())
                await confirm_next(api, session.id, "deny")
                await worker.finish()
            finally:
                worker.kill()

            assert worker.returncode == 0, worker.stderr
            assert sorted(path.name for path in tmp_path.iterdir()) == ["after", "allowed"]
            results = [result for _, result in results_by_tool_use(await session_events(api, session.id)).values()]
            assert [result is not None for result in results] == [True, False, False, True]


async def confirm_next(api: AsyncAnthropic, session_id: str, verdict: str) -> None:
    """Wait for the session to ask for a confirmation, then give ``verdict`` as its user would."""
    async with asyncio.timeout(30):
        while True:
            events = await session_events(api, session_id)
            last = events[-1]
            if last.type == "session.status_idle" and last.stop_reason.type == "requires_action":
                (asking,) = [event for event in events if event.id in last.stop_reason.event_ids]
                if asking.evaluated_permission == "ask":
                    break
            await asyncio.sleep(0.05)
    await api.beta.sessions.events.send(
        session_id, events=[{"type": "user.tool_confirmation", "tool_use_id": asking.id, "result": verdict}]
    )
