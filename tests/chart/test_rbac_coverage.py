"""RBAC coverage: the chart grants every request the operator made during this session's end-to-end
tests, plus kopf's documented discovery and peering needs, and nothing else (no `*`), in both modes.

The record comes from ``tests.chart.e2e_record`` (the operator's requests to the fake apiserver in
tests marked ``e2e``); the ``after_e2e`` marker makes this test run after them. Run alone
(``pytest tests/chart``) there is no record, and the test skips saying so.
"""

from __future__ import annotations

import pytest

from environments_operator.devcluster.recorder import RbacUse
from tests.chart.e2e_record import RECORD
from tests.chart.rbac import (
    ADMISSION_NEEDS,
    ALL_NAMESPACES,
    KOPF_NEEDS,
    KOPF_RESOURCES,
    MODES,
    NAMESPACED,
    Granted,
    granted,
    is_cluster_scoped,
)
from tests.chart.rendering import WATCHED, render

pytestmark = pytest.mark.after_e2e


def _recorded() -> set[RbacUse]:
    if not RECORD.tests_run:
        pytest.skip("no end-to-end test ran in this session: run the whole suite (or with tests/e2e) "
                    "to check RBAC coverage against the operator's recorded requests")
    return RECORD.uses


def _controller_uses(recorded: set[RbacUse]) -> set[RbacUse]:
    """The record without kopf's own discovery and peering traffic, whose shape depends on the mode."""
    return {u for u in recorded if (u.group, u.resource) not in KOPF_RESOURCES}


def _needs(mode: str, recorded: set[RbacUse]) -> set[RbacUse]:
    return _controller_uses(recorded) | KOPF_NEEDS[mode]


def _effective(rbac: Granted, mode: str) -> dict[str, set[RbacUse]]:
    """Scope -> grants: the cluster scope, and each namespace the operator serves."""
    scopes = {"cluster": {u for u in rbac.cluster if is_cluster_scoped(u)}}
    for namespace in (["any-namespace"] if mode == ALL_NAMESPACES else WATCHED):
        scopes[namespace] = rbac.in_namespace(namespace)
    return scopes


def test_the_record_is_the_operators() -> None:
    recorded = _recorded()
    # kopf watches both custom resources: without these the recorder saw no operator at all.
    assert {RbacUse("managedagents.dev", "environments", "watch"),
            RbacUse("managedagents.dev", "workerpools", "watch")} <= recorded, sorted(recorded)
    # kopf's own traffic is what its documentation says (in one mode or the other).
    kopf_traffic = recorded - _controller_uses(recorded)
    assert kopf_traffic <= KOPF_NEEDS[ALL_NAMESPACES] | KOPF_NEEDS[NAMESPACED], sorted(kopf_traffic)


@pytest.mark.parametrize("mode", MODES)
def test_chart_grants_every_recorded_request(mode: str) -> None:
    recorded = _recorded()
    scopes = _effective(granted(render(MODES[mode])), mode)
    missing = {
        scope: sorted(need for need in _needs(mode, recorded)
                      if is_cluster_scoped(need) == (scope == "cluster") and need not in grants)
        for scope, grants in scopes.items()
    }
    assert all(not m for m in missing.values()), f"not granted ({len(RECORD.tests_run)} e2e tests): {missing}"


@pytest.mark.parametrize("mode", MODES)
def test_chart_grants_nothing_unused(mode: str) -> None:
    recorded = _recorded()
    if RECORD.tests_failed:
        # Those failures fail the session already; a grant they never reached proves nothing.
        pytest.skip(f"{len(RECORD.tests_failed)} end-to-end tests failed, so the record may be incomplete: "
                    f"cannot tell an unused grant from an unreached one (first: {RECORD.tests_failed[0]})")
    allowed = _needs(mode, recorded) | ADMISSION_NEEDS
    scopes = _effective(granted(render(MODES[mode])), mode)
    unused = {scope: sorted(grants - allowed) for scope, grants in scopes.items()}
    assert all(not u for u in unused.values()), f"granted but never used: {unused}"
