"""Registers the end-to-end RBAC recorder (``tests.chart.e2e_record``) for the whole session."""

from __future__ import annotations

import pytest

from tests.chart.e2e_record import E2eRbacRecorder

_PLUGIN_NAME = "chart-e2e-rbac-recorder"


def pytest_configure(config: pytest.Config) -> None:
    # A conftest's own runtest hooks only see tests in its directory; a registered plugin sees all.
    if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        config.pluginmanager.register(E2eRbacRecorder(), _PLUGIN_NAME)
