"""What a platform team sees of a WorkerPool: Events for Ready, suspension, where an item runs, kubectl columns."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from environments_operator.devcluster.kube import SECRETS, WORKERPOOLS
from tests.e2e.conftest import ENVIRONMENT_KEY_SECRET, WorkerPoolWorld

pytestmark = pytest.mark.timeout(90)


async def test_a_ready_false_reason_posts_one_warning_and_recovery_a_normal_event(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    key = world.kube.get(SECRETS, ENVIRONMENT_KEY_SECRET, world.namespace)
    assert key is not None
    world.kube.delete(SECRETS, ENVIRONMENT_KEY_SECRET, world.namespace)
    world.create_pool()
    await world.wait_condition("Ready", "False", "EnvironmentKeyUnavailable")
    event = await world.wait_event("EnvironmentKeyUnavailable")
    assert event[0] == "Warning" and "environmentKeySecretRef" in event[2]
    await asyncio.sleep(2.5)  # more passes, the same reason: still one Event
    assert [e for e in world.events() if e[1] == "EnvironmentKeyUnavailable"] == [event]
    world.kube.create(SECRETS, {"metadata": {"name": ENVIRONMENT_KEY_SECRET, "namespace": world.namespace},
                                "data": key["data"]}, world.namespace)
    await world.wait_condition("Ready", "True", "Serving", timeout=30)
    recovered = await world.wait_event("Serving")
    assert recovered[0] == "Normal" and "EnvironmentKeyUnavailable" in recovered[2]


async def test_a_suspended_pool_claims_nothing_leaves_running_sessions_alone_and_resumes(
        workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    (running,) = world.enqueue(1)
    world.create_pool()
    await world.wait_work_state([running], "starting")
    (pod,) = await world.wait_released([running])
    world.kubelet.run(pod["metadata"]["name"], world.namespace)
    world.kube.patch(WORKERPOOLS, "pool", {"spec": {"suspend": True}}, world.namespace)
    await world.wait_condition("Ready", "False", "Suspended")
    assert (await world.wait_event("Suspended"))[0] == "Normal"
    waiting = world.enqueue(2)
    await asyncio.sleep(2.5)  # several reclaim windows and passes
    assert all(world.work_state(w) == "queued" for w in waiting) and all(world.pod_for(w) is None for w in waiting)
    assert world.pod_for(running) is not None and world.work_state(running) == "starting"
    await world.kube.wait_until(lambda: (world.pool() or {}).get("status", {}).get("queue", {}).get("depth") == 2,
                                timeout=20, message="the backlog shown while suspended")
    world.kube.patch(WORKERPOOLS, "pool", {"spec": {"suspend": False}}, world.namespace)
    await world.wait_work_state(waiting, "starting")
    await world.wait_condition("Ready", "True", "Serving")


async def test_the_item_says_where_it_runs(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    (work_id,) = world.enqueue(1)
    world.create_pool()
    await world.wait_work_state([work_id], "starting")
    pod = world.pod_for(work_id)
    assert pod is not None
    await world.kube.wait_until(lambda: world.emulator.state.work[work_id].metadata, message="the item's metadata")
    assert world.emulator.state.work[work_id].metadata == {
        "managedagents.dev/namespace": world.namespace, "managedagents.dev/pod": pod["metadata"]["name"],
        "managedagents.dev/worker-pool": "pool"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
async def test_kubectl_get_workerpools_shows_capacity_and_the_ready_reason(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    world.kube.delete(SECRETS, ENVIRONMENT_KEY_SECRET, world.namespace)
    world.create_pool(maxWorkers=7)
    await world.wait_condition("Ready", "False", "EnvironmentKeyUnavailable")

    def kubectl(*args: str) -> tuple[list[str], dict[str, str]]:
        """The header and the one row, cut at the header's column starts (empty cells stay empty)."""
        result = subprocess.run(["kubectl", "--kubeconfig", str(world.kube.kubeconfig), "get", "workerpools",
                                 "-n", world.namespace, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        header_line, row_line = result.stdout.splitlines()
        header = header_line.split()
        starts = [header_line.index(f"{name} ") if name != header[-1] else header_line.rindex(name) for name in header]
        cells = [row_line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        return header, dict(zip(header, cells, strict=True))

    header, shown = await asyncio.to_thread(kubectl)
    assert header == ["NAME", "ENVIRONMENT", "MAX", "RUNNING", "STARTING", "WARM", "QUEUED", "READY", "REASON", "AGE"]
    # The environment ID is known from the spec, the key is not: the reason says why nothing runs.
    assert shown["MAX"] == "7" and shown["READY"] == "False" and shown["REASON"] == "EnvironmentKeyUnavailable"
    wide_header, _ = await asyncio.to_thread(kubectl, "-o", "wide")
    assert {"MIN", "FAILED", "DESIRED", "SUSPENDED"} <= set(wide_header)

