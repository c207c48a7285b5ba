"""The stand-in kubelet moves pods through their phases by status writes only, manually or automatically."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from environments_operator.devcluster.kube import PODS, Kube
from environments_operator.devcluster.kubelet import Kubelet

NS = "ns1"


def make_pod(kube: Kube, name: str, **labels: str) -> None:
    kube.create(PODS, {"metadata": {"name": name, "labels": labels},
                       "spec": {"containers": [{"name": "worker", "image": "registry/worker:1"}]}}, NS)


def waiting_reason(pod: dict[str, Any]) -> str | None:
    return pod["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason")


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in pod["status"]["conditions"] if c["type"] == kind)


@pytest.mark.parametrize(("transition", "phase", "check"), [
    (lambda k: k.run("p", NS), "Running", lambda pod: condition(pod, "Ready")["status"] == "True"),
    (lambda k: k.image_pull_backoff("p", NS), "Pending", lambda pod: waiting_reason(pod) == "ImagePullBackOff"),
    (lambda k: k.unschedulable("p", NS), "Pending",
     lambda pod: condition(pod, "PodScheduled")["reason"] == "Unschedulable"),
    (lambda k: (k.run("p", NS), k.succeed("p", NS)), "Succeeded",
     lambda pod: pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0),
    (lambda k: (k.run("p", NS), k.fail("p", NS, exit_code=137, reason="OOMKilled")), "Failed",
     lambda pod: pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"),
])
async def test_manual_transitions_write_pod_status(kube: Kube, kubelet: Kubelet, transition: Callable[[Kubelet], Any],
                                                   phase: str, check: Callable[[dict[str, Any]], bool]) -> None:
    make_pod(kube, "p")
    transition(kubelet)
    pod = kube.get(PODS, "p", NS)
    assert pod["status"]["phase"] == phase and check(pod)
    assert pod["spec"]["containers"][0]["image"] == "registry/worker:1"  # status writes only


async def test_a_vanished_pod_is_gone_even_with_finalizers(kube: Kube, kubelet: Kubelet) -> None:
    kube.create(PODS, {"metadata": {"name": "p", "finalizers": ["managedagents.dev/cleanup"]}}, NS)
    kubelet.vanish("p", NS)
    assert kube.get(PODS, "p", NS) is None


async def test_the_automatic_mode_runs_and_finishes_new_and_existing_pods(kube: Kube, kubelet: Kubelet) -> None:
    make_pod(kube, "existing")
    make_pod(kube, "skipped", role="other")
    make_pod(kube, "stuck")
    kubelet.image_pull_backoff("stuck", NS)
    kubelet.start_auto(running_after=0.01, finish_after=0.02, match=lambda pod: "role" not in pod["metadata"]["labels"])
    make_pod(kube, "new")
    for name in ("existing", "new"):
        await kube.wait_for(PODS, name, lambda pod: pod["status"]["phase"] == "Succeeded", NS)
    assert kube.get(PODS, "skipped", NS)["status"] == {"phase": "Pending"}
    assert waiting_reason(kube.get(PODS, "stuck", NS)) == "ImagePullBackOff"  # a test's own choice is kept


async def test_the_automatic_mode_can_fail_pods_and_stops_on_request(kube: Kube, kubelet: Kubelet) -> None:
    kubelet.start_auto(running_after=0.01, finish_after=0.01, exit_code=1)
    make_pod(kube, "p1")
    await kube.wait_for(PODS, "p1", lambda pod: pod["status"]["phase"] == "Failed", NS)
    await kubelet.stop_auto()
    make_pod(kube, "p2")
    await asyncio.sleep(0.05)  # longer than running_after: a running kubelet would have moved it
    assert kube.get(PODS, "p2", NS)["status"] == {"phase": "Pending"}


async def test_in_graceful_mode_a_deleted_pod_waits_for_finish_termination(kube: Kube, kubelet: Kubelet) -> None:
    kube.graceful_pod_deletion = True
    make_pod(kube, "p")
    kubelet.run("p", NS)
    with pytest.raises(ValueError, match="not terminating"):
        kubelet.finish_termination("p", NS)
    kube.delete(PODS, "p", NS)
    assert kube.get(PODS, "p", NS)["metadata"]["deletionTimestamp"]  # Terminating: nobody finished it
    kubelet.finish_termination("p", NS)
    assert kube.get(PODS, "p", NS) is None
    make_pod(kube, "q")
    kubelet.vanish("q", NS)
    assert kube.get(PODS, "q", NS) is None  # gone, not Terminating


async def test_the_automatic_mode_finishes_terminations_unless_the_node_is_lost(kube: Kube, kubelet: Kubelet) -> None:
    kube.graceful_pod_deletion = True
    kubelet.start_auto(running_after=0.01, terminating_for=0.02)
    for name in ("p1", "p2"):
        make_pod(kube, name)
        await kube.wait_for(PODS, name, lambda pod: pod["status"]["phase"] == "Running", NS)
    kube.delete(PODS, "p1", NS)
    assert kube.get(PODS, "p1", NS) is not None  # Terminating for a moment
    await kube.wait_for(PODS, "p1", lambda pod: pod is None, NS)
    kubelet.lose_node()
    kube.delete(PODS, "p2", NS)
    make_pod(kube, "p3")
    await asyncio.sleep(0.1)  # longer than terminating_for and running_after
    assert kube.get(PODS, "p2", NS)["metadata"]["deletionTimestamp"]  # stuck Terminating
    assert kube.get(PODS, "p3", NS)["status"] == {"phase": "Pending"}  # a lost node runs nothing
    kube.delete(PODS, "p2", NS, grace_period_seconds=0)  # only a force delete removes it
    assert kube.get(PODS, "p2", NS) is None
