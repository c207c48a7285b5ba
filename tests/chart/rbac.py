"""The RBAC a rendered chart grants, as (apiGroup, resource, verb) triples, and what kopf itself needs.

``granted(objects)`` follows the bindings to the operator's ServiceAccount and expands every rule into
``RbacUse`` triples (the recorder's shape), separately for the cluster scope and for each namespace.
``KOPF_NEEDS`` is the static part: kopf's documented needs for discovery and peering, per mode.
It only reads rendered manifests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from environments_operator.devcluster.recorder import RbacUse
from tests.chart.rendering import FULLNAME, JSON, RELEASE_NAMESPACE, SCENARIOS

# Cluster-scoped resources the operator touches; everything else it uses is namespaced.
CLUSTER_SCOPED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("", "namespaces"),
    ("kopf.dev", "clusterkopfpeerings"),
}

ALL_NAMESPACES = "all-namespaces"
NAMESPACED = "namespaced"
# The two RBAC layouts, and the scenario that renders each.
MODES: dict[str, JSON] = {ALL_NAMESPACES: SCENARIOS["default"], NAMESPACED: SCENARIOS["namespaced"]}


def _uses(group: str, resource: str, *verbs: str) -> frozenset[RbacUse]:
    return frozenset(RbacUse(group, resource, verb) for verb in verbs)


# kopf's needs, from its documentation (docs/deployment-rbac.yaml, docs/peering.rst) and its code
# (kopf/_core/reactor/observation.py, kopf/_core/engines/peering.py), in each mode:
# - CRD discovery: it lists and watches CRDs to notice resources appearing, changing and going away;
# - the namespace scan (only with a namespace list): it lists and watches namespaces to learn which
#   of the listed ones exist;
# - peering: it lists and watches the peering objects and patches its own record into the status of
#   the one named by ENVIRONMENTS_OPERATOR_PEERING_NAME (ClusterKopfPeering cluster-wide, a
#   KopfPeering in each served namespace otherwise).
KOPF_NEEDS: dict[str, frozenset[RbacUse]] = {
    ALL_NAMESPACES: (_uses("apiextensions.k8s.io", "customresourcedefinitions", "list", "watch")
                     | _uses("kopf.dev", "clusterkopfpeerings", "list", "watch", "patch")),
    NAMESPACED: (_uses("apiextensions.k8s.io", "customresourcedefinitions", "list", "watch")
                 | _uses("", "namespaces", "list", "watch")
                 | _uses("kopf.dev", "kopfpeerings", "list", "watch", "patch")),
}
KOPF_RESOURCES = {(use.group, use.resource) for needs in KOPF_NEEDS.values() for use in needs}

# Permissions that no request uses but admission checks: with OwnerReferencesPermissionEnforcement
# (on by default on OpenShift), an owner reference with blockOwnerDeletion to a WorkerPool (worker pods
# and their Secrets) needs `update` on workerpools/finalizers. And RBAC's escalation check: the
# operator may create a warm pod's Role (get and watch its assignment Secret) only if it holds those
# permissions itself, so it holds `watch` on secrets, which it never calls.
ADMISSION_NEEDS = frozenset({RbacUse("managedagents.dev", "workerpools/finalizers", "update"),
                             RbacUse("", "secrets", "watch")})


def is_cluster_scoped(use: RbacUse) -> bool:
    return (use.group, use.resource.split("/")[0]) in CLUSTER_SCOPED


@dataclass
class Granted:
    """What the operator's ServiceAccount may do: cluster-wide, and in each namespace via a Role."""

    cluster: set[RbacUse] = field(default_factory=set)
    namespaces: dict[str, set[RbacUse]] = field(default_factory=dict)
    # (resource triple) -> resourceNames, for rules restricted to named objects.
    named: dict[RbacUse, set[str]] = field(default_factory=dict)

    def in_namespace(self, namespace: str) -> set[RbacUse]:
        """Everything usable in a namespace: a ClusterRole's namespaced grants apply there too."""
        return {u for u in self.cluster if not is_cluster_scoped(u)} | self.namespaces.get(namespace, set())


def expand(rules: list[JSON]) -> tuple[set[RbacUse], dict[RbacUse, set[str]]]:
    uses: set[RbacUse] = set()
    named: dict[RbacUse, set[str]] = {}
    for rule in rules:
        assert "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    use = RbacUse(group, resource, verb)
                    uses.add(use)
                    if "resourceNames" in rule:
                        named.setdefault(use, set()).update(rule["resourceNames"])
    return uses, named


def _binds_operator(binding: JSON) -> bool:
    return any(
        s["kind"] == "ServiceAccount" and s["name"] == FULLNAME and s["namespace"] == RELEASE_NAMESPACE
        for s in binding["subjects"]
    )


def granted(objects: list[JSON]) -> Granted:
    """Follows every (Cluster)RoleBinding of the operator's ServiceAccount to the rules it grants."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("ClusterRole", "Role")}
    result = Granted()
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding") or not _binds_operator(binding):
            continue
        namespace = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role_namespace = namespace if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_namespace, ref["name"])]
        uses, named = expand(role["rules"])
        if binding["kind"] == "ClusterRoleBinding":
            result.cluster |= uses
        else:
            # A RoleBinding grants namespaced resources only, even when it binds a ClusterRole.
            result.namespaces.setdefault(namespace, set()).update(u for u in uses if not is_cluster_scoped(u))
        for use, names in named.items():
            result.named.setdefault(use, set()).update(names)
    return result
