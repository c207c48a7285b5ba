"""``environments-operator emulator`` as a process: readiness line, --api-key, --faults, clean signals."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys

import anthropic
import pytest
from anthropic import AsyncAnthropic

COMMAND = [sys.executable, "-m", "environments_operator", "emulator", "--port", "0"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serves_until_a_signal_then_exits_cleanly(signum: signal.Signals) -> None:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "--api-key",
        "sk-first",
        "--api-key",
        "sk-second",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        assert int(match.group(2)) > 0
        async with AsyncAnthropic(base_url=match.group(1), api_key="sk-second", max_retries=0) as client:
            assert (await client.beta.environments.create(name="x")).name == "x"
        async with AsyncAnthropic(base_url=match.group(1), api_key="sk-third", max_retries=0) as client:
            with pytest.raises(anthropic.AuthenticationError):
                await client.beta.environments.list()
        process.send_signal(signum)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
        assert process.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_rejects_bad_faults_before_listening() -> None:
    faults = json.dumps({"faults": [{"route": "work.poll", "effect": "explode"}]})
    process = await asyncio.create_subprocess_exec(
        *COMMAND, "--faults", faults, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2
    assert stdout == b""
    assert "faults[0].effect: unknown effect 'explode'" in stderr.decode()
