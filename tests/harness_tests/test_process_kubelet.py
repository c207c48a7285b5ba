"""The process kubelet: pods of the fake apiserver run as real local processes, as a node would run them."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from environments_operator import __version__
from environments_operator.devcluster.apimachinery import ApiError
from environments_operator.devcluster.kube import PODS, SECRETS, Kube
from environments_operator.devcluster.process_kubelet import ProcessKubelet

NAMESPACE = "ns"
IMAGE = "local/worker:test"


@pytest.fixture
async def node(kube: Kube, tmp_path: Path) -> AsyncIterator[ProcessKubelet]:
    kube.ensure_namespace(NAMESPACE)
    kubelet = ProcessKubelet(kube, images={IMAGE}, root=tmp_path / "node", stop_grace_seconds=2)
    kubelet.start()
    try:
        yield kubelet
    finally:
        await kubelet.stop()


def create_pod(kube: Kube, name: str, argv: list[str], *, env: list[dict[str, Any]] | None = None,
               image: str = IMAGE, **spec: Any) -> dict[str, Any]:
    container = {"name": "worker", "image": image, "command": argv[:1], "args": argv[1:], "env": env or []}
    return kube.create(PODS, {"metadata": {"name": name, "namespace": NAMESPACE},
                              "spec": {"containers": [container], "restartPolicy": "Never", **spec}}, NAMESPACE)


async def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    pod = await kube.wait_for(PODS, name, lambda p: p is not None and p.get("status", {}).get("phase") == phase,
                              NAMESPACE, timeout=timeout)
    assert pod is not None
    return pod


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    (status,) = pod["status"]["containerStatuses"]
    state: dict[str, Any] = status["state"]["terminated"]
    return state


def waiting_reason(pod: dict[str, Any] | None) -> str | None:
    statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("state", {}).get("waiting", {}).get("reason")


class TestPhasesAndExitCodes:
    async def test_a_process_that_exits_0_is_succeeded_and_nonzero_is_failed_with_its_code(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        create_pod(kube, "ok", ["sh", "-c", "exit 0"])
        create_pod(kube, "bad", ["sh", "-c", "exit 3"])
        assert terminated(await wait_phase(kube, "ok", "Succeeded"))["exitCode"] == 0
        failed = terminated(await wait_phase(kube, "bad", "Failed"))
        assert (failed["exitCode"], failed["reason"]) == (3, "Error")

    async def test_a_running_process_is_reported_running(self, kube: Kube, node: ProcessKubelet) -> None:
        create_pod(kube, "long", ["sleep", "30"])
        pod = await wait_phase(kube, "long", "Running")
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] and "running" in status["state"]


class TestEnvironment:
    async def test_only_the_containers_env_with_secret_and_field_refs_reaches_the_process(
        self, kube: Kube, node: ProcessKubelet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("HOST_ONLY_VARIABLE", "must-not-leak")
        kube.create(SECRETS, {"metadata": {"name": "creds", "namespace": NAMESPACE},
                              "data": {"token": base64.b64encode(b"s3cret").decode()}}, NAMESPACE)
        env = [
            {"name": "PLAIN", "value": "plain-value"},
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ]
        create_pod(kube, "envy", ["sh", "-c", "env; pwd"], env=env)
        await wait_phase(kube, "envy", "Succeeded")
        lines = node.log("envy").splitlines()
        seen = dict(line.split("=", 1) for line in lines if "=" in line)
        assert seen["PLAIN"] == "plain-value" and seen["FROM_SECRET"] == "s3cret"
        assert (seen["POD_NAME"], seen["POD_NAMESPACE"], seen["HOSTNAME"]) == ("envy", NAMESPACE, "envy")
        assert "HOST_ONLY_VARIABLE" not in seen
        # A fresh working directory, HOME and TMPDIR per pod.
        assert lines[-1] == str(node.root / "envy" / "workspace")
        assert seen["HOME"] == seen["TMPDIR"] == str(node.root / "envy" / "tmp")

    async def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]
        create_pod(kube, "patient", ["sh", "-c", "test \"$X\" = ready"], env=env)
        pod = await kube.wait_for(PODS, "patient", lambda p: waiting_reason(p) == "CreateContainerConfigError",
                                  NAMESPACE)
        assert 'secret "later" not found' in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        kube.create(SECRETS, {"metadata": {"name": "later", "namespace": NAMESPACE},
                              "data": {"k": base64.b64encode(b"ready").decode()}}, NAMESPACE)
        await wait_phase(kube, "patient", "Succeeded")

    async def test_environments_operator_runs_as_this_python(self, kube: Kube, node: ProcessKubelet) -> None:
        create_pod(kube, "cli", ["environments-operator", "--version"])
        await wait_phase(kube, "cli", "Succeeded")
        assert __version__ in node.log("cli")


class TestWhatKeepsAPodPending:
    async def test_an_image_the_node_cannot_run_waits_as_an_unpullable_image(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        create_pod(kube, "elsewhere", ["true"], image="registry.example/other:1")
        pod = await kube.wait_for(PODS, "elsewhere", lambda p: waiting_reason(p) == "ErrImageNeverPull", NAMESPACE)
        assert pod is not None and pod["status"]["phase"] == "Pending"
        assert node.started == []

    async def test_scheduling_gates_hold_the_pod_until_they_are_removed(self, kube: Kube, node: ProcessKubelet) -> None:
        create_pod(kube, "gated", ["true"], schedulingGates=[{"name": "managedagents.dev/acked"}])
        pod = await kube.wait_for(PODS, "gated", lambda p: bool((p or {}).get("status", {}).get("conditions")),
                                  NAMESPACE)
        assert pod is not None
        (scheduled,) = pod["status"]["conditions"]
        assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == ("PodScheduled", "False",
                                                                                 "SchedulingGated")
        assert node.started == []
        # As on a real apiserver, a gate may be removed but never added.
        with pytest.raises(ApiError, match="only deletion is allowed"):
            kube.patch(PODS, "gated", {"spec": {"schedulingGates": [{"name": "managedagents.dev/acked"},
                                                                    {"name": "another"}]}}, NAMESPACE)
        kube.patch(PODS, "gated", {"spec": {"schedulingGates": None}}, NAMESPACE)
        await wait_phase(kube, "gated", "Succeeded")


class TestTermination:
    async def test_deleting_the_pod_sends_sigterm_to_its_process_group(self, kube: Kube, node: ProcessKubelet) -> None:
        create_pod(kube, "victim", ["sh", "-c", "trap 'echo got-term; exit 143' TERM; echo ready; sleep 60 & wait"])
        await kube.wait_until(lambda: "ready" in node.log("victim"))  # SIGTERM must not beat the trap
        kube.delete(PODS, "victim", NAMESPACE)
        await kube.wait_until(lambda: node.exit_codes.get("victim"), timeout=10)
        assert node.exit_codes["victim"] == 143
        assert "got-term" in node.log("victim")

    async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        create_pod(kube, "stubborn", ["sh", "-c", "trap '' TERM; echo ready; sleep 60"],
                   terminationGracePeriodSeconds=1)
        await kube.wait_until(lambda: "ready" in node.log("stubborn"))  # SIGTERM must not beat the trap
        kube.delete(PODS, "stubborn", NAMESPACE)
        await kube.wait_until(lambda: node.exit_codes.get("stubborn"), timeout=10)
        assert node.exit_codes["stubborn"] == 137  # SIGKILL: 128 + 9

    async def test_stopping_the_kubelet_ends_every_process_it_started(self, kube: Kube, tmp_path: Path) -> None:
        kube.ensure_namespace(NAMESPACE)
        kubelet = ProcessKubelet(kube, images={IMAGE}, root=tmp_path / "node", stop_grace_seconds=1)
        kubelet.start()
        create_pod(kube, "a", ["sleep", "60"])
        create_pod(kube, "b", ["sh", "-c", "trap '' TERM; sleep 60"])
        await wait_phase(kube, "a", "Running")
        await wait_phase(kube, "b", "Running")
        pids = [p.process.pid for p in kubelet.processes.values()]
        await kubelet.stop()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


class TestGracefulDeletion:
    async def test_a_terminating_pod_is_removed_once_its_process_is_killed_after_the_deletions_grace(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        kube.graceful_pod_deletion = True
        create_pod(kube, "stubborn", ["sh", "-c", "trap '' TERM; echo ready; sleep 60"])  # the spec's grace: 30 s
        await kube.wait_until(lambda: "ready" in node.log("stubborn"))  # SIGTERM must not beat the trap
        kube.delete(PODS, "stubborn", NAMESPACE, grace_period_seconds=1)
        await asyncio.sleep(0.5)
        pod = kube.get(PODS, "stubborn", NAMESPACE)
        assert pod is not None and pod["metadata"]["deletionTimestamp"] and "stubborn" not in node.exit_codes
        await kube.wait_for(PODS, "stubborn", lambda p: p is None, NAMESPACE)
        assert node.exit_codes["stubborn"] == 137  # SIGKILL after the DeleteOptions' 1 s, not the spec's 30

    async def test_a_terminating_pod_without_a_process_is_removed_at_once(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        kube.graceful_pod_deletion = True
        create_pod(kube, "elsewhere", ["true"], image="registry.example/other:1")
        await kube.wait_for(PODS, "elsewhere", lambda p: waiting_reason(p) == "ErrImageNeverPull", NAMESPACE)
        kube.delete(PODS, "elsewhere", NAMESPACE)
        await kube.wait_for(PODS, "elsewhere", lambda p: p is None, NAMESPACE)

    async def test_on_a_lost_node_the_process_is_killed_but_the_pod_stays_terminating(
        self, kube: Kube, node: ProcessKubelet
    ) -> None:
        kube.graceful_pod_deletion = True
        create_pod(kube, "stranded", ["sleep", "60"])
        await wait_phase(kube, "stranded", "Running")
        node.lose("stranded")
        kube.delete(PODS, "stranded", NAMESPACE)
        await kube.wait_until(lambda: node.exit_codes.get("stranded"), timeout=10)
        kube.patch(PODS, "stranded", {"metadata": {"annotations": {"seen": "yes"}}}, NAMESPACE)  # a later change
        await asyncio.sleep(0.2)  # time to report, if it did
        pod = kube.get(PODS, "stranded", NAMESPACE)
        assert pod is not None and pod["metadata"]["deletionTimestamp"]
        assert pod["status"]["phase"] == "Running"  # nobody reported the exit
        kube.delete(PODS, "stranded", NAMESPACE, grace_period_seconds=0)  # what a test would force
        assert kube.get(PODS, "stranded", NAMESPACE) is None
