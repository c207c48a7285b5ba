"""pytest fixtures and hooks of the end-to-end harness (registered by ``tests/conftest.py``).

Fixtures:
- ``kube``: a fresh fake apiserver per test (``environments_operator.devcluster.kube.Kube``), on a free loopback port;
- ``kubelet``: a ``environments_operator.devcluster.kubelet.Kubelet`` on that ``kube``; its automatic mode
  stops with the test.

Hooks:
- marker ``after_e2e``: such tests run after all others, so that a test asserting RBAC coverage sees
  the whole session's record (``environments_operator.devcluster.recorder.SESSION_RBAC_USES``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from environments_operator.devcluster.kube import Kube, start_kube
from environments_operator.devcluster.kubelet import Kubelet


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "after_e2e: run after every other test of the session (e.g. RBAC coverage of the record)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("after_e2e") is not None)  # stable: order kept


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[Kube]:
    async with start_kube(tmp_path) as running:
        yield running


@pytest.fixture
async def kubelet(kube: Kube) -> AsyncIterator[Kubelet]:
    running = Kubelet(kube)
    try:
        yield running
    finally:
        await running.stop_auto()
