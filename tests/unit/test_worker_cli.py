"""``environments-operator worker``: the in-pod runner, as a real subprocess against the emulator.

The pod gets exactly the contract variables a WorkerPool sets (no environment key), and the SDK's
``EnvironmentWorker.handle_item()`` does the rest: heartbeat, serve, force-stop on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from environments_operator import cli
from environments_operator.emulator.server import EmulatorServer
from environments_operator.worker import worker_options
from tests.harness.emulator import (
    SelfHostedEnvironment,
    enqueue_sessions,
    environment_client,
    running_emulator,
    self_hosted_environment,
)

CONTRACT = ("ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_SECRET")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*CONTRACT, "ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


class TestContractChecks:
    @pytest.mark.parametrize("missing", CONTRACT)
    def test_a_missing_variable_is_a_clear_error_with_exit_code_2(
        self, missing: str, clean_environment: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        for name in CONTRACT:
            if name != missing:
                monkeypatch.setenv(name, "value-sentinel")
        assert cli.main(["worker"]) == 2
        error = capsys.readouterr().err
        assert missing in error and "missing required environment variable" in error
        assert "value-sentinel" not in error  # names only, never values

    def test_workdir_and_max_idle_are_passed_through(self) -> None:
        parser = argparse.ArgumentParser()
        from environments_operator.worker import add_arguments

        add_arguments(parser)
        assert worker_options(parser.parse_args(["--workdir", "/w", "--max-idle", "2.5"])) == {
            "workdir": "/w", "max_idle": 2.5}
        assert worker_options(parser.parse_args([])) == {}


async def claim(emulator: EmulatorServer, pool: SelfHostedEnvironment) -> dict[str, str]:
    """Claim and acknowledge one item as the operator does; returns the pod's contract variables."""
    async with environment_client(emulator, pool) as client:
        work = client.beta.environments.work
        item = await work.poll(pool.id, block_ms=100)
        assert item is not None and item.secret
        await work.ack(item.id, environment_id=pool.id)
    return {
        "ANTHROPIC_WORK_ID": item.id,
        "ANTHROPIC_ENVIRONMENT_ID": pool.id,
        "ANTHROPIC_SESSION_ID": item.data.id,
        "ANTHROPIC_WORK_SECRET": item.secret,
        "ANTHROPIC_BASE_URL": emulator.base_url,
    }


async def start_worker(contract: dict[str, str], workdir: Path) -> asyncio.subprocess.Process:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "environments_operator", "worker", "--workdir", str(workdir), "--max-idle", "1",
        env={**environment, **contract}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


class TestServing:
    async def test_serves_the_item_with_the_work_secret_alone_and_stops_it(self, tmp_path: Path) -> None:
        async with running_emulator(default_lease_ttl_seconds=2) as emulator:
            pool = self_hosted_environment(emulator)
            (queued,) = enqueue_sessions(emulator, pool.id)
            # A session that has already ended: the SDK worker then has nothing to run and stops the item.
            emulator.state.sessions[queued.session_id].status = "terminated"
            contract = await claim(emulator, pool)
            process = await start_worker(contract, tmp_path)
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
            assert process.returncode == 0, stderr.decode()
            assert emulator.state.work[queued.id].state == "stopped"
            assert contract["ANTHROPIC_WORK_SECRET"] not in stderr.decode()
            assert pool.key not in stderr.decode()

    async def test_sigterm_ends_the_run_gracefully_and_stops_the_item(self, tmp_path: Path) -> None:
        async with running_emulator(default_lease_ttl_seconds=2) as emulator:
            pool = self_hosted_environment(emulator)
            (queued,) = enqueue_sessions(emulator, pool.id)
            # The session fetch is slow, so the worker is mid-run (heartbeating) when the pod is deleted;
            # short, because the emulator waits for the slow request before it shuts down.
            emulator.faults.add({"faults": [{"route": "sessions.retrieve", "effect": "latency", "latency_ms": 3_000}]})
            contract = await claim(emulator, pool)
            process = await start_worker(contract, tmp_path)
            async with asyncio.timeout(30):
                while emulator.state.work[queued.id].state != "active":
                    await asyncio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
            assert process.returncode == 143, stderr.decode()
            assert emulator.state.work[queued.id].state == "stopped"
