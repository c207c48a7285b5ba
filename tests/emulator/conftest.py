"""Fixtures for the emulator's own tests; other suites use ``tests.harness.emulator`` directly."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from anthropic import AsyncAnthropic

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import (
    SelfHostedEnvironment,
    api_client,
    environment_client,
    running_emulator,
    self_hosted_environment,
)


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    """An emulator on a free port that accepts only ``tests.harness.emulator.API_KEY``."""
    async with running_emulator() as server:
        yield server


@pytest.fixture
async def api(emulator: EmulatorServer) -> AsyncIterator[AsyncAnthropic]:
    """An SDK client with the API key."""
    async with api_client(emulator) as client:
        yield client


@pytest.fixture
def pool(emulator: EmulatorServer) -> SelfHostedEnvironment:
    """A self_hosted environment and its environment key."""
    return self_hosted_environment(emulator)


@pytest.fixture
async def worker(emulator: EmulatorServer, pool: SelfHostedEnvironment) -> AsyncIterator[AsyncAnthropic]:
    """An SDK client with the environment key of ``pool``."""
    async with environment_client(emulator, pool) as client:
        yield client
