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

BUILD_INFO = Gauge(
    "environments_operator_build_info",
    "Always 1; the labels say which operator version runs on which Python.",
    ["version", "python_version"],
)
BUILD_INFO.labels(version=__version__, python_version=platform.python_version()).set(1)


def count_api_success(route: str) -> None:
    """Count one Environments API call that was answered 2xx."""
    API_REQUESTS.labels(route=route, status_class="2xx").inc()


def count_api_failure(route: str, status: int) -> None:
    """Count one failed Environments API call (``status`` 0: no response) in both API counters."""
    API_REQUESTS.labels(route=route, status_class=f"{status // 100}xx" if status >= 100 else "none").inc()
    API_ERRORS.labels(route=route, status=str(status)).inc()


def forget_pool(namespace: str, pool: str) -> None:
    """Drop the series of a deleted WorkerPool so that its last values are not reported forever."""
    for phase in ("starting", "running", "succeeded", "failed"):
        try:
            WORKER_PODS.remove(namespace, pool, phase)
        except KeyError:
            pass
    try:
        QUEUE_DEPTH.remove(namespace, pool)
    except KeyError:
        pass
