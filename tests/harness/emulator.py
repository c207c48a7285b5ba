"""Reusable helpers to run the Environments API emulator inside a test's event loop.

Plain functions and classes (no pytest fixtures), so any test module can import them:

```py
from tests.harness.emulator import running_emulator, api_client, self_hosted_environment

async with running_emulator() as emulator:            # port 0, API key API_KEY
    pool = self_hosted_environment(emulator)            # env id + environment key, no HTTP round trip
    enqueue_sessions(emulator, pool.id, count=3)        # three queued work items
    async with api_client(emulator) as client:          # AsyncAnthropic with the API key
        ...
    async with environment_client(emulator, pool) as worker:  # AsyncAnthropic with the environment key
        ...

async with running_queue(items=2, clock=ManualClock()) as queue:  # all of the above in one
    item = await queue.work.poll(queue.pool.id)
```

Setup through ``emulator.state`` skips HTTP to keep tests fast; the behaviour under test should still
go through the SDK. Clients default to ``max_retries=0`` so that a failure shows at once instead of
after the SDK's backoff. This module may not patch or mock the emulator.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from anthropic import APIStatusError, AsyncAnthropic
from anthropic.resources.beta.environments.work import AsyncWork

from environments_operator.emulator.server import EmulatorServer
from environments_operator.emulator.state import WorkItem

API_KEY = "sk-ant-api03-emulator-test-key"
AGENT_ID = "agent_011CZkZ9X2dpNyB7HsEFoRfW"


@asynccontextmanager
async def running_emulator(**options: Any) -> AsyncIterator[EmulatorServer]:
    """An emulator on a free port for the duration of the block; accepts only ``API_KEY`` by default.

    Options are those of ``EmulatorServer``: ``api_keys``, ``faults``, ``clock``,
    ``default_lease_ttl_seconds``, ``max_body_bytes``, ...
    """
    options.setdefault("api_keys", [API_KEY])
    async with EmulatorServer(**options) as emulator:
        yield emulator


def api_client(emulator: EmulatorServer, *, api_key: str = API_KEY, **options: Any) -> AsyncAnthropic:
    """An SDK client authenticated with an API key (use as ``async with``)."""
    options.setdefault("max_retries", 0)
    options.setdefault("timeout", 30.0)
    return AsyncAnthropic(base_url=emulator.base_url, api_key=api_key, **options)


@dataclass(frozen=True)
class SelfHostedEnvironment:
    """A self_hosted environment in the emulator and an environment key for it."""

    id: str
    key: str


def environment_client(
    emulator: EmulatorServer, environment: SelfHostedEnvironment | str, **options: Any
) -> AsyncAnthropic:
    """An SDK client whose credential is an environment key (or any other credential string)."""
    key = environment.key if isinstance(environment, SelfHostedEnvironment) else environment
    return api_client(emulator, api_key=key, **options)


def self_hosted_environment(emulator: EmulatorServer, name: str = "test-pool") -> SelfHostedEnvironment:
    """Create a self_hosted environment and issue its environment key, directly in the state."""
    environment = emulator.state.create_environment({"name": name, "config": {"type": "self_hosted"}})
    return SelfHostedEnvironment(id=environment.id, key=emulator.state.issue_environment_key(environment.id))


def enqueue_sessions(emulator: EmulatorServer, environment_id: str, count: int = 1) -> list[WorkItem]:
    """Create ``count`` sessions in the environment, each queueing one work item; returns the items."""
    items: list[WorkItem] = []
    for _ in range(count):
        _, item = emulator.state.create_session({"agent": AGENT_ID, "environment_id": environment_id})
        assert item is not None, "only self_hosted environments queue work"
        items.append(item)
    return items


@dataclass(frozen=True)
class QueueSetup:
    """An emulator with one self_hosted environment, queued items, and a client with its key."""

    emulator: EmulatorServer
    pool: SelfHostedEnvironment
    items: list[WorkItem]
    worker: AsyncAnthropic

    @property
    def work(self) -> AsyncWork:
        """The work resource, authenticated with the environment key."""
        return self.worker.beta.environments.work


@asynccontextmanager
async def running_queue(items: int = 1, **options: Any) -> AsyncIterator[QueueSetup]:
    """``running_emulator(**options)`` with a self_hosted environment holding ``items`` queued items."""
    async with running_emulator(**options) as emulator:
        pool = self_hosted_environment(emulator)
        queued = enqueue_sessions(emulator, pool.id, count=items)
        async with environment_client(emulator, pool) as worker:
            yield QueueSetup(emulator, pool, queued, worker)


def sessions_token(secret: str) -> str:
    """The sessions token inside a work item's ``secret`` (base64url JSON, padding optional)."""
    payload = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    token = payload["sessions_token"]
    assert isinstance(token, str)
    return token


def error_of(exception: APIStatusError) -> dict[str, Any]:
    """The ``error`` object of an Anthropic-shaped error response the SDK raised."""
    body = exception.body
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error: dict[str, Any] = body["error"]
    return error


def snapshot(emulator: EmulatorServer) -> dict[str, Any]:
    """Everything a client could observe in the emulator, to assert that a request changed nothing."""
    state = emulator.state
    return {
        "environments": {env_id: env.to_api() for env_id, env in state.environments.items()},
        "queues": {env_id: list(env.queue.queued) for env_id, env in state.environments.items()},
        "work": {
            work_id: {**item.to_api(), "delivered_at": item.delivered_at, "lease": item.lease_expires_at}
            for work_id, item in state.work.items()
        },
        "sessions": {session_id: session.to_api() for session_id, session in state.sessions.items()},
        "session_events": {session_id: list(session.events) for session_id, session in state.sessions.items()},
        "agents": dict(state.agents),
        "environment_keys": dict(state.environment_keys),
        "faults": [rule.to_api() for rule in emulator.faults.rules],
    }


class ManualClock:
    """A clock that moves only when told to: pass it as ``clock=`` for deterministic lease tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
