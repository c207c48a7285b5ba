"""Pods of the process kubelet reach the API as in a cluster: in-cluster config, a mounted token, RBAC.

Each pod here is a real process (this Python, or sh) in a mount namespace of its own; the in-cluster
client in the pods is the official ``kubernetes`` package's ``load_incluster_config``.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from environments_operator.devcluster import process_kubelet
from environments_operator.devcluster.incluster import InClusterFront, start_incluster_front
from environments_operator.devcluster.kube import PODS, ROLEBINDINGS, ROLES, SECRETS, SERVICEACCOUNTS, Kube
from environments_operator.devcluster.process_kubelet import SERVICE_ACCOUNT_PATH, ProcessKubelet

NAMESPACE = "ns"
IMAGE = "local/worker:test"
TOKEN_FILE = f"{SERVICE_ACCOUNT_PATH}/token"

# What a warm worker will do: watch its one assignment Secret, read it, and be refused everything else.
READER = r'''
import base64, http.client, json, os, ssl
from kubernetes import client, config, watch

config.load_incluster_config()
print("SERVICE", os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], flush=True)
api = client.CoreV1Api()
directory = "/var/run/secrets/kubernetes.io/serviceaccount"
namespace = open(f"{directory}/namespace").read()
stream = watch.Watch()
for event in stream.stream(api.list_namespaced_secret, namespace, field_selector="metadata.name=x",
                           timeout_seconds=20):
    print("EVENT", event["type"], event["object"].metadata.name, flush=True)
    break
stream.stop()
print("GET x", base64.b64decode(api.read_namespaced_secret("x", namespace).data["k"]).decode())
for what, call in (("y", lambda: api.read_namespaced_secret("y", namespace)),
                   ("list", lambda: api.list_namespaced_secret(namespace))):
    try:
        call()
        print("ALLOWED", what)
    except client.ApiException as error:
        print("DENIED", what, error.status, json.loads(error.body)["message"])
# TLS is verified against the mounted ca.crt, and fails against the system's CAs.
host, port = os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"])
token = open(f"{directory}/token").read()
for name, context in (("ca.crt", ssl.create_default_context(cafile=f"{directory}/ca.crt")),
                      ("system", ssl.create_default_context())):
    connection = http.client.HTTPSConnection(host, port, context=context)
    try:
        connection.request("GET", "/api", headers={"Authorization": f"Bearer {token}"})
        print("TLS", name, connection.getresponse().status)
    except ssl.SSLCertVerificationError:
        print("TLS", name, "unverified")
'''


@pytest.fixture
async def front(kube: Kube) -> AsyncIterator[InClusterFront]:
    kube.ensure_namespace(NAMESPACE)
    async with start_incluster_front(kube) as running:
        yield running


@pytest.fixture
async def node(kube: Kube, front: InClusterFront, tmp_path: Path) -> AsyncIterator[ProcessKubelet]:
    kubelet = ProcessKubelet(kube, images={IMAGE}, root=tmp_path / "node", stop_grace_seconds=2, front=front)
    kubelet.start()
    try:
        yield kubelet
    finally:
        await kubelet.stop()


def create_pod(kube: Kube, name: str, argv: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "worker", "image": IMAGE, "command": argv[:1], "args": argv[1:]}
    return kube.create(PODS, {"metadata": {"name": name, "namespace": NAMESPACE},
                              "spec": {"containers": [container], "restartPolicy": "Never", **spec}}, NAMESPACE)


async def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    pod = await kube.wait_for(PODS, name, lambda p: p is not None and p.get("status", {}).get("phase") == phase,
                              NAMESPACE, timeout=timeout)
    assert pod is not None
    return pod


def waiting(pod: dict[str, Any] | None) -> dict[str, Any]:
    statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
    state: dict[str, Any] = statuses[0].get("state", {}).get("waiting", {})
    return state


def exit_code(pod: dict[str, Any]) -> int:
    code: int = pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
    return code


def secret(name: str, value: bytes) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NAMESPACE}, "data": {"k": base64.b64encode(value).decode()}}


def grant_one_secret(kube: Kube, account: str, secret_name: str) -> None:
    """What the operator will make for a warm pod: a ServiceAccount that can get and watch one Secret."""
    kube.create(SERVICEACCOUNTS, {"metadata": {"name": account}}, NAMESPACE)
    kube.create(ROLES, {"metadata": {"name": account}, "rules": [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch"], "resourceNames": [secret_name]}]},
        NAMESPACE)
    kube.create(ROLEBINDINGS, {"metadata": {"name": account},
                               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
                               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]},
                NAMESPACE)


class TestAPodReadsItsAssignment:
    async def test_with_its_mounted_token_and_ca_it_watches_and_reads_its_secret_and_nothing_else(
        self, kube: Kube, front: InClusterFront, node: ProcessKubelet
    ) -> None:
        grant_one_secret(kube, "warm", "x")
        kube.create(SECRETS, secret("y", b"someone else's"), NAMESPACE)
        create_pod(kube, "warm", [sys.executable, "-c", READER], serviceAccountName="warm")
        # The pod's watch is open before its Secret exists: the Secret's creation reaches it as ADDED.
        await kube.wait_until(lambda: any(call.verb == "watch" for _, call in kube.incluster_calls), timeout=30,
                              message=lambda: f"the pod's watch; log:\n{node.log('warm')}")
        kube.create(SECRETS, secret("x", b"assigned"), NAMESPACE)
        pod = await wait_phase(kube, "warm", "Succeeded")
        lines = node.log("warm").splitlines()
        assert exit_code(pod) == 0, lines
        assert f"SERVICE 127.0.0.1 {front.port}" in lines
        assert "EVENT ADDED x" in lines and "GET x assigned" in lines
        assert 'DENIED y 403 secrets "y" is forbidden: User "system:serviceaccount:ns:warm" cannot get resource ' \
               '"secrets" in API group "" in the namespace "ns"' in lines
        assert 'DENIED list 403 secrets is forbidden: User "system:serviceaccount:ns:warm" cannot list resource ' \
               '"secrets" in API group "" in the namespace "ns"' in lines
        assert "TLS ca.crt 200" in lines and "TLS system unverified" in lines
        assert {user for user, _ in kube.incluster_calls} == {"system:serviceaccount:ns:warm"}
        assert kube.calls == []  # none of it is an operator request

    async def test_the_token_is_the_pods_own_mounted_for_it_alone_and_dies_with_it(
        self, kube: Kube, front: InClusterFront, node: ProcessKubelet
    ) -> None:
        listing = f"cat {SERVICE_ACCOUNT_PATH}/namespace; echo; ls {SERVICE_ACCOUNT_PATH}"
        create_pod(kube, "plain", ["sh", "-c", listing])
        await wait_phase(kube, "plain", "Succeeded")
        assert node.log("plain").split() == [NAMESPACE, "ca.crt", "namespace", "token"]
        assert not os.path.exists(TOKEN_FILE)  # the mount stayed in the pod's namespace
        token = (node.root / "plain" / "serviceaccount" / "token").read_text()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=front.client_ssl_context())) as session, \
                session.get(front.url + "/api", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 401  # revoked when the process ended

    async def test_the_mount_is_read_only(self, kube: Kube, node: ProcessKubelet) -> None:
        # Writes only where the token is mounted (never to this machine's own path): 9 if refused.
        create_pod(kube, "writer", ["sh", "-c", f"test -e {TOKEN_FILE} || exit 1; "
                                                f"(echo forged > {TOKEN_FILE}) 2>/dev/null && exit 0 || exit 9"])
        assert exit_code(await wait_phase(kube, "writer", "Failed")) == 9


class TestWhoGetsAToken:
    async def test_a_pod_with_automount_false_sees_no_token_but_still_the_service_address(
        self, kube: Kube, front: InClusterFront, node: ProcessKubelet
    ) -> None:
        create_pod(kube, "fresh", ["sh", "-c", f"test ! -e {TOKEN_FILE} && echo $KUBERNETES_SERVICE_HOST:"
                                               f"$KUBERNETES_SERVICE_PORT"], automountServiceAccountToken=False)
        pod = await wait_phase(kube, "fresh", "Succeeded")
        assert exit_code(pod) == 0 and node.log("fresh").strip() == f"127.0.0.1:{front.port}"
        assert not (node.root / "fresh" / "serviceaccount").exists()

    async def test_the_service_accounts_automount_applies_unless_the_pod_says_otherwise(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        kube.create(SERVICEACCOUNTS, {"metadata": {"name": "quiet"}, "automountServiceAccountToken": False}, NAMESPACE)
        create_pod(kube, "inherits", ["test", "!", "-e", TOKEN_FILE], serviceAccountName="quiet")
        create_pod(kube, "overrides", ["test", "-e", TOKEN_FILE], serviceAccountName="quiet",
                   automountServiceAccountToken=True)
        assert exit_code(await wait_phase(kube, "inherits", "Succeeded")) == 0
        assert exit_code(await wait_phase(kube, "overrides", "Succeeded")) == 0

    async def test_a_service_account_deleted_before_the_pod_starts_keeps_it_waiting(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        kube.create(SERVICEACCOUNTS, {"metadata": {"name": "gone"}}, NAMESPACE)
        create_pod(kube, "orphan", ["true"], serviceAccountName="gone", schedulingGates=[{"name": "g"}])
        kube.delete(SERVICEACCOUNTS, "gone", NAMESPACE)
        kube.patch(PODS, "orphan", {"spec": {"schedulingGates": None}}, NAMESPACE)
        pod = await kube.wait_for(PODS, "orphan", lambda p: waiting(p).get("reason") == "CreateContainerConfigError",
                                  NAMESPACE)
        assert waiting(pod)["message"] == 'serviceaccount "gone" not found'


class TestTheMountWrapperIsTransparent:
    async def test_exit_codes_and_signals_are_the_commands_own(self, kube: Kube, node: ProcessKubelet) -> None:
        create_pod(kube, "three", ["sh", "-c", "exit 3"])
        assert exit_code(await wait_phase(kube, "three", "Failed")) == 3
        handler = ("import signal, sys, time\n"
                   "signal.signal(signal.SIGTERM, lambda *_: (print('TERM', flush=True), sys.exit(7)))\n"
                   "print('ready', flush=True)\n"
                   "time.sleep(60)\n")
        create_pod(kube, "sleeper", [sys.executable, "-c", handler])
        await kube.wait_until(lambda: "ready" in node.log("sleeper"), timeout=30)
        kube.delete(PODS, "sleeper", NAMESPACE)
        await kube.wait_until(lambda: "sleeper" in node.exit_codes, timeout=10)
        assert node.exit_codes["sleeper"] == 7 and "TERM" in node.log("sleeper")


class TestWithoutAMountNamespace:
    async def test_a_pod_that_needs_its_token_fails_clearly_and_one_without_still_runs(
        self, kube: Kube, node: ProcessKubelet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(process_kubelet, "UNSHARE_ARGV", ("/nonexistent/unshare", "--mount"))
        create_pod(kube, "needs", ["true"])
        create_pod(kube, "without", ["true"], automountServiceAccountToken=False)
        pod = await kube.wait_for(PODS, "needs", lambda p: waiting(p).get("reason") == "CreateContainerError",
                                  NAMESPACE)
        assert "cannot mount the service-account token" in waiting(pod)["message"]
        assert "/nonexistent/unshare" in waiting(pod)["message"]
        assert exit_code(await wait_phase(kube, "without", "Succeeded")) == 0


class TestTheKubeletsOwnFront:
    async def test_without_a_front_given_it_starts_and_stops_its_own(self, kube: Kube, tmp_path: Path) -> None:
        kube.ensure_namespace(NAMESPACE)
        kubelet = ProcessKubelet(kube, images={IMAGE}, root=tmp_path / "node", stop_grace_seconds=2)
        kubelet.start()
        try:
            create_pod(kube, "env", ["sh", "-c", "echo $KUBERNETES_SERVICE_PORT"])
            await wait_phase(kube, "env", "Succeeded")
            front = kubelet.front
            assert kubelet.log("env").strip() == str(front.port)
        finally:
            await kubelet.stop()
        assert not front.started
