"""A stand-in for the kubelet: moves pods in the fake apiserver through their lifecycle.

It never does the operator's work; it only writes pod status (through the status subresource, as the
kubelet and the scheduler do) and deletes pods (as a node loss or an eviction would).

    kubelet.run("pod-a", "ns")                       # Pending -> Running (containers running, Ready)
    kubelet.succeed("pod-a", "ns")                   # -> Succeeded (exit code 0)
    kubelet.fail("pod-b", "ns", exit_code=137, reason="OOMKilled")
    kubelet.image_pull_backoff("pod-c", "ns")        # stays Pending; container waiting: ImagePullBackOff
    kubelet.unschedulable("pod-d", "ns")             # stays Pending; PodScheduled=False/Unschedulable
    kubelet.vanish("pod-e", "ns")                    # deleted (finalizers stripped: the node is gone)
    kubelet.finish_termination("pod-f", "ns")        # a Terminating pod's containers stopped: it is removed

    kubelet.start_auto(running_after=0.05, finish_after=0.5)   # every new Pending pod, in the background
    ...
    kubelet.lose_node()                              # from now on the automatic mode does nothing
    await kubelet.stop_auto()

A pod with ``spec.schedulingGates`` is never scheduled, so no kubelet runs it: ``run`` refuses a gated
pod (``GatedPodError``), and the automatic mode starts a pod only once its last gate is removed.

With ``kube.graceful_pod_deletion``, a deleted pod stays Terminating until its kubelet finishes the
deletion: here, ``finish_termination`` (a delete with grace 0, as a kubelet sends once the containers
stopped), or the automatic mode ``terminating_for`` seconds after the deletion, unless the node is lost:
then the pod stays Terminating until the test finishes it or force-deletes it.

What this module may not do: create or change anything but pods' status, or delete anything but pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from environments_operator.devcluster.apimachinery import JSON
from environments_operator.devcluster.kube import PODS, Kube

PodFilter = Callable[[JSON], bool]


class GatedPodError(AssertionError):
    """A test asked to run a pod that still has scheduling gates: no real kubelet could."""


def gated(pod: JSON) -> bool:
    return bool((pod.get("spec") or {}).get("schedulingGates"))


def timestamp_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: bool, reason: str | None = None, message: str | None = None) -> JSON:
    condition = {"type": kind, "status": "True" if status else "False", "lastProbeTime": None,
                 "lastTransitionTime": timestamp_now()}
    condition.update({key: value for key, value in (("reason", reason), ("message", message)) if value})
    return condition


def container_statuses(pod: JSON, state: JSON, *, ready: bool, started: bool) -> list[JSON]:
    return [{"name": container.get("name", ""), "image": container.get("image", ""), "imageID": "",
             "ready": ready, "started": started, "restartCount": 0, "state": state}
            for container in pod.get("spec", {}).get("containers", [])]


def waits_for_kubelet(pod: JSON) -> bool:
    """A Terminating pod whose deletion waits for its kubelet (``graceful_pod_deletion``): a delete with
    grace 0 finishes it."""
    meta = pod["metadata"]
    return bool(meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds"))


async def cancel_all(tasks: Iterable[asyncio.Task[None] | None]) -> None:
    """Cancel the tasks, and wait until each has ended."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Kubelet:
    """Pod lifecycle transitions on a ``Kube`` (the ``kubelet`` fixture yields one)."""

    def __init__(self, kube: Kube):
        self.kube = kube
        self._addresses = itertools.count(2)
        self._auto_task: asyncio.Task[None] | None = None
        self._pod_tasks: set[asyncio.Task[None]] = set()
        self._adopted: set[str] = set()  # uids the automatic mode took on
        self._terminations: set[str] = set()  # uids of the Terminating pods the automatic mode will finish
        self.node_lost = False

    def _pod(self, name: str, namespace: str) -> JSON:
        pod = self.kube.get(PODS, name, namespace)
        if pod is None:
            raise LookupError(f"no pod {namespace}/{name}")
        return pod

    def _set_status(self, name: str, namespace: str, status: JSON) -> JSON:
        return self.kube.patch_status(PODS, name, status, namespace)

    def run(self, name: str, namespace: str, *, host_ip: str = "10.0.0.1", pod_ip: str | None = None) -> JSON:
        """Scheduled, containers started and ready: phase Running. A gated pod cannot be (``GatedPodError``)."""
        pod, now = self._pod(name, namespace), timestamp_now()
        if gated(pod):
            raise GatedPodError(f"pod {namespace}/{name} still has scheduling gates "
                                f"{[g.get('name') for g in pod['spec']['schedulingGates']]}; it cannot run")
        return self._set_status(name, namespace, {
            "phase": "Running", "hostIP": host_ip,
            "podIP": pod_ip or f"10.244.0.{next(self._addresses) % 250 + 2}",
            "startTime": now,
            "conditions": [condition("PodScheduled", True), condition("Initialized", True),
                           condition("ContainersReady", True), condition("Ready", True)],
            "containerStatuses": container_statuses(pod, {"running": {"startedAt": now}}, ready=True, started=True),
        })

    def succeed(self, name: str, namespace: str) -> JSON:
        """All containers exited 0: phase Succeeded."""
        return self._terminate(name, namespace, "Succeeded", exit_code=0, reason="Completed")

    def fail(self, name: str, namespace: str, *, exit_code: int = 1, reason: str = "Error",
             message: str | None = None) -> JSON:
        """A container exited non-zero (``reason`` e.g. Error, OOMKilled): phase Failed."""
        return self._terminate(name, namespace, "Failed", exit_code=exit_code, reason=reason, message=message)

    def _terminate(self, name: str, namespace: str, phase: str, *, exit_code: int, reason: str,
                   message: str | None = None) -> JSON:
        pod, now = self._pod(name, namespace), timestamp_now()
        started = pod.get("status", {}).get("startTime", now)
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now}
        if message:
            terminated["message"] = message
        pod_reason = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        return self._set_status(name, namespace, {
            "phase": phase, "startTime": started,
            "conditions": [condition("PodScheduled", True), condition("Initialized", True, pod_reason),
                           condition("ContainersReady", False, pod_reason), condition("Ready", False, pod_reason)],
            "containerStatuses": container_statuses(pod, {"terminated": terminated}, ready=False, started=False),
        })

    def image_pull_backoff(self, name: str, namespace: str) -> JSON:
        """Scheduled, but the image cannot be pulled: stays Pending, containers waiting in ImagePullBackOff."""
        pod = self._pod(name, namespace)
        image = next((c.get("image", "") for c in pod.get("spec", {}).get("containers", [])), "")
        return self.waiting(name, namespace, "ImagePullBackOff", f'Back-off pulling image "{image}"')

    def waiting(self, name: str, namespace: str, reason: str, message: str, *, host_ip: str = "10.0.0.1") -> JSON:
        """Scheduled, but its containers cannot start (``reason``, e.g. ImagePullBackOff): stays Pending."""
        pod = self._pod(name, namespace)
        waiting = {"waiting": {"reason": reason, "message": message}}
        return self._set_status(name, namespace, {
            "phase": "Pending", "hostIP": host_ip,
            "startTime": pod.get("status", {}).get("startTime") or timestamp_now(),
            "conditions": [condition("PodScheduled", True), condition("Initialized", True),
                           condition("ContainersReady", False, "ContainersNotReady"),
                           condition("Ready", False, "ContainersNotReady")],
            "containerStatuses": container_statuses(pod, waiting, ready=False, started=False),
        })

    def unschedulable(self, name: str, namespace: str,
                      message: str = "0/3 nodes are available: 3 Insufficient cpu.") -> JSON:
        """No node fits: stays Pending with PodScheduled=False, reason Unschedulable."""
        self._pod(name, namespace)
        return self._set_status(name, namespace, {
            "phase": "Pending",
            "conditions": [condition("PodScheduled", False, "Unschedulable", message)],
        })

    def vanish(self, name: str, namespace: str, *, force: bool = True) -> None:
        """The pod disappears (node lost, evicted, deleted by someone else). ``force`` strips finalizers.
        The deletion has grace 0: even with ``graceful_pod_deletion`` the pod is gone, not Terminating."""
        pod = self._pod(name, namespace)
        if force and pod["metadata"].get("finalizers"):
            self.kube.remove_finalizers(PODS, name, namespace)
        if self.kube.get(PODS, name, namespace) is not None:
            self.kube.delete(PODS, name, namespace, grace_period_seconds=0)

    def finish_termination(self, name: str, namespace: str) -> None:
        """The Terminating pod's containers have stopped: delete it with grace 0, as its kubelet would
        (finalizers, if any, still hold it). ``ValueError`` if the pod is not being deleted."""
        pod = self._pod(name, namespace)
        if not pod["metadata"].get("deletionTimestamp"):
            raise ValueError(f"pod {namespace}/{name} is not terminating")
        self.kube.delete(PODS, name, namespace, grace_period_seconds=0)

    def lose_node(self) -> None:
        """The node is gone: the automatic mode writes no more status and finishes no termination, so
        deleted pods stay Terminating (with ``graceful_pod_deletion``). Manual calls still work."""
        self.node_lost = True

    # --- automatic mode -----------------------------------------------------------------------------------

    def start_auto(self, *, running_after: float = 0.05, finish_after: float | None = None,
                   exit_code: int = 0, match: PodFilter | None = None, terminating_for: float = 0.05) -> None:
        """In the background, run every Pending pod (existing or new, and matching ``match``) after
        ``running_after`` seconds; then, if ``finish_after`` is given, end it with ``exit_code`` (0:
        Succeeded, else Failed) that much later. Pods a test moved on meanwhile are left alone.
        Terminating pods (``graceful_pod_deletion``) matching ``match`` are finished ``terminating_for``
        seconds after their deletion (at most their grace period) unless the node is lost."""
        if self._auto_task is not None:
            raise RuntimeError("the automatic kubelet is already running")
        self._auto_task = asyncio.create_task(self._auto(running_after, finish_after, exit_code, match,
                                                         terminating_for))

    async def stop_auto(self) -> None:
        await cancel_all([self._auto_task, *self._pod_tasks])
        self._auto_task = None
        self._pod_tasks.clear()
        self._terminations.clear()

    async def _auto(self, running_after: float, finish_after: float | None, exit_code: int,
                    match: PodFilter | None, terminating_for: float) -> None:
        changes = self.kube.changes(PODS)  # subscribe before scanning, so no pod slips in between
        for pod in self.kube.list(PODS):
            self._adopt(pod, running_after, finish_after, exit_code, match)
            self._adopt_termination(pod, terminating_for, match)
        async for change in changes:
            if change.type in ("ADDED", "MODIFIED"):  # MODIFIED: its last scheduling gate may be gone
                self._adopt(change.object, running_after, finish_after, exit_code, match)
            if change.type == "MODIFIED":
                self._adopt_termination(change.object, terminating_for, match)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._pod_tasks.add(task)
        task.add_done_callback(self._pod_tasks.discard)

    def _adopt_termination(self, pod: JSON, terminating_for: float, match: PodFilter | None) -> None:
        meta = pod["metadata"]
        if not waits_for_kubelet(pod) or meta["uid"] in self._terminations or (match is not None and not match(pod)):
            return
        self._terminations.add(meta["uid"])
        self._spawn(self._finish_later(meta["name"], meta["namespace"], meta["uid"],
                                       min(terminating_for, meta["deletionGracePeriodSeconds"])))

    async def _finish_later(self, name: str, namespace: str, uid: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            pod = self.kube.get(PODS, name, namespace)
            if not self.node_lost and pod is not None and pod["metadata"]["uid"] == uid and waits_for_kubelet(pod):
                self.finish_termination(name, namespace)
        finally:
            self._terminations.discard(uid)

    def _adopt(self, pod: JSON, running_after: float, finish_after: float | None, exit_code: int,
               match: PodFilter | None) -> None:
        if pod.get("status", {}).get("phase") != "Pending" or gated(pod) or pod["metadata"]["uid"] in self._adopted \
                or pod["metadata"].get("deletionTimestamp") or (match is not None and not match(pod)):
            return
        self._adopted.add(pod["metadata"]["uid"])
        self._spawn(self._lifecycle(pod["metadata"]["name"], pod["metadata"]["namespace"], pod["metadata"]["uid"],
                                    running_after, finish_after, exit_code))

    def _still(self, name: str, namespace: str, uid: str, phase: str) -> bool:
        if self.node_lost:
            return False
        pod = self.kube.get(PODS, name, namespace)
        if pod is None or pod["metadata"]["uid"] != uid or pod["metadata"].get("deletionTimestamp"):
            return False
        status = pod.get("status", {})
        untouched = "containerStatuses" in status if phase == "Running" else "conditions" not in status
        return status.get("phase") == phase and untouched

    async def _lifecycle(self, name: str, namespace: str, uid: str, running_after: float,
                         finish_after: float | None, exit_code: int) -> None:
        await asyncio.sleep(running_after)
        if not self._still(name, namespace, uid, "Pending"):
            return
        self.run(name, namespace)
        if finish_after is None:
            return
        await asyncio.sleep(finish_after)
        if not self._still(name, namespace, uid, "Running"):
            return
        if exit_code == 0:
            self.succeed(name, namespace)
        else:
            self.fail(name, namespace, exit_code=exit_code)
