"""What the operator asked of the fake apiserver during this session's end-to-end tests, in RBAC terms.

The harness records every request each ``kube`` fixture receives (``Kube.rbac_uses()``), including the
raw requests the harness's own tests send to exercise the fake apiserver. Only the operator's requests
matter for RBAC coverage, so this plugin keeps the record of end-to-end tests only: tests marked
``e2e`` or living under ``tests/e2e/``. ``tests/chart/conftest.py`` registers it as a plugin, so it sees
every test of the session, not just those under tests/chart.

It only reads the harness's record; it changes nothing about how tests run.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from environments_operator.devcluster.kube import Kube
from environments_operator.devcluster.recorder import RbacUse

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"


@dataclass
class E2eRecord:
    tests_run: list[str] = field(default_factory=list)
    # Tests that failed or errored in any phase: their record may stop short of what the operator needs.
    tests_failed: list[str] = field(default_factory=list)
    uses: set[RbacUse] = field(default_factory=set)


RECORD = E2eRecord()


def is_e2e(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None or E2E_DIR in item.path.parents


class E2eRbacRecorder:
    """A pytest plugin: after each end-to-end test (fixtures torn down), add its ``kube`` record."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and is_e2e(item) and item.nodeid not in RECORD.tests_failed:
            RECORD.tests_failed.append(item.nodeid)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        kubes = [value for value in getattr(item, "funcargs", {}).values() if isinstance(value, Kube)]
        try:
            yield  # the operator stops during teardown: its last requests count too
        finally:
            if is_e2e(item):
                RECORD.tests_run.append(item.nodeid)
                for kube in kubes:
                    RECORD.uses |= kube.rbac_uses()
