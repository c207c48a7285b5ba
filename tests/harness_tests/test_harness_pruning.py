"""What a real apiserver would prune from, default in, or reject in a stored custom object."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from environments_operator.devcluster.apimachinery import ApiError
from environments_operator.devcluster.kube import Kube
from environments_operator.devcluster.pruning import assert_storable, storage_problems

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "metadata": {"type": "object"},
                    "spec": {"type": "object", "required": ["size"], "x-kubernetes-validations": [
                        {"rule": "self.size <= 10", "message": "size must be at most 10"},
                        {"rule": "self.size >= oldSelf.size", "message": "size may not shrink"},
                    ], "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                        "note": {"type": "string", "nullable": True},
                        "port": {"x-kubernetes-int-or-string": True},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "items": {"type": "array", "items": {"type": "object", "properties": {
                            "name": {"type": "string"}}}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    }},
                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                },
            }},
        }],
    },
}
VALID = {"apiVersion": "example.dev/v1", "kind": "Widget",
         "metadata": {"name": "w", "namespace": "ns", "annotations": {"kopf.zalando.org/x": "{}"}},
         "spec": {"size": 2, "note": None, "port": "http", "labels": {"any": "thing"}, "items": [{"name": "i"}],
                  "free": {"whatever": {"deep": 1}}},
         "status": {"phase": "Ready"}}


def with_changes(**changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = obj
        for parent in parents:
            node = node[int(parent)] if isinstance(node, list) else node[parent]
        node[last] = value
    return obj


def test_a_valid_object_has_no_problems() -> None:
    assert storage_problems(VALID, CRD) == []
    assert_storable(VALID, CRD)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"status__kopf": {"progress": {}}}, "status.kopf: unknown field, would be pruned"),
    ({"spec__items__0__extra": 1}, "spec.items[0].extra: unknown field, would be pruned"),
    ({"topLevel": 1}, "topLevel: unknown field, would be pruned"),
    ({"spec__size": "big"}, "spec.size: 'big' is not of type 'integer'"),
    ({"spec__size": 0}, "spec.size: 0 is less than the minimum of 1"),
    ({"spec__mode": "c"}, "spec.mode: 'c' is not one of ['a', 'b']"),
    ({"spec__port": 1.5}, "spec.port: 1.5 is not valid under any of the given schemas"),
    ({"spec__labels": {"k": 1}}, "spec.labels.k: 1 is not of type 'string'"),
])
def test_problems_name_the_field_and_the_reason(changes: dict[str, Any], problem: str) -> None:
    assert storage_problems(with_changes(**changes), CRD) == [problem]
    with pytest.raises(AssertionError, match="Widget ns/w is not storable"):
        assert_storable(with_changes(**changes), CRD)


async def test_an_installed_crd_prunes_defaults_and_rejects_on_write(kube: Kube) -> None:
    widgets = kube.install_crd(CRD)
    stored = kube.create(widgets, {"metadata": {"name": "w"}, "spec": {"size": 1, "typo": True}}, "ns")
    assert stored["spec"] == {"size": 1, "mode": "a"}  # pruned and defaulted, as the apiserver would
    kube.patch_status(widgets, "w", {"phase": "Ready", "kopf": {"progress": {}}}, "ns")
    assert kube.get(widgets, "w", "ns")["status"] == {"phase": "Ready"}
    assert [(p.name, p.path) for p in kube.pruned] == [("w", "spec.typo"), ("w", "status.kopf")]
    with pytest.raises(AssertionError, match=r"pruned on write: widgets ns/w: spec\.typo"):
        kube.assert_all_storable(CRD)
    kube.pruned.clear()
    assert kube.assert_all_storable(CRD) == 1
    with pytest.raises(ApiError, match="is not of type 'integer'"):
        kube.patch(widgets, "w", {"spec": {"size": "big"}}, "ns")


@pytest.mark.parametrize(("size", "message"), [(11, "size must be at most 10"), (1, "size may not shrink")])
async def test_an_installed_crd_enforces_its_cel_rules_on_write(kube: Kube, size: int, message: str) -> None:
    widgets = kube.install_crd(CRD)
    kube.create(widgets, {"metadata": {"name": "w"}, "spec": {"size": 2}}, "ns")
    with pytest.raises(ApiError, match=message) as refused:
        kube.patch(widgets, "w", {"spec": {"size": size}}, "ns")
    assert (refused.value.code, refused.value.reason) == (422, "Invalid")
    assert kube.get(widgets, "w", "ns")["spec"]["size"] == 2
