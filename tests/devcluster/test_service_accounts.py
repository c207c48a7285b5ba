"""ServiceAccounts, Roles and RoleBindings in the fake apiserver, and the ServiceAccount admission of pods."""

from __future__ import annotations

import aiohttp
import pytest

from environments_operator.devcluster.apimachinery import ApiError
from environments_operator.devcluster.kube import PODS, ROLEBINDINGS, ROLES, SERVICEACCOUNTS, Kube

NAMESPACE = "ns"


def pod(name: str, **spec: object) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"containers": [{"name": "worker", "image": "x"}], **spec}}


class TestDiscovery:
    @pytest.mark.parametrize(("path", "kind", "shortnames"), [
        ("/api/v1", "ServiceAccount", ["sa"]),
        ("/apis/rbac.authorization.k8s.io/v1", "Role", []),
        ("/apis/rbac.authorization.k8s.io/v1", "RoleBinding", []),
    ])
    async def test_the_rbac_kinds_are_served_by_default_with_their_discovery_fields(
        self, kube: Kube, path: str, kind: str, shortnames: list[str]
    ) -> None:
        async with aiohttp.ClientSession() as session, session.get(kube.url + path) as response:
            listing = await response.json()
        (found,) = [r for r in listing["resources"] if r["kind"] == kind]
        assert found["namespaced"] is True and found["singularName"] == kind.lower()
        assert sorted(found.get("shortNames") or []) == shortnames
        assert {"get", "list", "watch", "create", "update", "patch", "delete"} <= set(found["verbs"])

    async def test_roles_and_bindings_are_stored_through_http_like_any_resource(self, kube: Kube) -> None:
        kube.ensure_namespace(NAMESPACE)
        role = {"metadata": {"name": "r"}, "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(kube.url + ROLES.path(NAMESPACE), json=role) as response:
                assert response.status == 201
                assert (await response.json())["apiVersion"] == "rbac.authorization.k8s.io/v1"
        assert kube.get(ROLES, "r", NAMESPACE) is not None
        assert ROLEBINDINGS.path(NAMESPACE) == "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/rolebindings"


class TestServiceAccountAdmission:
    def test_a_pod_naming_a_missing_service_account_is_forbidden(self, kube: Kube) -> None:
        kube.ensure_namespace(NAMESPACE)
        with pytest.raises(ApiError) as refused:
            kube.create(PODS, pod("p", serviceAccountName="reader"), NAMESPACE)
        assert (refused.value.code, refused.value.reason) == (403, "Forbidden")
        assert refused.value.message == ('pods "p" is forbidden: error looking up service account ns/reader: '
                                         'serviceaccount "reader" not found')
        assert kube.get(PODS, "p", NAMESPACE) is None

    async def test_over_http_too(self, kube: Kube) -> None:
        kube.ensure_namespace(NAMESPACE)
        async with aiohttp.ClientSession() as session, \
                session.post(kube.url + PODS.path(NAMESPACE), json=pod("p", serviceAccountName="reader")) as response:
            assert response.status == 403
            assert (await response.json())["reason"] == "Forbidden"

    def test_a_pod_naming_an_existing_or_the_default_service_account_is_created(self, kube: Kube) -> None:
        kube.ensure_namespace(NAMESPACE)
        kube.create(SERVICEACCOUNTS, {"metadata": {"name": "reader"}}, NAMESPACE)
        kube.create(PODS, pod("named", serviceAccountName="reader"), NAMESPACE)
        kube.create(PODS, pod("default", serviceAccountName="default"), NAMESPACE)
        kube.create(PODS, pod("unnamed"), NAMESPACE)

    def test_the_service_account_must_be_in_the_pods_namespace(self, kube: Kube) -> None:
        kube.ensure_namespace(NAMESPACE)
        kube.ensure_namespace("other")
        kube.create(SERVICEACCOUNTS, {"metadata": {"name": "reader"}}, "other")
        with pytest.raises(ApiError, match="forbidden"):
            kube.create(PODS, pod("p", serviceAccountName="reader"), NAMESPACE)
