"""Every metric of the operator, through the real operator on the simulated cluster, and the chart's alerts
and dashboard checked against the metric names that run really exposed.

One scenario produces every metric: Environments adopted, not found and drift-corrected; a WorkerPool
whose first pod creation is refused, whose first poll fails, two of whose workers start and one of which
never does. The operator runs in this process, so its metrics are read from prometheus_client's default
registry. "Exposed" means a sample that appeared or changed during the scenario (the registry outlives
tests), plus ``build_info``, which is set once at import.
"""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import REGISTRY

import environments_operator
from environments_operator.devcluster.kube import ENVIRONMENTS, PODS, WORKERPOOLS
from tests.chart.monitoring import (
    dashboard_metric_names,
    load_dashboard,
    operator_metrics,
    prometheus_rule,
    rule_metric_names,
    sample_names,
)
from tests.e2e.conftest import WorkerPoolWorld
from tests.harness.emulator import api_client

POOL = "metrics-pool"
NS = "ns"
SYNC_NOW = "environments.managedagents.dev/sync-now"
PREFIX = "environments_operator_"
CONSTANT = {"environments_operator_build_info"}  # set at import, unchanged by any scenario

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples() -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in REGISTRY.collect() for sample in family.samples if sample.name.startswith(PREFIX)}


def exposed_during(before: Samples, after: Samples) -> set[str]:
    changed = {name for key, value in after.items() if before.get(key) != value for name in [key[0]]}
    return changed | {name for name, _ in after if name in CONSTANT}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def environment(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


def ready_reason(world: WorkerPoolWorld, name: str) -> tuple[str, str] | None:
    obj = world.kube.get(ENVIRONMENTS, name, NS) or {}
    ready = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)
    return (ready["status"], ready["reason"]) if ready else None


async def test_every_metric_through_the_operator_and_alerts_and_dashboard_name_only_exposed_ones(
        workerpool_world: WorkerPoolWorld) -> None:
    world, kube = workerpool_world, workerpool_world.kube
    before = samples()
    pool_labels = {"namespace": NS, "pool": POOL}

    # --- Environments: one adopted (the pool's), one whose externalId does not exist, one created ----------
    kube.create(ENVIRONMENTS, environment("workers", {
        "config": {"type": "self_hosted"}, "externalId": world.environment.id, "deletionPolicy": "Orphan"}), NS)
    kube.create(ENVIRONMENTS, environment("missing", {
        "config": {"type": "cloud"}, "externalId": "env_011CZkZ9X2dpNyB7HsEFoRfW"}), NS)
    kube.create(ENVIRONMENTS, environment("cloud", {"config": {"type": "cloud"}, "name": "Cloud"}), NS)
    await kube.wait_until(lambda: ready_reason(world, "workers") == ("True", "Adopted")
                          and ready_reason(world, "missing") == ("False", "NotFound")
                          and ready_reason(world, "cloud") == ("True", "Created"),
                          timeout=15, message="three Environments reported")

    # --- drift: the remote environment renamed by hand, found by a sync-now check, set back ---------------
    cloud = kube.get(ENVIRONMENTS, "cloud", NS)
    assert cloud is not None
    async with api_client(world.emulator) as client:
        await client.beta.environments.update(cloud["status"]["id"], name="Renamed by hand")
    kube.patch(ENVIRONMENTS, "cloud", {"metadata": {"annotations": {SYNC_NOW: "1"}}}, NS)
    await kube.wait_until(lambda: ready_reason(world, "cloud") == ("True", "DriftCorrected"), timeout=15,
                          message="the drift corrected")

    # --- a WorkerPool: a refused pod, a failed poll, two workers that start and one that never does ------
    world.emulator.faults.add({"faults": [{"route": "work.poll", "effect": "error", "status": 503, "times": 1}]})
    world.kube.fail("create", PODS, code=403, message="exceeded quota: pods", times=1)
    work_ids = world.enqueue(3)
    stalled = work_ids[-1]
    world.kubelet.start_auto(running_after=0.05, match=lambda pod: pod["metadata"]["annotations"].get(
        "managedagents.dev/work-id") != stalled)
    kube.create(WORKERPOOLS, {
        "apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": POOL, "namespace": NS},
        "spec": world.pool_spec(environmentId=None, environmentRef={"name": "workers"}, maxWorkers=3,
                                startupTimeoutSeconds=2)}, NS)
    await world.wait_work_state(work_ids[:2], "starting", timeout=20)
    await world.wait_event("WorkerStartTimeout", name=POOL, timeout=20)
    await kube.wait_until(
        lambda: value(f"{PREFIX}session_start_seconds_count", **pool_labels) == 2
        and value(f"{PREFIX}worker_lifecycle_total", **pool_labels, reason="DispatchFailed") >= 1
        and value(f"{PREFIX}worker_lifecycle_total", **pool_labels, reason="WorkerStartTimeout") == 1,
        timeout=10, message=lambda: "two session starts, a refused dispatch and a start timeout; have " + ", ".join(
            f"{name}{dict(labels)}={v}" for (name, labels), v in samples().items()
            if ("pool", POOL) in labels and "_bucket" not in name and "_created" not in name))
    after = samples()

    # --- each new metric, as the scenario made it -----------------------------------------------------------
    # Session start: claim to Running, once per started pod (the stalled one never ran).
    assert 0 < value(f"{PREFIX}session_start_seconds_sum", **pool_labels) < 20
    assert value(f"{PREFIX}session_start_seconds_bucket", **pool_labels, le="+Inf") == 2
    # Queue wait: every claim (the refused item's first claim too), none negative, none absurd.
    waits = value(f"{PREFIX}queue_wait_seconds_count", **pool_labels)
    assert waits >= 4
    assert 0 <= value(f"{PREFIX}queue_wait_seconds_sum", **pool_labels) < 30 * waits
    assert value(f"{PREFIX}workerpool_max_workers", **pool_labels) == 3
    assert REGISTRY.get_sample_value(f"{PREFIX}workerpool_desired_workers", pool_labels) is not None
    # Environments by their stored Ready condition.
    for ready, reason in (("True", "Adopted"), ("False", "NotFound"), ("True", "DriftCorrected")):
        assert value(f"{PREFIX}environments", namespace=NS, ready=ready, reason=reason) == 1, (ready, reason)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew(f"{PREFIX}environment_syncs_total", namespace=NS, trigger="spec", reason="Adopted") >= 1
    assert grew(f"{PREFIX}environment_syncs_total", namespace=NS, trigger="spec", reason="Created") == 1
    assert grew(f"{PREFIX}environment_syncs_total", namespace=NS, trigger="check", reason="DriftCorrected") == 1
    assert grew(f"{PREFIX}environment_drift_repairs_total", namespace=NS, kind="corrected") == 1
    # API calls by route and status class: successes of both controllers, and the failures.
    assert grew(f"{PREFIX}api_requests_total", route="environments.create", status_class="2xx") == 1
    assert grew(f"{PREFIX}api_requests_total", route="environments.retrieve", status_class="4xx") >= 1
    assert grew(f"{PREFIX}api_errors_total", route="environments.retrieve", status="404") >= 1
    assert grew(f"{PREFIX}api_requests_total", route="work.poll", status_class="5xx") == 1
    assert grew(f"{PREFIX}api_requests_total", route="work.poll", status_class="2xx") >= 3
    assert grew(f"{PREFIX}api_requests_total", route="work.ack", status_class="2xx") >= 3
    assert grew(f"{PREFIX}api_requests_total", route="work.stats", status_class="2xx") >= 1
    assert value(f"{PREFIX}build_info", version=environments_operator.__version__,
                 python_version=platform.python_version()) == 1

    # --- the names that run exposed: every metric, and all the rule and the dashboard name ------------------
    exposed = exposed_during(before, after)
    unexposed = [family for family, metric in operator_metrics().items() if not sample_names(family, metric) & exposed]
    assert unexposed == [], f"the scenario produced no sample of {unexposed}"
    rule_names = rule_metric_names(prometheus_rule())
    assert {alert: names - exposed for alert, names in rule_names.items() if names - exposed} == {}
    dashboard_names = dashboard_metric_names(load_dashboard())
    assert {where: names - exposed for where, names in dashboard_names.items() if names - exposed} == {}

    # --- a deleted pool leaves no series behind; a deleted Environment is no longer counted -----------------
    kube.delete(WORKERPOOLS, POOL, NS)
    kube.delete(ENVIRONMENTS, "missing", NS)
    await kube.wait_for(WORKERPOOLS, POOL, lambda o: o is None, NS, timeout=15)
    await kube.wait_until(lambda: REGISTRY.get_sample_value(f"{PREFIX}environments", {
        "namespace": NS, "ready": "False", "reason": "NotFound"}) is None, message="NotFound no longer counted")
    for name in ("workerpool_max_workers", "workerpool_desired_workers", "work_queue_depth",
                 "session_start_seconds_count", "queue_wait_seconds_count"):
        assert REGISTRY.get_sample_value(PREFIX + name, pool_labels) is None, name
