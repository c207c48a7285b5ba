"""Helpers for tests of real sessions: scripted agents, the events a session logged, and worker processes.

```py
agent_id = await scripted_agent(client, [{"tool": "bash", "input": {"command": "true"}}], reply="done")
session = await client.beta.sessions.create(agent=agent_id, environment_id=pool.id)
contract = await claim(emulator, pool)                  # poll + ack as the operator does
worker = await start_worker(contract, workdir)           # the real `environments-operator worker`
assert (await worker.finish()).returncode == 0
events = await session_events(client, session.id)        # every event, through the SDK's pagination
```

Everything goes through the SDK or a real subprocess; nothing here patches the emulator or the worker.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anthropic import AsyncAnthropic
from anthropic.types.beta.sessions import BetaManagedAgentsSessionEvent

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import SelfHostedEnvironment, environment_client

WORKER_TIMEOUT_SECONDS = 60.0


async def scripted_agent(client: AsyncAnthropic, script: Sequence[dict[str, Any]], reply: str = "done") -> str:
    """Create a scripted agent through ``POST /_emulator/agents``; returns its ID."""
    agent = await client.post("/_emulator/agents", cast_to=object, body={"script": list(script), "reply": reply})
    assert isinstance(agent, dict)
    agent_id = agent["id"]
    assert isinstance(agent_id, str)
    return agent_id


async def session_events(
    client: AsyncAnthropic, session_id: str, *, page_size: int | None = None
) -> list[BetaManagedAgentsSessionEvent]:
    """Every event of the session, oldest first, read page by page through the SDK."""
    if page_size is None:
        return [event async for event in client.beta.sessions.events.list(session_id)]
    return [event async for event in client.beta.sessions.events.list(session_id, limit=page_size)]


def results_by_tool_use(events: Sequence[BetaManagedAgentsSessionEvent]) -> dict[str, Any]:
    """``{tool_use_id: (tool_use event, its user.tool_result event or None)}`` in script order."""
    pairs: dict[str, Any] = {}
    for event in events:
        if event.type == "agent.tool_use":
            pairs[event.id] = (event, None)
        elif event.type == "user.tool_result":
            tool_use, previous = pairs[event.tool_use_id]
            assert previous is None, f"two results for {event.tool_use_id}"
            pairs[event.tool_use_id] = (tool_use, event)
    return pairs


def result_text(result: Any) -> str:
    return "".join(block.text for block in result.content or [] if block.type == "text")


async def claim(emulator: EmulatorServer, pool: SelfHostedEnvironment) -> dict[str, str]:
    """Claim and acknowledge one item as the operator does; returns the pod's contract variables."""
    async with environment_client(emulator, pool) as client:
        work = client.beta.environments.work
        item = await work.poll(pool.id, block_ms=500)
        assert item is not None and item.secret
        await work.ack(item.id, environment_id=pool.id)
    return {
        "ANTHROPIC_WORK_ID": item.id,
        "ANTHROPIC_ENVIRONMENT_ID": pool.id,
        "ANTHROPIC_SESSION_ID": item.data.id,
        "ANTHROPIC_WORK_SECRET": item.secret,
        "ANTHROPIC_BASE_URL": emulator.base_url,
    }


@dataclass
class WorkerProcess:
    """A running ``environments-operator worker`` and what it printed once it has ended."""

    process: asyncio.subprocess.Process
    stdout: str = ""
    stderr: str = ""

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def finish(self, timeout: float = WORKER_TIMEOUT_SECONDS) -> WorkerProcess:
        out, err = await asyncio.wait_for(self.process.communicate(), timeout=timeout)
        self.stdout, self.stderr = out.decode(), err.decode()
        return self

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def start_worker(
    contract: dict[str, str], workdir: Path, *, max_idle: float = 0.5, extra_args: Sequence[str] = ()
) -> WorkerProcess:
    """The real worker as a pod runs it: only the contract's ``ANTHROPIC_*`` variables, no other key."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "environments_operator", "worker", "--workdir", str(workdir),
        "--max-idle", str(max_idle), *extra_args,
        env={**environment, **contract}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    return WorkerProcess(process)
