"""Prometheus metrics of the operator, served on ``ENVIRONMENTS_OPERATOR_METRICS_PORT``.

Definitions only: the controllers and adapters update them. This module may not import handlers or
adapters (both import it), and no metric label may carry a credential or a work item's secret.
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram

from environments_operator import __version__

# Dispatch is a few round trips on a local network: most items land in the 5-100 ms buckets, and
# the tail buckets show apiserver or API slowness.
_DISPATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

DISPATCH_LATENCY = Histogram(
    "environments_operator_dispatch_latency_seconds",
    "Time from claiming a work item to its worker pod being created (stage=pod_created) "
    "and to the item being acknowledged (stage=acked).",
    ["stage"],
    buckets=_DISPATCH_BUCKETS,
)
ITEMS_DISPATCHED = Counter(
    "environments_operator_work_items_dispatched_total",
    "Work items handed to a worker pod and acknowledged.",
    ["namespace", "pool"],
)
WORKER_PODS = Gauge(
    "environments_operator_worker_pods",
    "Worker pods of a WorkerPool by phase (starting, running, succeeded, failed).",
    ["namespace", "pool", "phase"],
)
QUEUE_DEPTH = Gauge(
    "environments_operator_work_queue_depth",
    "Work items waiting in the queue served by a WorkerPool (from work/stats).",
    ["namespace", "pool"],
)
API_ERRORS = Counter(
    "environments_operator_api_errors_total",
    "Failed Environments API calls by route (e.g. work.poll) and HTTP status (0: no response).",
    ["route", "status"],
)
API_REQUESTS = Counter(
    "environments_operator_api_requests_total",
    "Every Environments API call (each attempt of a retried one) by route (e.g. work.poll, "
    "environments.create) and status class (2xx, 4xx, 5xx; none: no response).",
    ["route", "status_class"],
)
WORKER_EVENTS = Counter(
    "environments_operator_worker_lifecycle_total",
    "Worker pods ended by the operator or found ended abnormally, by reason "
    "(WorkerStartTimeout, WorkerFailed, WorkerVanished, DispatchFailed).",
    ["namespace", "pool", "reason"],
)

# From the claim to the worker pod's first Running: the release, scheduling, image pull and container
# start. Seconds on a warm node, minutes with a cold image pull or a node scaling up.
_SESSION_START_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# How long items wait in the queue before a claim: ~0 while the pool has capacity, the backlog's
# drain time when it has none.
_QUEUE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

SESSION_START = Histogram(
    "environments_operator_session_start_seconds",
    "Time from claiming a work item to its worker pod's first Running phase (observed once per pod, "
    "only for items this operator process claimed).",
    ["namespace", "pool"],
    buckets=_SESSION_START_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "environments_operator_queue_wait_seconds",
    "Time a work item waited in the queue: its created_at to its claim by a WorkerPool's poll.",
    ["namespace", "pool"],
    buckets=_QUEUE_WAIT_BUCKETS,
)
MAX_WORKERS = Gauge(
    "environments_operator_workerpool_max_workers",
    "A WorkerPool's spec.maxWorkers: the most worker pods it runs at once.",
    ["namespace", "pool"],
)
DESIRED_WORKERS = Gauge(
    "environments_operator_workerpool_desired_workers",
    "A WorkerPool's status.desiredWorkers: min(maxWorkers, unfinished workers + queue depth).",
    ["namespace", "pool"],
)
ENVIRONMENTS = Gauge(
    "environments_operator_environments",
    "Environment resources served by this operator, by the status (True, False, Unknown) and reason of "
    "their Ready condition.",
    ["namespace", "ready", "reason"],
)
ENVIRONMENT_SYNCS = Counter(
    "environments_operator_environment_syncs_total",
    "Successful Environment syncs by trigger (spec: a create or spec change; check: a drift check or "
    "sync-now) and outcome (the Ready reason: Created, Adopted, Updated, InSync, DriftCorrected, Recreated).",
    ["namespace", "trigger", "reason"],
)
ENVIRONMENT_DRIFT_REPAIRS = Counter(
    "environments_operator_environment_drift_repairs_total",
    "Drift repaired by the Environment controller: fields changed outside the operator and set back "
    "(kind=corrected), or an environment deleted outside the operator and created again (kind=recreated).",
    ["namespace", "kind"],
)
BUILD_INFO = Gauge(
    "environments_operator_build_info",
    "Always 1; the labels say which operator version runs on which Python.",
    ["version", "python_version"],
)
BUILD_INFO.labels(version=__version__, python_version=platform.python_version()).set(1)

_POOL_SERIES = (QUEUE_DEPTH, MAX_WORKERS, DESIRED_WORKERS, SESSION_START, QUEUE_WAIT)


def count_api_success(route: str) -> None:
    """Count one Environments API call that was answered 2xx."""
    API_REQUESTS.labels(route=route, status_class="2xx").inc()


def count_api_failure(route: str, status: int) -> None:
    """Count one failed Environments API call (``status`` 0: no response) in both API counters."""
    API_REQUESTS.labels(route=route, status_class=f"{status // 100}xx" if status >= 100 else "none").inc()
    API_ERRORS.labels(route=route, status=str(status)).inc()


def observe_pool_size(namespace: str, pool: str, max_workers: int, desired_workers: int | None) -> None:
    """The pool's spec.maxWorkers and status.desiredWorkers, as its status was composed."""
    MAX_WORKERS.labels(namespace=namespace, pool=pool).set(max_workers)
    if desired_workers is not None:
        DESIRED_WORKERS.labels(namespace=namespace, pool=pool).set(desired_workers)


def forget_pool(namespace: str, pool: str) -> None:
    """Drop the series of a deleted WorkerPool so that its last values are not reported forever."""
    for phase in ("starting", "running", "succeeded", "failed"):
        try:
            WORKER_PODS.remove(namespace, pool, phase)
        except KeyError:
            pass
    for series in _POOL_SERIES:
        try:
            series.remove(namespace, pool)
        except KeyError:
            pass
