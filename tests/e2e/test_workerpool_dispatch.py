"""WorkerPool dispatch end to end: queued sessions become worker pods, each acknowledged exactly once."""

from __future__ import annotations

import asyncio
import base64

import pytest
from prometheus_client import REGISTRY

from environments_operator.devcluster.kube import ENVIRONMENTS, PODS, SECRETS, WORKERPOOLS
from tests.e2e.conftest import WORKER_IMAGE, WorkerPoolWorld

API_ERRORS = "environments_operator_api_errors_total"
DISPATCHED = "environments_operator_work_items_dispatched_total"
LATENCY_COUNT = "environments_operator_dispatch_latency_seconds_count"


def env_of(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


async def test_queued_sessions_become_pods_with_the_contract_and_are_acknowledged(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    dispatched_before = REGISTRY.get_sample_value(DISPATCHED, {"namespace": "ns", "pool": "pool"}) or 0.0
    latencies_before = REGISTRY.get_sample_value(LATENCY_COUNT, {"stage": "acked"}) or 0.0
    work_ids = world.enqueue(3)
    world.create_pool()
    pods = await world.wait_pods(3)
    await world.wait_work_state(work_ids, "starting")
    # The operator runs in this process: its metrics are in the default registry.
    await world.kube.wait_until(
        lambda: REGISTRY.get_sample_value(DISPATCHED, {"namespace": "ns", "pool": "pool"}) == dispatched_before + 3
        and REGISTRY.get_sample_value(LATENCY_COUNT, {"stage": "acked"}) == latencies_before + 3,
        message="3 dispatches in the metrics")

    pool = world.pool()
    assert pool is not None
    for work_id in work_ids:
        pod = world.pod_for(work_id)
        assert pod is not None
        labels = pod["metadata"]["labels"]
        assert labels["managedagents.dev/worker-pool"] == "pool"
        assert labels["managedagents.dev/work-id"] == work_id
        assert labels["app.kubernetes.io/managed-by"] == "environments-operator"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == pool["metadata"]["uid"]
        env = env_of(pod)
        item = world.emulator.state.work[work_id]
        assert env["ANTHROPIC_WORK_ID"] == work_id
        assert env["ANTHROPIC_ENVIRONMENT_ID"] == world.environment.id
        assert env["ANTHROPIC_SESSION_ID"] == item.session_id
        assert env["ANTHROPIC_BASE_URL"] == world.emulator.base_url
        ref = env["ANTHROPIC_WORK_SECRET"]["secretKeyRef"]
        secret = world.kube.get(SECRETS, ref["name"], world.namespace)
        assert secret is not None
        assert base64.b64decode(secret["data"][ref["key"]]).decode() == item.secret
        assert pod["spec"]["containers"][0]["image"] == WORKER_IMAGE
        assert len(world.acks(work_id)) == 1
    assert len(pods) == 3


async def test_the_capacity_cap_holds_and_frees_as_pods_finish(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    most_unfinished = 0

    async def watch_pods() -> None:
        nonlocal most_unfinished
        async for _ in world.kube.changes(PODS):
            unfinished = [p for p in world.pods() if p.get("status", {}).get("phase") in ("Pending", "Running")]
            most_unfinished = max(most_unfinished, len(unfinished))

    watcher = asyncio.create_task(watch_pods())
    try:
        work_ids = world.enqueue(5)
        world.create_pool(maxWorkers=2)
        await world.wait_pods(2)
        await world.wait_condition("AtCapacity", "True")
        # The backlog comes from the queue stats, read every 2 s while the pool is at capacity.
        await world.kube.wait_until(lambda: "3 items waiting" in (world.condition("AtCapacity") or {})["message"],
                                    message=lambda: f"backlog of 3 in {world.condition('AtCapacity')}")
        pool = await world.kube.wait_for(WORKERPOOLS, "pool", lambda o: (o or {}).get("status", {}).get(
            "desiredWorkers") == 2 and o["status"].get("queue", {}).get("depth") == 3, world.namespace)
        assert pool is not None
        assert pool["status"]["workers"] == {"warm": 0, "starting": 2, "running": 0, "succeeded": 0, "failed": 0}
        assert pool["status"]["lastDispatchTime"]
        assert sorted(world.work_state(w) for w in work_ids) == ["queued"] * 3 + ["starting"] * 2

        # Finishing pods frees their slots: the rest are dispatched two at a time.
        world.kubelet.start_auto(running_after=0.05, finish_after=0.1)
        await world.wait_work_state(work_ids, "starting")
        await world.wait_pods(5)
        await world.wait_condition("AtCapacity", "False")
    finally:
        watcher.cancel()
    assert most_unfinished == 2


async def test_restart_rebuilds_the_view_from_the_labelled_pods(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    first = world.enqueue(2)
    world.create_pool(maxWorkers=2)
    await world.wait_work_state(first, "starting")
    await world.wait_released(first)
    await world.operator.restart(abrupt=True)

    later = world.enqueue(1)
    await asyncio.sleep(1.5)  # several long-polls' worth: a restarted operator that lost count would dispatch
    assert world.work_state(later[0]) == "queued" and len(world.pods()) == 2
    done = world.pod_for(first[0])
    assert done is not None
    world.kubelet.run(done["metadata"]["name"], world.namespace)
    world.kubelet.succeed(done["metadata"]["name"], world.namespace)
    await world.wait_work_state(later, "starting")
    assert len(world.pods()) == 3


async def test_environment_ref_resolves_through_the_environment_resource(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_ids = world.enqueue(1)
    world.create_pool(environmentId=None, environmentRef={"name": "workers"})
    ready = await world.wait_condition("Ready", "False", "EnvironmentNotFound")
    assert "'workers'" in ready["message"]

    # The Environment controller adopts the remote environment and reports its ID in status.id.
    world.kube.create(ENVIRONMENTS, {
        "apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
        "metadata": {"name": "workers", "namespace": world.namespace},
        "spec": {"config": {"type": "self_hosted"}, "externalId": world.environment.id, "deletionPolicy": "Orphan"},
    }, namespace=world.namespace)
    await world.wait_condition("Ready", "True", timeout=15)
    await world.wait_work_state(work_ids, "starting")
    assert (world.pool() or {})["status"]["environmentId"] == world.environment.id


@pytest.mark.parametrize(("change", "reason", "mentions"), [
    ({"environmentKeySecretRef": {"name": "absent", "key": "key"}}, "EnvironmentKeyUnavailable", "ns/absent"),
    ({"environmentKeySecretRef": {"name": "env-key", "key": "other"}}, "EnvironmentKeyUnavailable", "'other'"),
])
async def test_an_unusable_pool_says_why_and_dispatches_nothing(
        workerpool_world: WorkerPoolWorld, change: dict, reason: str, mentions: str) -> None:
    world = workerpool_world
    work_ids = world.enqueue(1)
    world.create_pool(**change)
    ready = await world.wait_condition("Ready", "False", reason)
    assert mentions in ready["message"]
    await asyncio.sleep(0.5)
    assert world.pods() == [] and world.work_state(work_ids[0]) == "queued"
    assert not [r for r in world.responses if r.path.endswith("/work/poll")]
    assert world.operator.running  # a condition, never a crash


async def test_a_missing_key_secret_recovers_once_created(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_ids = world.enqueue(1)
    world.create_pool(environmentKeySecretRef={"name": "late-key", "key": "key"})
    await world.wait_condition("Ready", "False", "EnvironmentKeyUnavailable")
    world.key_secrets.add("late-key")
    world.kube.create(SECRETS, {"metadata": {"name": "late-key", "namespace": world.namespace},
                                "data": {"key": base64.b64encode(world.environment.key.encode()).decode()}},
                      namespace=world.namespace)
    await world.wait_work_state(work_ids, "starting")
    await world.wait_condition("Ready", "True")


@pytest.mark.parametrize(("code", "reason", "message"), [
    (403, "PodCreationForbidden", 'pods "x" is forbidden: exceeded quota: compute, requested: pods=1'),
    (422, "PodInvalid", "Pod is invalid: spec.containers[0].image: Required value"),
])
async def test_refused_pod_creation_reports_dispatch_failing_and_keeps_the_item(
        workerpool_world: WorkerPoolWorld, code: int, reason: str, message: str) -> None:
    world = workerpool_world
    refusal = world.kube.fail("create", PODS, code=code, message=message, times=None)
    (work_id,) = world.enqueue(1)
    world.create_pool()
    failing = await world.wait_condition("DispatchFailing", "True", reason)
    assert message in failing["message"] and work_id in failing["message"]
    _, _, event = await world.wait_event("DispatchFailed")
    assert message in event
    assert world.work_state(work_id) == "queued" and world.acks() == []  # left for reclaim, not lost
    assert world.secrets_of_items() == []  # the Secret made for the refused pod is gone again

    refusal.remove()
    await world.wait_work_state([work_id], "starting", timeout=15)
    assert world.pod_for(work_id) is not None
    await world.wait_condition("DispatchFailing", "False")


@pytest.mark.parametrize("faults", [
    [{"route": "work.poll", "effect": "error", "status": 503, "times": 3}],
    [{"route": "work.poll", "effect": "error", "status": 429, "retry_after_ms": 200, "times": 2}],
    [{"route": "work.ack", "effect": "error", "status": 500, "times": 2, "when": "after"}],
    [{"route": "work.ack", "effect": "error", "status": 429, "retry_after_ms": 100, "times": 2}],
    [{"route": "work.ack", "effect": "drop", "times": 1, "when": "after"}],
], ids=["poll-503", "poll-429", "ack-500-after-commit", "ack-429", "ack-dropped-after-commit"])
async def test_api_errors_during_poll_and_ack_lose_nothing(workerpool_world: WorkerPoolWorld,
                                                          faults: list[dict]) -> None:
    world = workerpool_world
    route = faults[0]["route"]
    status = str(faults[0].get("status", 0))
    errors_before = REGISTRY.get_sample_value(API_ERRORS, {"route": route, "status": status}) or 0.0
    world.emulator.faults.add({"faults": faults})
    work_ids = world.enqueue(3)
    world.create_pool()
    await world.wait_work_state(work_ids, "starting", timeout=15)
    await world.wait_pods(3)
    assert len(world.pods()) == 3
    # An ack whose answer was lost is retried (acks are idempotent): each item ends acknowledged once.
    await world.kube.wait_until(lambda: len(world.acks()) >= 3, message="3 successful acks")
    assert sorted(r.path.split("/")[-2] for r in world.acks()) == sorted(work_ids)
    assert (REGISTRY.get_sample_value(API_ERRORS, {"route": route, "status": status}) or 0.0) > errors_before


async def test_an_ack_answered_409_for_an_item_acknowledged_after_all_releases_its_pod(
        workerpool_world: WorkerPoolWorld) -> None:
    """A 409 means the item is past queued; when it is ``starting`` (the ack went through, its answer was
    lost or mangled), the gated pod is the item's only worker: it is released, not deleted."""
    world = workerpool_world
    world.emulator.faults.add({"faults": [
        {"route": "work.ack", "effect": "error", "status": 409, "times": 1, "when": "after"},
    ]})
    (work_id,) = world.enqueue(1)
    world.create_pool()
    await world.wait_work_state([work_id], "starting")
    await world.kube.wait_until(
        lambda: any(r.path.endswith(f"/{work_id}/ack") and r.status == 409 for r in world.responses),
        message="the 409 ack answer")
    await world.kube.wait_until(lambda: (pod := world.pod_for(work_id)) is not None
                                and not pod["spec"].get("schedulingGates"), message="the pod released")
    assert world.work_state(work_id) == "starting"
