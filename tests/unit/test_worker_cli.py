"""``environments-operator worker``: the in-pod runner, as a real subprocess against the emulator.

The pod gets exactly the contract variables a WorkerPool sets (no environment key), and the SDK's
``EnvironmentWorker.handle_item()`` does the rest: heartbeat, serve, force-stop on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

import pytest

from environments_operator import cli
from environments_operator.worker import worker_options
from tests.harness.emulator import enqueue_sessions, running_emulator, self_hosted_environment
from tests.harness.sessions import claim, start_worker

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
        assert worker_options(parser.parse_args(["--workdir", "/w", "--max-idle", "2.5"]), {}) == {
            "workdir": "/w", "max_idle": 2.5}
        # Unset: the current directory (the image's /workspace) and the SDK's own idle default.
        assert worker_options(parser.parse_args([]), {}) == {"workdir": os.getcwd()}

    def test_max_idle_comes_from_the_pool_through_the_environment(self) -> None:
        parser = argparse.ArgumentParser()
        from environments_operator.worker import MAX_IDLE_VARIABLE, add_arguments

        add_arguments(parser)
        assert worker_options(parser.parse_args([]), {MAX_IDLE_VARIABLE: "5"})["max_idle"] == 5.0
        # The flag wins over the pool's setting.
        assert worker_options(parser.parse_args(["--max-idle", "1"]), {MAX_IDLE_VARIABLE: "5"})["max_idle"] == 1.0
        with pytest.raises(ValueError, match=MAX_IDLE_VARIABLE):
            worker_options(parser.parse_args([]), {MAX_IDLE_VARIABLE: "soon"})

    def test_a_workdir_that_is_not_writable_is_a_contract_error(
        self, tmp_path: Path, clean_environment: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        for name in CONTRACT:
            monkeypatch.setenv(name, "value-sentinel")
        assert cli.main(["worker", "--workdir", str(tmp_path / "absent")]) == 2
        assert "does not exist" in capsys.readouterr().err


class TestServing:
    async def test_serves_the_item_with_the_work_secret_alone_and_stops_it(self, tmp_path: Path) -> None:
        async with running_emulator(default_lease_ttl_seconds=2) as emulator:
            pool = self_hosted_environment(emulator)
            (queued,) = enqueue_sessions(emulator, pool.id)
            # A session that has already ended: the SDK worker then has nothing to run and stops the item.
            emulator.state.sessions[queued.session_id].status = "terminated"
            contract = await claim(emulator, pool)
            worker = await (await start_worker(contract, tmp_path, max_idle=1)).finish()
            assert worker.returncode == 0, worker.stderr
            assert emulator.state.work[queued.id].state == "stopped"
            assert contract["ANTHROPIC_WORK_SECRET"] not in worker.stderr
            assert pool.key not in worker.stderr

    async def test_sigterm_ends_the_run_gracefully_and_stops_the_item(self, tmp_path: Path) -> None:
        async with running_emulator(default_lease_ttl_seconds=2) as emulator:
            pool = self_hosted_environment(emulator)
            (queued,) = enqueue_sessions(emulator, pool.id)
            # The session fetch is slow, so the worker is mid-run (heartbeating) when the pod is deleted;
            # short, because the emulator waits for the slow request before it shuts down.
            emulator.faults.add({"faults": [{"route": "sessions.retrieve", "effect": "latency", "latency_ms": 3_000}]})
            contract = await claim(emulator, pool)
            worker = await start_worker(contract, tmp_path, max_idle=1)
            async with asyncio.timeout(30):
                while emulator.state.work[queued.id].state != "active":
                    await asyncio.sleep(0.05)
            worker.process.send_signal(signal.SIGTERM)
            await worker.finish(timeout=20)
            assert worker.returncode == 143, worker.stderr
            assert emulator.state.work[queued.id].state == "stopped"
