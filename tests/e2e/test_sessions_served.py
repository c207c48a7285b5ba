"""The product end to end: real sessions served by real worker pods.

The shipped operator (kopf) on the simulated cluster, the emulator's scripted sessions, and the process
kubelet, which runs every worker pod the operator creates as a local ``environments-operator worker``
process with the pod's own env (the per-item secret through ``secretKeyRef``, never the environment key).
A session is served when every tool_use of its script has its result and its work item is stopped.
"""

from __future__ import annotations

import collections

import pytest
from anthropic import AsyncAnthropic

from environments_operator.devcluster.process_kubelet import ProcessKubelet
from tests.e2e.conftest import WorkerPoolWorld
from tests.harness.emulator import api_client
from tests.harness.sessions import result_text, results_by_tool_use, scripted_agent, session_events

pytestmark = pytest.mark.timeout(240)

SCRIPT = [
    {"tool": "write", "input": {"file_path": "answer.txt", "content": "42\n"}},
    {"tool": "read", "input": {"file_path": "answer.txt"}},
    {"tool": "bash", "input": {"command": "echo \"$(cat answer.txt) from $HOSTNAME\""}},
]
SESSIONS = 10


async def start_sessions(api: AsyncAnthropic, world: WorkerPoolWorld, count: int) -> list[str]:
    agent = await scripted_agent(api, SCRIPT, reply="served")
    return [(await api.beta.sessions.create(agent=agent, environment_id=world.environment.id)).id
            for _ in range(count)]


async def wait_served(world: WorkerPoolWorld, session_ids: list[str], timeout: float = 150.0) -> None:
    state = world.emulator.state

    def served() -> bool:
        items = [item for item in state.work.values() if item.session_id in session_ids]
        return all(item.state == "stopped" for item in items) and all(
            sum(1 for e in state.sessions[s].events if e["type"] == "user.tool_result") >= len(SCRIPT)
            for s in session_ids)

    await world.kube.wait_until(served, timeout=timeout, message=lambda: "every session served: " + str(
        collections.Counter(item.state for item in state.work.values())))


async def assert_each_served_once(api: AsyncAnthropic, session_ids: list[str], turns: int = 1,
                                  host_prefix: str = "work-") -> None:
    for session_id in session_ids:
        pairs = list(results_by_tool_use(await session_events(api, session_id)).values())  # no tool_use answered twice
        assert [tool_use.name for tool_use, _ in pairs] == [step["tool"] for step in SCRIPT] * turns
        assert all(result is not None and not result.is_error for _, result in pairs), pairs
        assert result_text(pairs[1][1]) == "42\n"
        assert result_text(pairs[2][1]).startswith(f"42 from {host_prefix}")


def assert_no_credential_in_worker_logs(world: WorkerPoolWorld, kubelet: ProcessKubelet) -> None:
    item_secrets = [item.secret for item in world.emulator.state.work.values()]
    for pod in kubelet.started:
        log = kubelet.log(pod)
        assert "session tool runner starting" in log, log[-2000:]
        assert world.environment.key not in log and not any(secret in log for secret in item_secrets), pod


class TestSessionsServed:
    async def test_every_session_is_served_by_its_own_pod_which_exits_0_and_is_cleaned_up(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(maxWorkers=SESSIONS, maxIdleSeconds=0, ttlSecondsAfterFinished=1)
        async with api_client(world.emulator) as api:
            session_ids = await start_sessions(api, world, SESSIONS)
            await wait_served(world, session_ids)
            await assert_each_served_once(api, session_ids)

        assert len(process_kubelet.started) == SESSIONS == len(set(process_kubelet.started))
        # One INFO line per dispatched item says where it went.
        dispatched = [r.getMessage() for r in world.operator.logs if "dispatched to pod" in r.getMessage()]
        assert len(dispatched) == SESSIONS
        assert all(any(session_id in line for line in dispatched) for session_id in session_ids)
        await world.kube.wait_until(lambda: len(process_kubelet.exit_codes) == SESSIONS, timeout=30)
        assert set(process_kubelet.exit_codes.values()) == {0}, process_kubelet.exit_codes
        await world.kube.wait_until(
            lambda: not world.pods() and not world.secrets_of_items(), timeout=30,
            message=lambda: f"pods and Secrets cleaned up: {len(world.pods())} pods, "
                            f"{len(world.secrets_of_items())} Secrets left")
        assert_no_credential_in_worker_logs(world, process_kubelet)

    async def test_with_the_operator_killed_mid_burst_every_session_is_served_exactly_once(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(maxWorkers=SESSIONS, maxIdleSeconds=0)
        async with api_client(world.emulator) as api:
            session_ids = await start_sessions(api, world, SESSIONS)
            await world.wait_pods(3, timeout=60)
            world.operator.kill()
            await world.operator.start()
            await wait_served(world, session_ids)
            await assert_each_served_once(api, session_ids)

        pods_per_session = collections.Counter(
            p["metadata"]["annotations"]["managedagents.dev/session-id"] for p in world.pods())
        assert pods_per_session == dict.fromkeys(session_ids, 1)
        # A session's sandbox is one label selector away.
        for session_id in session_ids:
            assert len(world.pods_with_labels({"managedagents.dev/session-id": session_id})) == 1
        assert len(process_kubelet.started) == SESSIONS == len(set(process_kubelet.started))
        acks = collections.Counter(r.path.split("/")[-2] for r in world.acks())
        assert set(acks.values()) == {1}, "an item was acknowledged twice"

    async def test_a_follow_up_message_to_a_dormant_session_gets_a_new_item_and_a_new_pod(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(maxIdleSeconds=0)
        async with api_client(world.emulator) as api:
            (session_id,) = await start_sessions(api, world, 1)
            await wait_served(world, [session_id])
            await api.beta.sessions.events.send(
                session_id, events=[{"type": "user.message", "content": [{"type": "text", "text": "again"}]}])
            items = [item for item in world.emulator.state.work.values() if item.session_id == session_id]
            assert len(items) == 2
            await world.kube.wait_until(lambda: all(item.state == "stopped" for item in items), timeout=60)
            await assert_each_served_once(api, [session_id], turns=2)
        assert len(process_kubelet.started) == 2 == len(set(process_kubelet.started))
        assert set(process_kubelet.exit_codes.values()) == {0}
        assert_no_credential_in_worker_logs(world, process_kubelet)
