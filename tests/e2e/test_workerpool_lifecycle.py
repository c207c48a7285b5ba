"""Worker pod lifecycle end to end: no session is left hanging, nothing outlives its purpose.

The harness kubelet moves pods through their phases; the operator must force-stop the item of a pod
that never starts, fails or vanishes, remove finished pods and their Secrets after the TTL, and clean
up when the WorkerPool is deleted.
"""

from __future__ import annotations

import pytest

from environments_operator.devcluster.kube import PODS, SECRETS, WORKERPOOLS
from tests.e2e.conftest import WorkerPoolWorld


def stops(world: WorkerPoolWorld, work_id: str) -> list[int]:
    return [r.status for r in world.responses if r.method == "POST" and r.path.endswith(f"/{work_id}/stop")]


async def dispatched(world: WorkerPoolWorld, **pool: object) -> tuple[str, str, str]:
    """One item dispatched to a pod; returns (work ID, pod name, secret name)."""
    (work_id,) = world.enqueue(1)
    world.create_pool(**pool)
    await world.wait_work_state([work_id], "starting")
    (pod,) = await world.wait_released([work_id])
    secret = pod["spec"]["containers"][0]["env"][3]["valueFrom"]["secretKeyRef"]["name"]
    return work_id, pod["metadata"]["name"], secret


@pytest.mark.parametrize(("stall", "cause"), [("image_pull_backoff", "ImagePullBackOff"),
                                               ("unschedulable", "Unschedulable")])
async def test_a_pod_that_never_starts_is_deleted_and_its_item_force_stopped(
        workerpool_world: WorkerPoolWorld, stall: str, cause: str) -> None:
    world = workerpool_world
    # creationTimestamp has whole seconds, so the timeout may run out up to 1 s early: 2 s leaves 1 s.
    work_id, pod, secret = await dispatched(world, startupTimeoutSeconds=2)
    getattr(world.kubelet, stall)(pod, world.namespace)

    _, _, message = await world.wait_event("WorkerStartTimeout")
    assert cause in message and work_id in message
    await world.wait_work_state([work_id], "stopped")
    await world.kube.wait_for(PODS, pod, lambda o: o is None, world.namespace)
    await world.kube.wait_for(SECRETS, secret, lambda o: o is None, world.namespace)
    assert stops(world, work_id) == [200]


async def test_a_failed_pod_gets_its_item_force_stopped_and_is_kept_for_its_logs(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_id, pod, _ = await dispatched(world)
    world.kubelet.run(pod, world.namespace)
    world.kubelet.fail(pod, world.namespace, exit_code=137, reason="OOMKilled")

    _, _, message = await world.wait_event("WorkerFailed")
    assert "OOMKilled" in message and "137" in message
    await world.wait_work_state([work_id], "stopped")
    assert world.kube.get(PODS, pod, world.namespace) is not None  # until ttlSecondsAfterFinished
    status = (world.pool() or {}).get("status") or {}
    await world.kube.wait_until(lambda: ((world.pool() or {}).get("status") or {}).get("workers", {}).get("failed")
                                == 1, message=lambda: f"workers.failed == 1 in {status}")


async def test_a_vanished_pod_gets_its_item_force_stopped_and_its_secret_removed(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_id, pod, secret = await dispatched(world)
    world.kubelet.run(pod, world.namespace)
    world.kubelet.vanish(pod, world.namespace)

    _, _, message = await world.wait_event("WorkerVanished")
    assert work_id in message
    await world.wait_work_state([work_id], "stopped")
    await world.kube.wait_for(SECRETS, secret, lambda o: o is None, world.namespace)


async def test_finished_pods_and_their_secrets_are_removed_after_the_ttl(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_id, pod, secret = await dispatched(world, ttlSecondsAfterFinished=1)
    world.kubelet.run(pod, world.namespace)
    world.kubelet.succeed(pod, world.namespace)

    await world.kube.wait_for(PODS, pod, lambda o: o is None, world.namespace)
    await world.kube.wait_for(SECRETS, secret, lambda o: o is None, world.namespace)
    # A worker that exited 0 stopped its item itself (the SDK does); the operator leaves it alone.
    assert stops(world, work_id) == []
    assert not [e for e in world.events() if e[0] == "Warning"]


async def test_deleting_the_pool_stops_dispatch_ends_its_workers_and_cleans_up(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    running, pending = world.enqueue(2)
    world.create_pool()
    await world.wait_pods(2)
    await world.wait_work_state([running, pending], "starting")
    await world.wait_released([running, pending])
    running_pod = world.pod_for(running)
    assert running_pod is not None
    world.kubelet.run(running_pod["metadata"]["name"], world.namespace)

    world.kube.delete(WORKERPOOLS, "pool", world.namespace)
    await world.kube.wait_for(WORKERPOOLS, "pool", lambda o: o is None, world.namespace)
    assert world.pods() == [] and world.secrets_of_items() == []
    assert world.work_state(running) == world.work_state(pending) == "stopped"
    (queued,) = world.enqueue(1)
    await world.kube.wait_until(lambda: True)
    assert world.work_state(queued) == "queued" and world.pods() == []


async def test_an_item_that_comes_back_after_its_pod_ended_gets_a_fresh_pod_under_full_lifecycle(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_id, pod, _ = await dispatched(world, startupTimeoutSeconds=2)
    world.kubelet.run(pod, world.namespace)
    world.kubelet.succeed(pod, world.namespace)
    await world.kube.wait_until(lambda: ((world.pool() or {}).get("status") or {}).get("workers", {}).get(
        "succeeded") == 1, message="the operator sees the pod succeeded")
    # The worker ended without stopping its item, and the lease ran out: the item is queued again. The
    # operator meets the ended pod, deletes it, and after the reclaim window dispatches a fresh one.
    world.emulator.state.expire_lease(work_id)
    await world.kube.wait_until(lambda: len(world.acks(work_id)) == 2, message="the item acknowledged again")
    await world.wait_released([work_id])
    fresh = world.kube.get(PODS, pod, world.namespace)
    assert fresh is not None and (fresh.get("status") or {}).get("phase") in (None, "Pending")

    # The fresh pod has the old one's name; the startup timeout must still apply to it.
    world.kubelet.image_pull_backoff(pod, world.namespace)
    _, _, message = await world.wait_event("WorkerStartTimeout")
    assert work_id in message
    await world.wait_work_state([work_id], "stopped")
    await world.kube.wait_for(PODS, pod, lambda o: o is None, world.namespace)


async def test_deleting_the_pool_stops_the_items_still_owed_a_force_stop(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_id, pod, _ = await dispatched(world)
    # The API refuses the force-stop of the failed pod's item (all three attempts of the one call).
    world.emulator.faults.add({"faults": [{"route": "work.stop", "effect": "error", "status": 503, "times": 3}]})
    world.kubelet.run(pod, world.namespace)
    world.kubelet.fail(pod, world.namespace)
    await world.wait_event("WorkerFailed")
    await world.kube.wait_until(lambda: len([s for s in stops(world, work_id) if s == 503]) == 3,
                                message="the force-stop refused three times")

    world.kube.delete(WORKERPOOLS, "pool", world.namespace)
    await world.kube.wait_for(WORKERPOOLS, "pool", lambda o: o is None, world.namespace)
    assert world.work_state(work_id) == "stopped"
