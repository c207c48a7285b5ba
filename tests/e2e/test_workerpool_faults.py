"""WorkerPool under the faults a real cluster produces (issue "seven ways a session hangs or an item is lost").

Each test reproduces one fault with the harness (the emulator's fault rules, the fake apiserver's held calls,
the kubelet) against the shipped operator, and names the defect it guards against. Every one of them failed
before the fix it names; each says how.
"""

from __future__ import annotations

import asyncio
import base64

import pytest

from environments_operator.devcluster.kube import PODS, SECRETS, WORKERPOOLS
from environments_operator.devcluster.process_kubelet import ProcessKubelet
from environments_operator.domain.worker_manifests import SCHEDULING_GATE
from tests.e2e.conftest import WorkerPoolWorld
from tests.harness.emulator import api_client, self_hosted_environment
from tests.harness.sessions import results_by_tool_use, scripted_agent, session_events

pytestmark = pytest.mark.timeout(120)

SCRIPT = [{"tool": "bash", "input": {"command": "echo served"}}]


def gated(pod: dict | None) -> bool:  # type: ignore[type-arg]
    return pod is not None and any(g.get("name") == SCHEDULING_GATE for g in pod["spec"].get("schedulingGates") or [])


async def wait_released(world: WorkerPoolWorld, work_id: str) -> dict:  # type: ignore[type-arg]
    pod = await world.kube.wait_until(lambda: (p := world.pod_for(work_id)) is not None and not gated(p) and p,
                                      message=f"the pod of {work_id} released")
    assert isinstance(pod, dict)
    return pod


# ----- 1. a pod can run before its item is acked ------------------------------------------------------------


async def test_a_slow_ack_does_not_let_the_worker_start_on_an_item_it_does_not_hold(
        workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet) -> None:
    """The ack waits out two 429s of 4 s each, longer than the worker takes to start and heartbeat. Before the
    scheduling gate the worker's first heartbeat met a still-queued item (412), the SDK released the item
    without stopping it, the pod exited 0, and the session hung."""
    world = workerpool_world
    world.emulator.faults.add({"faults": [
        {"route": "work.ack", "effect": "error", "status": 429, "retry_after_ms": 4000, "times": 2}]})
    async with api_client(world.emulator) as api:
        agent = await scripted_agent(api, SCRIPT, reply="done")
        session = await api.beta.sessions.create(agent=agent, environment_id=world.environment.id)
        world.create_pool(maxIdleSeconds=0)
        (item,) = [i for i in world.emulator.state.work.values() if i.session_id == session.id]
        pod = await world.kube.wait_until(lambda: world.pod_for(item.id), message="the item's pod")
        assert pod is not None and gated(pod)  # created before the ack, behind the gate
        await world.kube.wait_until(lambda: world.work_state(item.id) == "stopped", timeout=60,
                                    message=lambda: f"the item served and stopped ({world.work_state(item.id)})")
        pairs = list(results_by_tool_use(await session_events(api, session.id)).values())
        assert [(tool_use.name, result is not None and not result.is_error) for tool_use, result in pairs] == [
            ("bash", True)]
    await world.kube.wait_until(lambda: process_kubelet.exit_codes, message="the worker's exit")
    assert len(world.acks(item.id)) == 1 and process_kubelet.exit_codes == {pod["metadata"]["name"]: 0}


async def test_a_lease_lost_while_the_pod_still_looks_running_is_neither_acked_again_nor_deleted(
        workerpool_world: WorkerPoolWorld) -> None:
    """Node loss or a partition: the lease runs out while the pod object still says Running. Before, the
    always-open long-poll reclaimed the item within milliseconds and the operator acked it again for the
    same pod. Now the item is left to that pod until it ends; then it gets a fresh pod."""
    world = workerpool_world
    (work_id,) = world.enqueue(1)
    world.create_pool()
    pod = await wait_released(world, work_id)
    world.kubelet.run(pod["metadata"]["name"], world.namespace)
    world.emulator.state.expire_lease(work_id)
    assert world.work_state(work_id) == "queued"
    await asyncio.sleep(3.0)  # three reclaim windows: the item was offered again, several times
    assert len(world.acks(work_id)) == 1
    same = world.pod_for(work_id)
    assert same is not None and same["metadata"]["uid"] == pod["metadata"]["uid"]
    world.kubelet.succeed(pod["metadata"]["name"], world.namespace)  # the old worker ends (412, exit 0)
    fresh = await world.kube.wait_until(
        lambda: (p := world.pod_for(work_id)) is not None and p["metadata"]["uid"] != pod["metadata"]["uid"]
        and not gated(p) and p, timeout=15, message="a fresh pod for the item")
    assert fresh and len(world.acks(work_id)) == 2 and world.work_state(work_id) == "starting"


# ----- 2. one slow or hung Kubernetes call stops all dispatch for the pool ---------------------------------


async def test_a_hung_pod_create_holds_up_only_its_own_item(workerpool_world: WorkerPoolWorld) -> None:
    """Before, the poller that held the item waited on the create, and while it did the pool's other
    pollers retired on empty polls and no new one started (the pool still had a poller): items queued
    meanwhile waited for the slow call. One slow admission webhook serialised the pool."""
    world = workerpool_world
    hold = world.kube.hold("create", PODS, apply_first=False)
    (first,) = world.enqueue(1)
    world.create_pool()
    await hold.wait_arrived()
    await asyncio.sleep(1.0)  # the queue stays empty a while: every poller but one retires
    others = world.enqueue(3)
    await world.wait_work_state(others, "starting")  # served while the first create still hangs
    assert world.work_state(first) == "queued" and world.pod_for(first) is None
    await asyncio.sleep(2.5)  # the first item is re-offered meanwhile: its running dispatch keeps it
    hold.release()
    await world.wait_work_state([first], "starting")
    for work_id in [first, *others]:
        assert len(world.acks(work_id)) == 1
        await wait_released(world, work_id)


# ----- 4. a startup timeout must not delete the only record of a force-stop still owed -------------------------


async def test_a_force_stop_owed_for_a_timed_out_pod_survives_an_operator_restart(
        workerpool_world: WorkerPoolWorld) -> None:
    """Before, the timed-out pod was deleted while its stop was retried in memory: a 503 on stop and then a
    restart meant no stop ever happened. Now the pod stays until the stop went through."""
    world = workerpool_world
    world.emulator.faults.add({"faults": [{"route": "work.stop", "effect": "error", "status": 503}]})
    (work_id,) = world.enqueue(1)
    world.create_pool(startupTimeoutSeconds=2)
    pod = await wait_released(world, work_id)
    world.kubelet.image_pull_backoff(pod["metadata"]["name"], world.namespace)
    await world.wait_event("WorkerStartTimeout")
    await asyncio.sleep(1.0)
    assert world.pod_for(work_id) is not None and world.work_state(work_id) == "starting"
    await world.operator.restart(abrupt=True)
    world.emulator.faults.clear()
    await world.kube.wait_until(lambda: world.work_state(work_id) == "stopped", timeout=30,
                                message=lambda: f"the item force-stopped ({world.work_state(work_id)})")
    await world.kube.wait_until(lambda: world.pod_for(work_id) is None, message="the pod deleted after the stop")


# ----- 6. per-item objects belong to exactly one pool --------------------------------------------------------


async def test_two_pools_of_one_environment_share_no_per_item_object_and_serve_each_item_once(
        workerpool_world: WorkerPoolWorld) -> None:
    """Pool A's pod create outlasts the reclaim window; pool B claims the item again and serves it. Before,
    A's failed create deleted the Secret B's pod used, and each pool's cleanup (and owner references)
    reached the other's objects. Now the Secret belongs to the one pod of the item."""
    world = workerpool_world
    hold = world.kube.hold("create", PODS, apply_first=False)
    (work_id,) = world.enqueue(1)
    world.create_pool("pool-a")
    await hold.wait_arrived()
    world.create_pool("pool-b")
    await world.kube.wait_until(lambda: world.work_state(work_id) == "starting", timeout=15,
                                message="the item served by pool B")
    pod = await wait_released(world, work_id)
    assert pod["metadata"]["labels"]["managedagents.dev/worker-pool"] == "pool-b"
    hold.release()  # A's create now meets B's pod: AlreadyExists, released, left alone
    await asyncio.sleep(1.5)
    (secret,) = [s for s in world.secrets_of_items() if s["metadata"]["name"] == pod["metadata"]["name"] + "-secret"]
    assert secret["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"],
        "controller": True, "blockOwnerDeletion": False}]
    assert secret["metadata"]["labels"]["managedagents.dev/worker-pool"] == "pool-b"
    assert len(world.acks(work_id)) == 1
    world.kube.delete(WORKERPOOLS, "pool-a", world.namespace)
    await world.kube.wait_until(lambda: world.pool("pool-a") is None, timeout=15, message="pool A gone")
    assert world.pod_for(work_id) is not None and world.work_state(work_id) == "starting"
    assert world.kube.get(SECRETS, secret["metadata"]["name"], world.namespace) is not None


# ----- 7. stops go to the environment of the pod -------------------------------------------------------------


@pytest.mark.parametrize("restart", [False, True], ids=["same-operator", "after-restart"])
async def test_an_item_is_stopped_in_its_own_environment_after_the_pool_moves_to_another(
        workerpool_world: WorkerPoolWorld, restart: bool) -> None:
    """Before, owed stops followed the pool's new environment, got 404 (counted as done), and the old
    items were stranded. Now each pod names its environment, and its stop goes there: through the client
    the pool still holds for it, or, after a restart, through the operator's API key."""
    world = workerpool_world
    (work_id,) = world.enqueue(1)
    world.create_pool()
    pod = await wait_released(world, work_id)
    assert pod["metadata"]["annotations"]["managedagents.dev/environment-id"] == world.environment.id
    world.kubelet.run(pod["metadata"]["name"], world.namespace)
    other = self_hosted_environment(world.emulator, "other")
    world.kube.create(SECRETS, {"metadata": {"name": "other-key", "namespace": world.namespace},
                                "data": {"key": base64.b64encode(other.key.encode()).decode()}}, world.namespace)
    world.key_secrets.add("other-key")
    world.kube.patch(WORKERPOOLS, "pool", {"spec": {
        "environmentId": other.id, "environmentKeySecretRef": {"name": "other-key", "key": "key"}}}, world.namespace)
    await world.kube.wait_until(lambda: (world.pool() or {}).get("status", {}).get("environmentId") == other.id,
                                message="the pool serving the other environment")
    if restart:
        await world.operator.restart(abrupt=True)
    world.kubelet.fail(pod["metadata"]["name"], world.namespace, exit_code=137, reason="OOMKilled")
    await world.wait_event("WorkerFailed")
    await world.kube.wait_until(lambda: world.work_state(work_id) == "stopped", timeout=15,
                                message=lambda: f"the item stopped in its environment ({world.work_state(work_id)})")


# ----- smaller ones ----------------------------------------------------------------------------------------------


async def test_status_says_no_environment_rather_than_a_stale_one(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    world.create_pool()
    await world.kube.wait_until(lambda: (world.pool() or {}).get("status", {}).get("environmentId"),
                                message="status.environmentId")
    world.kube.patch(WORKERPOOLS, "pool", {"spec": {"environmentId": None, "environmentRef": {"name": "missing"}}},
                     world.namespace)
    await world.wait_condition("Ready", "False", "EnvironmentNotFound")
    await world.kube.wait_until(lambda: "environmentId" not in (world.pool() or {}).get("status", {}),
                                message=lambda: f"no environmentId in {(world.pool() or {}).get('status')}")


async def test_a_key_rotation_does_not_wait_for_a_dispatch_held_up_by_kubernetes(
        workerpool_world: WorkerPoolWorld) -> None:
    """The API rejects the key once (it was rotated); the Secret holds the new one. Before, replacing the
    client waited for pollers still inside a dispatch (here, a hung pod create), up to 10 s; now pollers
    only poll, and the hung dispatch keeps the client it came with."""
    world = workerpool_world
    hold = world.kube.hold("create", PODS, apply_first=False)
    (first,) = world.enqueue(1)
    world.create_pool()
    await hold.wait_arrived()
    new_key = world.emulator.state.issue_environment_key(world.environment.id)
    world.kube.patch(SECRETS, "env-key", {"data": {"key": base64.b64encode(new_key.encode()).decode()}},
                     world.namespace)
    world.emulator.faults.add({"faults": [{"route": "work.poll", "effect": "error", "status": 401, "times": 1}]})
    await world.kube.wait_until(lambda: any(r.status == 401 for r in world.responses), message="the 401")
    rejected_at = asyncio.get_running_loop().time()
    (second,) = world.enqueue(1)
    await world.wait_work_state([second], "starting", timeout=10)
    assert asyncio.get_running_loop().time() - rejected_at < 5.0
    hold.release()
    await world.wait_work_state([first], "starting")
    assert len(world.acks(first)) == 1 and len(world.acks(second)) == 1


async def test_a_redelivered_item_gets_the_secret_of_its_latest_delivery(workerpool_world: WorkerPoolWorld) -> None:
    """The emulator hands out the same ``secret`` on every delivery; the real API might not. A gated pod's
    Secret with another payload is replaced before the ack, so the worker starts with the current one."""
    world = workerpool_world
    world.emulator.faults.add({"faults": [{"route": "work.ack", "effect": "error", "status": 503, "times": 3}]})
    (work_id,) = world.enqueue(1)
    world.create_pool()
    await world.kube.wait_until(lambda: len([r for r in world.responses if r.path.endswith(f"/{work_id}/ack")]) >= 3,
                                message="three failed acks")
    secret_name = world.pod_for(work_id)["metadata"]["name"] + "-secret"  # type: ignore[index]
    stale = world.kube.get(SECRETS, secret_name, world.namespace)
    assert stale is not None
    world.kube.delete(SECRETS, secret_name, world.namespace)
    world.kube.create(SECRETS, {**{k: v for k, v in stale.items() if k != "data"}, "metadata": {
        k: v for k, v in stale["metadata"].items() if k in ("name", "namespace", "labels", "annotations",
                                                            "ownerReferences")},
        "data": {"work-secret": base64.b64encode(b"an-earlier-delivery").decode()}}, world.namespace)
    await wait_released(world, work_id)
    current = world.kube.get(SECRETS, secret_name, world.namespace)
    assert current is not None
    assert base64.b64decode(current["data"]["work-secret"]).decode() == world.emulator.state.work[work_id].secret


# ----- 3. a pod deleted while the pod watch is broken ---------------------------------------------------------


@pytest.mark.parametrize("workerpool_operator_environment", [{"ENVIRONMENTS_OPERATOR_POD_RELIST_SECONDS": "1"}])
async def test_a_pod_deleted_while_the_pod_watch_was_broken_is_noticed_and_its_item_stopped(
        workerpool_world: WorkerPoolWorld) -> None:
    """The pod watch drops; the pod is deleted meanwhile; the resumed watch gets 410 Gone and kopf relists,
    which produces no DELETED event. Before, the index kept the pod forever: its slot leaked, its item was
    never force-stopped and its Secret (a sessions token) never swept. Now a list of the pool's pods finds
    it gone."""
    world = workerpool_world
    (work_id,) = world.enqueue(1)
    world.create_pool(maxWorkers=1)
    pod = await wait_released(world, work_id)
    name = pod["metadata"]["name"]
    world.kubelet.run(name, world.namespace)
    await world.kube.wait_until(lambda: (world.pool() or {}).get("status", {}).get("workers", {}).get("running") == 1,
                                message="the pool counting its running pod")
    watches = world.kube.hold("watch", PODS, apply_first=False, times=None)
    world.kube.break_watches(PODS)
    await watches.wait_arrived()  # kopf is reconnecting, from the resourceVersion it had
    world.kubelet.vanish(name, world.namespace)
    world.kube.compact(PODS)
    watches.release()  # the resumed watch is answered 410 Gone: kopf relists
    await world.wait_event("WorkerVanished", timeout=15)
    await world.kube.wait_until(lambda: world.work_state(work_id) == "stopped", timeout=15,
                                message=lambda: f"the item force-stopped ({world.work_state(work_id)})")
    (second,) = world.enqueue(1)  # the slot is free again: maxWorkers 1
    await world.wait_work_state([second], "starting", timeout=15)


# ----- 5. a pod stuck Terminating ------------------------------------------------------------------------------


async def test_a_pod_stuck_terminating_is_force_deleted_and_its_item_gets_a_fresh_pod(
        workerpool_world: WorkerPoolWorld) -> None:
    """The pod's node is gone: deleted, it stays Terminating. Before, each re-offer of its item deleted it
    again (a no-op) and skipped the ack, so the item was never served and the pod held a slot forever."""
    world = workerpool_world
    world.kube.graceful_pod_deletion = True
    (work_id,) = world.enqueue(1)
    world.create_pool(maxWorkers=1, template={"spec": {"terminationGracePeriodSeconds": 2}})
    pod = await wait_released(world, work_id)
    name = pod["metadata"]["name"]
    world.kubelet.run(name, world.namespace)
    world.kubelet.lose_node()
    world.kube.delete(PODS, name, world.namespace)  # a drain, or someone cleaning up: graceful, 2 s
    world.emulator.state.expire_lease(work_id)  # its worker is gone with the node
    await world.wait_event("WorkerForceDeleted", timeout=15)
    fresh = await world.kube.wait_until(
        lambda: (p := world.pod_for(work_id)) is not None and p["metadata"]["uid"] != pod["metadata"]["uid"]
        and not gated(p) and p, timeout=15, message="a fresh pod for the item")
    assert fresh and len(world.acks(work_id)) == 2
    # The stop owed to the vanished pod's delivery is dropped: the item was offered again, and stopping
    # it now would end the session its fresh pod is about to run.
    await asyncio.sleep(1.0)
    assert world.work_state(work_id) == "starting"
    assert not [r for r in world.responses if r.method == "POST" and r.path.endswith(f"/{work_id}/stop")]


async def test_an_operator_killed_between_the_ack_and_the_release_releases_the_pod_after_its_restart(
        workerpool_world: WorkerPoolWorld) -> None:
    """The item is acknowledged, its pod still gated, and the operator dies: no worker can start, and the
    item waits for one. After the restart the gated pod is found, the item's state read (starting), and
    the pod released: served once, no second ack, no second pod."""
    world = workerpool_world
    world.kube.fail("patch", PODS, code=500, times=None)  # every release attempt fails
    (work_id,) = world.enqueue(1)
    world.create_pool()
    await world.kube.wait_for_calls("patch", PODS, count=1)
    assert world.work_state(work_id) == "starting" and gated(world.pod_for(work_id))
    world.operator.kill()
    world.kube.clear_faults()
    await world.operator.start()
    pod = await world.kube.wait_until(lambda: (p := world.pod_for(work_id)) is not None and not gated(p) and p,
                                      timeout=30, message="the pod released after the restart")
    assert pod and len(world.acks(work_id)) == 1 and len(world.pods()) == 1
