"""A warm ``environments-operator worker`` process: started with no item, assigned one through the Kubernetes API.

The pod's environment is what a warm pod gets (``ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET``, the in-cluster
variables, ``ANTHROPIC_BASE_URL``; none of the item's four), its service account mount is a directory
passed with ``--service-account-dir``, and the API is ``FakeInClusterApi`` (real HTTPS). The item is a
real one of the emulator, claimed and acked as the operator does before it writes the assignment.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from environments_operator.worker import ASSIGNMENT_VARIABLE
from tests.harness.emulator import api_client, running_emulator, self_hosted_environment
from tests.harness.incluster import FakeInClusterApi, assignment_data
from tests.harness.sessions import (
    WorkerProcess,
    claim,
    result_text,
    results_by_tool_use,
    scripted_agent,
    session_events,
    start_worker,
)

POD = "work-warm-0a1b2c"


async def start_warm_worker(
    api: FakeInClusterApi, tmp_path: Path, base_url: str = "http://127.0.0.1:9", **options: float
) -> WorkerProcess:
    service_account = api.write_service_account(tmp_path / "serviceaccount")
    workdir = tmp_path / "workspace"
    workdir.mkdir()
    pod = {ASSIGNMENT_VARIABLE: POD, **api.environ(), "ANTHROPIC_BASE_URL": base_url}
    return await start_worker(pod, workdir, extra_args=["--service-account-dir", str(service_account)], **options)


async def until_watching(api: FakeInClusterApi, worker: WorkerProcess, timeout: float = 30.0) -> None:
    """Until the worker's watch is open: it has imported the SDK and built its client by then."""
    async with asyncio.timeout(timeout):
        while not api.watches():
            assert worker.returncode is None, "the worker exited while it should be waiting"
            await asyncio.sleep(0.02)


class TestAWarmWorker:
    async def test_serves_the_session_it_is_assigned_and_exits_0(self, tmp_path: Path) -> None:
        script = [{"tool": "bash", "input": {"command": "echo served warm; pwd"}}]
        async with running_emulator() as emulator, api_client(emulator) as client, FakeInClusterApi() as api:
            pool = self_hosted_environment(emulator)
            session = await client.beta.sessions.create(
                agent=await scripted_agent(client, script), environment_id=pool.id)
            worker = await start_warm_worker(api, tmp_path, emulator.base_url)
            try:
                await until_watching(api, worker)
                assert [item.state for item in emulator.state.work.values()] == ["queued"]  # not claimed yet
                contract = await claim(emulator, pool)  # then the operator writes the assignment
                api.create_secret(POD, assignment_data(
                    contract["ANTHROPIC_WORK_ID"], contract["ANTHROPIC_ENVIRONMENT_ID"],
                    contract["ANTHROPIC_SESSION_ID"], contract["ANTHROPIC_WORK_SECRET"]))
                await worker.finish()
            finally:
                worker.kill()

            assert worker.returncode == 0, worker.stderr
            ((_, result),) = results_by_tool_use(await session_events(client, session.id)).values()
            assert result is not None and not result.is_error
            assert result_text(result).splitlines() == ["served warm", str(tmp_path / "workspace")]
            assert emulator.state.work[contract["ANTHROPIC_WORK_ID"]].state == "stopped"
            assert f"warm: waiting for assignment Secret {api.namespace}/{POD}" in worker.stderr
            assert f"warm: assigned work item {contract['ANTHROPIC_WORK_ID']}" in worker.stderr
            output = worker.stderr + worker.stdout
            assert contract["ANTHROPIC_WORK_SECRET"] not in output and api.token not in output
            assert pool.key not in output
            assert all(not seen.path.endswith("/secrets") or seen.is_watch for seen in api.requests)  # no list

    async def test_sigterm_while_waiting_exits_143_at_once(self, tmp_path: Path) -> None:
        async with FakeInClusterApi() as api:
            worker = await start_warm_worker(api, tmp_path)
            try:
                await until_watching(api, worker)
                signalled = time.perf_counter()
                worker.process.send_signal(signal.SIGTERM)
                await worker.finish(timeout=10)
                took = time.perf_counter() - signalled
            finally:
                worker.kill()
            assert worker.returncode == 143, worker.stderr
            assert took < 1.0, f"{took:.2f} s from SIGTERM to exit"
            assert "nothing was served" in worker.stderr

    async def test_403_from_the_api_exits_2_naming_the_secret(self, tmp_path: Path) -> None:
        async with FakeInClusterApi() as api:
            api.get_statuses.append(403)
            worker = await start_warm_worker(api, tmp_path)
            try:
                await worker.finish()
            finally:
                worker.kill()
            assert worker.returncode == 2, worker.stderr
            assert f"403 for assignment Secret {api.namespace}/{POD}" in worker.stderr
            assert api.token not in worker.stderr

    async def test_an_assignment_without_a_key_exits_2_naming_it(self, tmp_path: Path) -> None:
        async with FakeInClusterApi() as api:
            api.create_secret(POD, {"work-id": "work_1", "environment-id": "env_1", "session-id": "session_1"})
            worker = await start_warm_worker(api, tmp_path)
            try:
                await worker.finish()
            finally:
                worker.kill()
            assert worker.returncode == 2, worker.stderr
            assert "'work-secret' is missing" in worker.stderr
