"""Exactly-once dispatch under operator crashes: one pod per item, no item lost, none acknowledged twice.

The operator is killed abruptly (its event loop stops dead, its connections drop, no cleanup runs) at
the points where a crash hurts most, in the middle of a 200-item burst, and restarted each time:

1. a per-item Secret is written, its pod not yet;
2. a pod is written, its item not yet acknowledged;
3. anywhere, twice more, while dozens of dispatches are in flight.

A restarted operator knows only what the apiserver and the API tell it. Items it had claimed are offered
again after the reclaim window, meet their existing Secret or Pod (AlreadyExists), and are only
acknowledged then.
"""

from __future__ import annotations

import collections

from environments_operator.devcluster.kube import PODS, SECRETS
from tests.e2e.conftest import WorkerPoolWorld

BURST = 200


async def crash_when_held(world: WorkerPoolWorld, resource: object) -> None:
    """Kill the operator while a create of ``resource`` is committed but not yet answered; restart it."""
    hold = world.kube.hold("create", resource, apply_first=True)  # type: ignore[arg-type]
    await hold.wait_arrived(timeout=20)
    world.operator.kill()
    hold.release()
    await world.operator.start()


async def crash_after(world: WorkerPoolWorld, pods: int) -> None:
    await world.wait_pods(pods, timeout=30)
    world.operator.kill()
    await world.operator.start()


async def test_a_burst_survives_crashes_with_exactly_one_pod_per_item(workerpool_world: WorkerPoolWorld) -> None:
    world = workerpool_world
    work_ids = world.enqueue(BURST)
    world.create_pool(maxWorkers=BURST)

    await crash_when_held(world, SECRETS)
    await world.wait_pods(20, timeout=30)
    await crash_when_held(world, PODS)
    await crash_after(world, 90)
    await crash_after(world, 150)

    await world.wait_work_state(work_ids, "starting", timeout=60)
    await world.kube.wait_until(lambda: len(world.pods()) == BURST, timeout=10,
                                message=lambda: f"{BURST} pods (have {len(world.pods())})")
    assert world.operator.starts == 5

    pods_per_item = collections.Counter(p["metadata"]["labels"]["managedagents.dev/work-id"] for p in world.pods())
    assert set(pods_per_item) == set(work_ids)
    assert set(pods_per_item.values()) == {1}
    acks_per_item = collections.Counter(r.path.split("/")[-2] for r in world.acks())
    assert acks_per_item == dict.fromkeys(work_ids, 1), "an item was acknowledged twice"
    secrets = {s["metadata"]["annotations"]["managedagents.dev/work-id"] for s in world.secrets_of_items()}
    assert secrets == set(work_ids)
