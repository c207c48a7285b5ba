"""The chart's RBAC, statically: no wildcard, the right scope in each mode, bound to the operator only,
kopf's own needs granted, and peering writes limited to the chart's peering object. What the
controllers use is checked against the e2e record in test_rbac_coverage.py."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from environments_operator.devcluster.kube import CLUSTER_KOPF_PEERINGS, ENVIRONMENTS, KOPF_PEERINGS, WORKERPOOLS, Kube
from tests.chart.rbac import (
    ADMISSION_NEEDS,
    ALL_NAMESPACES,
    KOPF_NEEDS,
    MODES,
    NAMESPACED,
    expand,
    granted,
    is_cluster_scoped,
)
from tests.chart.rendering import FULLNAME, SCENARIOS, WATCHED, of_kind, only, render
from tests.harness.operator import run_operator


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_wildcards_and_no_escalation(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
        uses, _ = expand(role["rules"])  # asserts no "*"
        assert not {u.verb for u in uses} & {"escalate", "bind", "impersonate", "deletecollection"}
        assert {u for u in uses if u.verb == "update"} <= ADMISSION_NEEDS, "updates go through patches"
        assert not {u.resource for u in uses} & {"clusterroles", "clusterrolebindings", "serviceaccounts/token",
                                                 "nodes", "pods/exec"}
        # Warm pods' ServiceAccounts, Roles and RoleBindings are made and deleted, never read or changed:
        # without escalate or bind, a Role the operator makes can grant nothing it does not hold itself.
        assert {u.verb for u in uses if u.resource in ("roles", "rolebindings", "serviceaccounts")} <= {
            "list", "create", "delete"}


def test_all_namespaces_mode_uses_one_cluster_role() -> None:
    objects = render(MODES[ALL_NAMESPACES])
    assert of_kind(objects, "Role") == [] and of_kind(objects, "RoleBinding") == []
    assert only(objects, "ClusterRoleBinding")["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert KOPF_NEEDS[ALL_NAMESPACES] <= granted(objects).cluster


def test_namespaced_mode_grants_namespaced_resources_only_in_the_listed_namespaces() -> None:
    objects = render(MODES[NAMESPACED])
    rbac = granted(objects)
    assert all(is_cluster_scoped(u) for u in rbac.cluster), "the ClusterRole holds only cluster-scoped needs"
    assert set(rbac.namespaces) == set(WATCHED)
    for namespace in WATCHED:
        # The same rules in each namespace; in particular Secrets are readable only there.
        assert rbac.namespaces[namespace] == rbac.namespaces[WATCHED[0]]
        assert {u.resource for u in rbac.namespaces[namespace]} >= {"secrets", "pods", "environments", "workerpools"}
    needs = KOPF_NEEDS[NAMESPACED]
    assert {u for u in needs if is_cluster_scoped(u)} <= rbac.cluster
    assert {u for u in needs if not is_cluster_scoped(u)} <= rbac.namespaces[WATCHED[0]]


def test_modes_grant_the_same_namespaced_permissions() -> None:
    """A namespace list narrows where the operator may act, never what it may do there."""
    cluster_wide = granted(render(MODES[ALL_NAMESPACES])).in_namespace("anywhere")
    namespaced = granted(render(MODES[NAMESPACED])).in_namespace(WATCHED[0])
    peering = {"kopfpeerings", "clusterkopfpeerings"}
    assert {u for u in cluster_wide if u.resource not in peering} == {
        u for u in namespaced if u.resource not in peering}
    assert granted(render(MODES[NAMESPACED])).in_namespace("elsewhere") == set()


@pytest.mark.parametrize("mode", MODES)
def test_peering_writes_only_the_charts_peering_object(mode: str) -> None:
    objects = render(MODES[mode])
    rbac = granted(objects)
    kind, resource = ("ClusterKopfPeering", "clusterkopfpeerings") if mode == ALL_NAMESPACES else (
        "KopfPeering", "kopfpeerings")
    names = {o["metadata"]["name"] for o in of_kind(objects, kind)}
    patch = next(u for u in rbac.named if u.resource == resource and u.verb == "patch")
    assert rbac.named[patch] == names == {FULLNAME}


def test_standalone_mode_grants_no_peering() -> None:
    rbac = granted(render(SCENARIOS["standalone"]))
    assert not [u for u in rbac.cluster if u.group == "kopf.dev"]


def test_rbac_can_be_left_to_the_administrator() -> None:
    objects = render(SCENARIOS["no-rbac"])
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    assert of_kind(objects, "ServiceAccount") == []
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "preexisting"


# ---- kopf's own needs, observed -------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_kopf_needs_are_what_kopf_does(kube: Kube, mode: str) -> None:
    """The real kopf loop, with peering as the chart configures it, sends exactly KOPF_NEEDS[mode] besides
    its watches of our resources; and it patches only the peering object it is named (hence the
    chart's resourceNames restriction). Not an e2e test: it runs kopf with no controller logic."""
    registry = kopf.OperatorRegistry()
    for resource in (ENVIRONMENTS, WORKERPOOLS):
        kopf.on.event(resource.group, resource.version, resource.plural, registry=registry)(_ignore)
    peering_name = "peering-under-test"
    if mode == ALL_NAMESPACES:
        kube.create(CLUSTER_KOPF_PEERINGS, {"metadata": {"name": peering_name}})
        scope: dict[str, Any] = {"clusterwide": True}
    else:
        for namespace in WATCHED:
            kube.ensure_namespace(namespace)
            kube.create(KOPF_PEERINGS, {"metadata": {"name": peering_name}}, namespace)
        scope = {"namespaces": WATCHED}
    async with run_operator(kube, registry=registry, standalone=False, peering_name=peering_name, **scope):
        await kube.wait_until(lambda: [c for c in kube.calls if c.verb == "patch"], message="a peering keep-alive")
    ours = {(r.group, r.plural) for r in (ENVIRONMENTS, WORKERPOOLS)}
    assert {u for u in kube.rbac_uses() if (u.group, u.resource) not in ours} == KOPF_NEEDS[mode]
    assert {c.name for c in kube.calls if c.verb == "patch"} == {peering_name}


async def _ignore(**_: Any) -> None:
    return None
