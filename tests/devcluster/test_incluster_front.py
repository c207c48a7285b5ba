"""The in-cluster front: the fake apiserver over HTTPS, with tokens and RBAC, as pods reach it."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from environments_operator.devcluster.incluster import (
    InClusterFront,
    RequestAttributes,
    ServiceAccountUser,
    authorize,
    field_selector_name,
    start_incluster_front,
)
from environments_operator.devcluster.kube import (
    PODS,
    ROLEBINDINGS,
    ROLES,
    SECRETS,
    SERVICEACCOUNTS,
    Kube,
)

NAMESPACE = "ns"
READER = ServiceAccountUser(NAMESPACE, "reader")


def role(name: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NAMESPACE}, "rules": list(rules)}


def binding(name: str, role_name: str, *subjects: dict[str, Any], role_kind: str = "Role") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role_name},
            "subjects": list(subjects)}


def sa(name: str = "reader", namespace: str | None = None) -> dict[str, Any]:
    subject = {"kind": "ServiceAccount", "name": name}
    return subject if namespace is None else {**subject, "namespace": namespace}


def secret(name: str, value: bytes = b"v") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NAMESPACE}, "data": {"k": base64.b64encode(value).decode()}}


ONE_SECRET = role("r", {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch"], "resourceNames": ["x"]})


def attrs(verb: str, resource: str = "secrets", name: str | None = "x", *, group: str = "",
          namespace: str | None = NAMESPACE, subresource: str | None = None) -> RequestAttributes:
    return RequestAttributes(verb, group, resource, subresource, namespace, name)


class TestAuthorizeDecision:
    """RBAC as a pure decision over Roles and RoleBindings."""

    @pytest.mark.parametrize(("request_", "allowed"), [
        (attrs("get"), True),
        (attrs("watch"), True),  # a watch with fieldSelector metadata.name=x names x
        (attrs("get", name="y"), False),
        (attrs("list", name=None), False),  # a list without a name is not "x"
        (attrs("watch", name=None), False),
        (attrs("delete"), False),
        (attrs("get", "configmaps"), False),
        (attrs("get", group="apps"), False),
        (attrs("get", namespace="other"), False),
        (attrs("get", namespace=None), False),  # across namespaces: only a ClusterRole could allow it
    ])
    def test_a_role_for_one_named_secret(self, request_: RequestAttributes, allowed: bool) -> None:
        assert authorize(READER, request_, [ONE_SECRET], [binding("b", "r", sa())]) is allowed

    @pytest.mark.parametrize(("subject", "allowed"), [
        (sa(), True),
        (sa(namespace=NAMESPACE), True),
        (sa(namespace="other"), False),
        (sa("writer"), False),
        ({"kind": "User", "name": "system:serviceaccount:ns:reader"}, True),
        ({"kind": "User", "name": "reader"}, False),
        ({"kind": "Group", "name": "system:serviceaccounts:ns"}, True),
        ({"kind": "Group", "name": "system:serviceaccounts"}, True),
        ({"kind": "Group", "name": "system:serviceaccounts:other"}, False),
    ])
    def test_who_a_binding_names(self, subject: dict[str, Any], allowed: bool) -> None:
        assert authorize(READER, attrs("get"), [ONE_SECRET], [binding("b", "r", subject)]) is allowed

    @pytest.mark.parametrize(("rule", "request_", "allowed"), [
        ({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, attrs("delete", "pods", "p"), True),
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, attrs("get", "pods", "p", subresource="status"),
         False),
        ({"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get"]},
         attrs("get", "pods", "p", subresource="status"), True),
        ({"apiGroups": [""], "resources": ["*/status"], "verbs": ["get"]},
         attrs("get", "pods", "p", subresource="status"), True),
        ({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["list"]},
         attrs("list", "roles", None, group="rbac.authorization.k8s.io"), True),
        ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"], "resourceNames": ["x"]},
         attrs("create", name=None), False),  # resourceNames cannot restrict a create
    ])
    def test_rules(self, rule: dict[str, Any], request_: RequestAttributes, allowed: bool) -> None:
        assert authorize(READER, request_, [role("r", rule)], [binding("b", "r", sa())]) is allowed

    def test_a_binding_to_a_cluster_role_or_a_missing_role_allows_nothing(self) -> None:
        everything = {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}
        assert not authorize(READER, attrs("get"), [role("r", everything)],
                             [binding("b", "r", sa(), role_kind="ClusterRole")])
        assert not authorize(READER, attrs("get"), [], [binding("b", "r", sa())])
        assert not authorize(READER, attrs("get"), [role("r", everything)], [])

    @pytest.mark.parametrize(("selector", "name"), [
        ("metadata.name=x", "x"), ("metadata.name==x", "x"), ("type=Opaque,metadata.name=x", "x"),
        ("metadata.name!=x", None), ("metadata.namespace=x", None), (None, None),
    ])
    def test_a_field_selector_on_the_name_names_the_object(self, selector: str | None, name: str | None) -> None:
        assert field_selector_name(selector) == name


@pytest.fixture
async def front(kube: Kube) -> AsyncIterator[InClusterFront]:
    kube.ensure_namespace(NAMESPACE)
    async with start_incluster_front(kube) as running:
        yield running


@pytest.fixture
async def client(front: InClusterFront) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=front.url, connector=aiohttp.TCPConnector(
            ssl=front.client_ssl_context())) as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def grant_one_secret(kube: Kube) -> None:
    kube.create(SERVICEACCOUNTS, {"metadata": {"name": "reader"}}, NAMESPACE)
    kube.create(ROLES, ONE_SECRET, NAMESPACE)
    kube.create(ROLEBINDINGS, binding("b", "r", sa()), NAMESPACE)


class TestAuthentication:
    async def test_without_a_token_or_with_one_it_did_not_issue_the_answer_is_401(
        self, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        for headers in ({}, bearer("made-up"), {"Authorization": "Basic dXNlcjpwYXNz"}):
            async with client.get(SECRETS.path(NAMESPACE, "x"), headers=headers) as response:
                assert response.status == 401
                body = await response.json()
                assert (body["kind"], body["reason"], body["code"]) == ("Status", "Unauthorized", 401)
        assert [r.code for r in front.requests] == [401, 401, 401]

    async def test_a_revoked_token_or_one_of_a_deleted_service_account_stops_working(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        grant_one_secret(kube)
        kube.create(SECRETS, secret("x"), NAMESPACE)
        revoked, orphaned = front.issue_token(NAMESPACE, "reader"), front.issue_token(NAMESPACE, "reader")
        front.revoke_token(revoked)
        async with client.get(SECRETS.path(NAMESPACE, "x"), headers=bearer(revoked)) as response:
            assert response.status == 401
        async with client.get(SECRETS.path(NAMESPACE, "x"), headers=bearer(orphaned)) as response:
            assert response.status == 200
        kube.delete(SERVICEACCOUNTS, "reader", NAMESPACE)
        kube.create(SERVICEACCOUNTS, {"metadata": {"name": "reader"}}, NAMESPACE)  # another uid
        async with client.get(SECRETS.path(NAMESPACE, "x"), headers=bearer(orphaned)) as response:
            assert response.status == 401

    async def test_tls_is_real_the_front_is_trusted_only_through_its_ca(self, front: InClusterFront) -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(front.url + "/api")
        assert b"BEGIN CERTIFICATE" in front.ca_pem
        assert ssl.PEM_cert_to_DER_cert(front.ca_pem.decode())


class TestAuthorization:
    async def test_a_role_for_one_secret_allows_get_and_a_watch_of_it_and_nothing_else(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        grant_one_secret(kube)
        kube.create(SECRETS, secret("x", b"mine"), NAMESPACE)
        kube.create(SECRETS, secret("y", b"not mine"), NAMESPACE)
        headers = bearer(front.issue_token(NAMESPACE, "reader"))
        async with client.get(SECRETS.path(NAMESPACE, "x"), headers=headers) as response:
            assert response.status == 200
            assert base64.b64decode((await response.json())["data"]["k"]) == b"mine"
        async with client.get(SECRETS.path(NAMESPACE, "y"), headers=headers) as response:
            assert response.status == 403
            body = await response.json()
        assert body["reason"] == "Forbidden"
        assert body["message"] == ('secrets "y" is forbidden: User "system:serviceaccount:ns:reader" cannot get '
                                   'resource "secrets" in API group "" in the namespace "ns"')
        async with client.get(SECRETS.path(NAMESPACE), headers=headers) as response:
            assert response.status == 403
            assert (await response.json())["message"].startswith(
                'secrets is forbidden: User "system:serviceaccount:ns:reader" cannot list resource "secrets"')
        async with client.get(SECRETS.path(), headers=headers) as response:
            assert response.status == 403
            assert (await response.json())["message"].endswith("at the cluster scope")
        async with client.delete(SECRETS.path(NAMESPACE, "x"), headers=headers) as response:
            assert response.status == 403
        async with client.get(PODS.path(NAMESPACE, "p"), headers=headers) as response:
            assert response.status == 403
        assert kube.get(SECRETS, "x", NAMESPACE) is not None
        # What got through is a pod's request, not the operator's: the operator's record is untouched.
        assert [(user, call.verb, call.name) for user, call in kube.incluster_calls] == \
            [("system:serviceaccount:ns:reader", "get", "x")]
        assert kube.calls == []

    async def test_roles_and_bindings_are_read_at_each_request(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        grant_one_secret(kube)
        kube.create(SECRETS, secret("y"), NAMESPACE)
        headers = bearer(front.issue_token(NAMESPACE, "reader"))
        async with client.get(SECRETS.path(NAMESPACE, "y"), headers=headers) as response:
            assert response.status == 403
        kube.patch(ROLES, "r", {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
                   NAMESPACE)
        async with client.get(SECRETS.path(NAMESPACE, "y"), headers=headers) as response:
            assert response.status == 200
        kube.delete(ROLEBINDINGS, "b", NAMESPACE)
        async with client.get(SECRETS.path(NAMESPACE, "y"), headers=headers) as response:
            assert response.status == 403

    async def test_discovery_is_open_to_every_authenticated_user(
        self, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        headers = bearer(front.issue_token(NAMESPACE))  # default: no Role at all
        async with client.get("/api/v1", headers=headers) as response:
            assert response.status == 200
            assert (await response.json())["groupVersion"] == "v1"
        async with client.get("/metrics", headers=headers) as response:
            assert response.status == 403

    async def test_the_operators_faults_do_not_touch_pods_requests(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        grant_one_secret(kube)
        kube.create(SECRETS, secret("x"), NAMESPACE)
        kube.fail("get", SECRETS, code=500, times=None)
        async with client.get(SECRETS.path(NAMESPACE, "x"), headers=bearer(front.issue_token(NAMESPACE, "reader"))) \
                as response:
            assert response.status == 200


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events = []
    while len(events) < count:
        line = await asyncio.wait_for(response.content.readline(), 10)
        assert line, f"the stream ended after {events}"
        events.append(json.loads(line))
    return events


class TestWatchThroughTheFront:
    async def test_a_watch_of_one_named_secret_streams_its_creation_and_changes(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        grant_one_secret(kube)
        kube.create(SECRETS, secret("y"), NAMESPACE)
        headers = bearer(front.issue_token(NAMESPACE, "reader"))
        query = {"watch": "true", "fieldSelector": "metadata.name=x"}
        async with client.get(SECRETS.path(NAMESPACE), params=query, headers=headers) as response:
            assert response.status == 200
            await kube.wait_until(lambda: any(call.verb == "watch" for _, call in kube.incluster_calls))
            kube.create(SECRETS, secret("z"), NAMESPACE)  # not selected
            kube.create(SECRETS, secret("x", b"assigned"), NAMESPACE)
            kube.patch(SECRETS, "x", {"data": {"k": base64.b64encode(b"changed").decode()}}, NAMESPACE)
            added, modified = await read_events(response, 2)
        assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "x")
        assert base64.b64decode(added["object"]["data"]["k"]) == b"assigned"
        assert modified["type"] == "MODIFIED"

    async def test_a_watch_of_another_name_is_forbidden(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        grant_one_secret(kube)
        headers = bearer(front.issue_token(NAMESPACE, "reader"))
        query = {"watch": "1", "fieldSelector": "metadata.name=y"}
        async with client.get(SECRETS.path(NAMESPACE), params=query, headers=headers) as response:
            assert response.status == 403
            assert "cannot watch resource" in (await response.json())["message"]

    async def test_a_watch_without_a_resource_version_starts_with_the_matching_objects_as_added(
        self, kube: Kube, front: InClusterFront, client: aiohttp.ClientSession
    ) -> None:
        """"Get state and start at most recent", as a real apiserver serves a watch with no resourceVersion."""
        grant_one_secret(kube)
        kube.create(SECRETS, secret("y"), NAMESPACE)
        kube.create(SECRETS, secret("x", b"already there"), NAMESPACE)
        headers = bearer(front.issue_token(NAMESPACE, "reader"))
        query = {"watch": "true", "fieldSelector": "metadata.name=x"}
        async with client.get(SECRETS.path(NAMESPACE), params=query, headers=headers) as response:
            (added,) = await read_events(response, 1)
            kube.delete(SECRETS, "y", NAMESPACE)
            kube.delete(SECRETS, "x", NAMESPACE)
            (deleted,) = await read_events(response, 1)
        assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "x")
        assert (deleted["type"], deleted["object"]["metadata"]["name"]) == ("DELETED", "x")
