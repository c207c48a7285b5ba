"""Warm workers (``spec.minWorkers``) end to end: real warm worker processes, bound late to real sessions.

The shipped operator (kopf) on the simulated cluster, the emulator's scripted sessions, and the process
kubelet, which runs each warm pod as a local ``environments-operator worker`` in warm mode: it reaches
the fake apiserver through the in-cluster front with its own ServiceAccount's token, whose Role lets it
get and watch its assignment Secret only.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest

from environments_operator.devcluster.kube import PODS, ROLEBINDINGS, ROLES, SECRETS, SERVICEACCOUNTS, WORKERPOOLS
from environments_operator.devcluster.process_kubelet import ProcessKubelet
from tests.e2e.conftest import WorkerPoolWorld
from tests.e2e.test_sessions_served import assert_each_served_once, start_sessions, wait_served
from tests.harness.emulator import api_client

pytestmark = pytest.mark.timeout(240)

WARM = {"managedagents.dev/warm": "true"}


def warm_pods(world: WorkerPoolWorld, *, bound: bool | None = False) -> list[dict[str, Any]]:
    """The pool's warm pods that are not being deleted: unbound ones (default), bound ones, or all (None)."""
    pods = [p for p in world.kube.list(PODS, world.namespace, WARM) if not p["metadata"].get("deletionTimestamp")]
    if bound is None:
        return pods
    return [p for p in pods if bool((p["metadata"].get("annotations") or {}).get("managedagents.dev/work-id")) == bound]


async def wait_warm_ready(world: WorkerPoolWorld, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Wait until ``count`` unbound warm pods run (their workers are up, waiting for an assignment)."""
    def ready() -> list[dict[str, Any]] | None:
        running = [p for p in warm_pods(world) if (p.get("status") or {}).get("phase") == "Running"]
        return running if len(running) >= count else None

    def have() -> str:
        return str([(p["metadata"]["name"], (p.get("status") or {}).get("phase")) for p in warm_pods(world)])

    found = await world.kube.wait_until(ready, timeout=timeout, message=lambda: f"{count} warm pods running ({have()})")
    assert isinstance(found, list)
    return found


def served_by(world: WorkerPoolWorld) -> dict[str, str]:
    """work id -> the name of the pod it was bound to (warm) or created for (fresh)."""
    return {str((p["metadata"].get("annotations") or {})["managedagents.dev/work-id"]): p["metadata"]["name"]
            for p in world.kube.list(PODS, world.namespace, {"managedagents.dev/worker-pool": "pool"})
            if (p["metadata"].get("annotations") or {}).get("managedagents.dev/work-id")}


class TestWarmWorkers:
    async def test_warm_pods_wait_before_any_session_and_one_serves_the_next(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(minWorkers=2, maxWorkers=4, maxIdleSeconds=0, ttlSecondsAfterFinished=60)
        warm = await wait_warm_ready(world, 2)
        warm_names = {p["metadata"]["name"] for p in warm}
        assert not world.emulator.state.work  # no session exists yet
        async with api_client(world.emulator) as api:
            (session_id,) = await start_sessions(api, world, 1)
            await wait_served(world, [session_id])
            await assert_each_served_once(api, [session_id], host_prefix="pool-warm-")
        (work_id,) = [i.id for i in world.emulator.state.work.values() if i.session_id == session_id]
        pod_name = served_by(world)[work_id]
        assert pod_name in warm_names  # a pod that existed before the session did
        await world.kube.wait_until(lambda: pod_name in process_kubelet.exit_codes, timeout=15,
                                    message="the serving pod exited")
        assert process_kubelet.exit_codes[pod_name] == 0
        # One serves and exits; the pool is back to two warm pods, neither of them the one that served.
        again = await wait_warm_ready(world, 2)
        assert pod_name not in {p["metadata"]["name"] for p in again}
        pool = await world.kube.wait_until(
            lambda: (p := world.pool())
            and ((p.get("status") or {}).get("workers") or {}).get("warm") == 2 and p, timeout=15,
            message="status.workers.warm == 2")
        assert pool
        assert len(world.acks(work_id)) == 1

    async def test_a_burst_larger_than_the_warm_set_is_served_once_each_within_max_workers(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        max_workers, sessions = 4, 8
        world.create_pool(minWorkers=2, maxWorkers=max_workers, maxIdleSeconds=0, ttlSecondsAfterFinished=1)
        warm_names = {p["metadata"]["name"] for p in await wait_warm_ready(world, 2)}
        peak = 0
        done = asyncio.Event()

        async def watch_peak() -> None:
            nonlocal peak
            while not done.is_set():
                pods = world.kube.list(PODS, world.namespace, {"managedagents.dev/worker-pool": "pool"})
                unfinished = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
                peak = max(peak, len(unfinished))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch_peak())
        try:
            async with api_client(world.emulator) as api:
                session_ids = await start_sessions(api, world, sessions)
                await wait_served(world, session_ids)
                await assert_each_served_once(api, session_ids, host_prefix="")
        finally:
            done.set()
            await watcher
        assert peak <= max_workers
        acks = world.acks()
        work_ids = [i.id for i in world.emulator.state.work.values() if i.session_id in session_ids]
        assert all(len([a for a in acks if f"/{w}/" in a.path]) == 1 for w in work_ids)
        assert len(process_kubelet.started) == len(set(process_kubelet.started))
        # No pod served two items: each item has its own pod.
        assert len(set(served_by(world).values())) == len(served_by(world))
        # The two warm pods ready before the burst served two of its items.
        assert warm_names <= set(served_by(world).values()) | set(process_kubelet.exit_codes)

    async def test_no_warm_pod_can_read_more_than_its_own_assignment(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(minWorkers=2, maxWorkers=3, maxIdleSeconds=0)
        warm = await wait_warm_ready(world, 2)
        for pod in warm:
            name = pod["metadata"]["name"]
            container = pod["spec"]["containers"][0]
            assert pod["spec"]["serviceAccountName"] == name
            variables = {e["name"] for e in container.get("env") or []}
            assert not variables & {"ANTHROPIC_WORK_ID", "ANTHROPIC_WORK_SECRET", "ANTHROPIC_ENVIRONMENT_KEY",
                                    "ANTHROPIC_API_KEY"}
            assert not [e for e in container.get("env") or [] if "valueFrom" in e]
            roles = world.kube.list(ROLES, world.namespace, {"managedagents.dev/warm-pod": name})
            assert [r["rules"] for r in roles] == [[{"apiGroups": [""], "resources": ["secrets"],
                                                     "resourceNames": [name], "verbs": ["get", "watch"]}]]
            (binding,) = world.kube.list(ROLEBINDINGS, world.namespace, {"managedagents.dev/warm-pod": name})
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": world.namespace}]
            assert binding["roleRef"]["name"] == name
        # Through the in-cluster front, with the token the kubelet gives it, a warm pod's ServiceAccount
        # may get its own assignment (404: none yet) and nothing else: not the other's, not a list.
        first, second = (p["metadata"]["name"] for p in warm)
        front = process_kubelet.front
        token = front.issue_token(world.namespace, first)
        async with httpx.AsyncClient(base_url=front.url, verify=front.client_ssl_context(),
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            secrets_path = f"/api/v1/namespaces/{world.namespace}/secrets"
            assert (await client.get(f"{secrets_path}/{first}")).status_code == 404
            assert (await client.get(f"{secrets_path}/{second}")).status_code == 403
            assert (await client.get(secrets_path)).status_code == 403
            assert (await client.get(f"/api/v1/namespaces/{world.namespace}/pods/{first}")).status_code == 403
        # Nothing the operator made grants a warm pod's ServiceAccount anything else.
        subjects = [(b["metadata"]["name"], s["name"]) for b in world.kube.list(ROLEBINDINGS, world.namespace, {})
                    for s in b.get("subjects") or []]
        assert all(binding == subject for binding, subject in subjects)
        # Served: the assignment holds only that item's own values, and the environment key is nowhere a
        # warm pod could read.
        async with api_client(world.emulator) as api:
            (session_id,) = await start_sessions(api, world, 1)
            await wait_served(world, [session_id])
        key = world.environment.key
        for secret in world.kube.list(SECRETS, world.namespace, {"managedagents.dev/worker-pool": "pool"}):
            decoded = [base64.b64decode(v).decode() for v in (secret.get("data") or {}).values()]
            assert key not in decoded
        for pod in process_kubelet.started:
            assert key not in process_kubelet.log(pod)

    async def test_lowering_min_workers_retires_idle_warm_pods_only_and_deleting_the_pool_removes_everything(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(minWorkers=2, maxWorkers=3, maxIdleSeconds=0)
        await wait_warm_ready(world, 2)
        slow = [{"tool": "bash", "input": {"command": "sleep 3; echo done"}}]
        async with api_client(world.emulator) as api:
            from tests.harness.sessions import scripted_agent

            agent = await scripted_agent(api, slow, reply="served")
            session = await api.beta.sessions.create(agent=agent, environment_id=world.environment.id)
            bound = await world.kube.wait_until(lambda: warm_pods(world, bound=True), timeout=20,
                                                message="a warm pod bound")
            assert bound
            bound_name = bound[0]["metadata"]["name"]
            world.kube.patch(WORKERPOOLS, "pool", {"spec": {"minWorkers": 0}}, world.namespace)
            await world.kube.wait_until(lambda: not warm_pods(world), timeout=20, message="idle warm pods retired")
            assert world.kube.get(PODS, bound_name, world.namespace) is not None  # the bound one runs on
            item = next(i for i in world.emulator.state.work.values() if i.session_id == session.id)
            await world.kube.wait_until(lambda: item.state == "stopped", timeout=30, message="the session served")
            await world.kube.wait_until(lambda: bound_name in process_kubelet.exit_codes, timeout=15,
                                        message="the bound pod exited")
            assert process_kubelet.exit_codes[bound_name] == 0
        world.kube.patch(WORKERPOOLS, "pool", {"spec": {"minWorkers": 2}}, world.namespace)
        await wait_warm_ready(world, 2)
        world.kube.delete(WORKERPOOLS, "pool", world.namespace)
        await world.kube.wait_until(lambda: world.pool() is None, timeout=30,
                                    message="the pool deleted")
        for resource in (PODS, SECRETS, SERVICEACCOUNTS, ROLES, ROLEBINDINGS):
            left = world.kube.list(resource, world.namespace, {"managedagents.dev/worker-pool": "pool"})
            assert not left, (resource.plural, [o["metadata"]["name"] for o in left])

    async def test_a_warm_pod_that_fails_before_binding_is_replaced_and_reported_and_serves_nothing(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet
    ) -> None:
        world = workerpool_world
        world.create_pool(minWorkers=1, maxWorkers=2, maxIdleSeconds=0)
        (warm,) = await wait_warm_ready(world, 1)
        name = warm["metadata"]["name"]
        process_kubelet.kill(name)  # its worker dies while it waits
        await world.wait_event("WarmWorkerFailed", timeout=20)
        (replacement,) = await wait_warm_ready(world, 1)
        assert replacement["metadata"]["name"] != name
        async with api_client(world.emulator) as api:
            (session_id,) = await start_sessions(api, world, 1)
            await wait_served(world, [session_id])
        (work_id,) = [i.id for i in world.emulator.state.work.values() if i.session_id == session_id]
        assert served_by(world)[work_id] == replacement["metadata"]["name"]

    @pytest.mark.parametrize("stop_at", ["bound", "acked"])
    async def test_an_operator_killed_while_binding_serves_the_item_exactly_once(
        self, workerpool_world: WorkerPoolWorld, process_kubelet: ProcessKubelet, stop_at: str
    ) -> None:
        """Killed after the warm pod is bound and before the ack (its Secret create fails), or after the ack
        and before the assignment (the assignment create fails): after the restart the item is served
        once, by that warm pod, and no warm pod is orphaned or bound twice."""
        world = workerpool_world
        world.create_pool(minWorkers=1, maxWorkers=2, maxIdleSeconds=0, poll={"reclaimOlderThanMs": 1000})
        await wait_warm_ready(world, 1)
        if stop_at == "bound":
            fault = world.kube.fail("create", SECRETS, code=500, times=None)
        else:
            fault = world.kube.fail("create", SECRETS, code=500, times=None,
                                    when=lambda body: "managedagents.dev/warm-pod" in (
                                        ((body or {}).get("metadata") or {}).get("labels") or {}))
        async with api_client(world.emulator) as api:
            (session_id,) = await start_sessions(api, world, 1)
            await world.kube.wait_until(lambda: warm_pods(world, bound=True), timeout=20, message="bound")
            item = next(i for i in world.emulator.state.work.values() if i.session_id == session_id)
            if stop_at == "acked":
                await world.kube.wait_until(lambda: item.state == "starting", timeout=20, message="acked")
            await asyncio.sleep(0.3)
            world.operator.kill()
            world.kube.clear_faults()
            del fault
            await world.operator.start()
            await wait_served(world, [session_id], timeout=60)
            await assert_each_served_once(api, [session_id], host_prefix="pool-warm-")
        assert len(world.acks(item.id)) == 1
        # Served by a warm pod (its HOSTNAME is in the tool result), and by one process only.
        await world.kube.wait_until(lambda: 0 in process_kubelet.exit_codes.values(), timeout=15,
                                    message="the serving pod exited")
        servers = [name for name, code in process_kubelet.exit_codes.items() if code == 0]
        assert len(servers) == 1 and servers[0].startswith("pool-warm-"), process_kubelet.exit_codes
        bound_names = [p["metadata"]["name"] for p in warm_pods(world, bound=True)]
        assert len(bound_names) == len(set(bound_names)) <= 1

