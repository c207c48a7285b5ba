"""Operator configuration read from environment variables: the public contract with the Helm chart.

Every variable the operator reads is declared once in ``SETTINGS`` with its default, the Helm value
that sets it, and what it means. The chart tests read this table rather than a copied list, so a
variable added here without a chart counterpart fails the suite.

This module only reads the process environment; it performs no other I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SettingSpec:
    env: str
    default: str | None
    helm_value: str
    description: str
    secret: bool = False


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "ANTHROPIC_API_KEY", None, "apiKey.value / apiKey.existingSecret",
        "Default API key for Environment CRUD; an Environment may name its own in spec.apiKeySecretRef.",
        secret=True,
    ),
    SettingSpec(
        "ANTHROPIC_BASE_URL", None, "anthropic.baseUrl",
        "Address of the Environments API. Point it at the emulator to work offline.",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_WORKER_IMAGE", "ghcr.io/environments-operator/environments-operator:latest",
        "worker.image", "Default image for worker pods when a WorkerPool template names none.",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_WORKER_BASE_URL", None, "worker.baseUrl",
        "ANTHROPIC_BASE_URL given to worker pods; defaults to the operator's own ANTHROPIC_BASE_URL.",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS", "300", "sync.driftIntervalSeconds",
        "How often each Environment is re-read from the API to detect drift (jittered by up to 10%).",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_API_CONCURRENCY", "16", "sync.apiConcurrency",
        "Upper bound on concurrent Environments API calls made by the Environment controller.",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_METRICS_PORT", "9090", "metrics.port",
        "Port of the Prometheus metrics endpoint (0 disables it).",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_PEERING_PRIORITY", "0", "peering.priority",
        "kopf peering priority of this replica; the highest-priority live replica is active.",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_PEERING_NAME", "", "peering.name",
        "Name of the kopf peering object shared by replicas; empty disables peering (single replica).",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_POD_RELIST_SECONDS", "60", "sync.podRelistSeconds",
        "Seconds between lists of each WorkerPool's pods; they catch pods deleted while the pod watch was broken.",
    ),
    SettingSpec(
        "ENVIRONMENTS_OPERATOR_LOG_FORMAT", "plain", "logFormat",
        "Log format: plain or json.",
    ),
)

SETTING_NAMES: frozenset[str] = frozenset(s.env for s in SETTINGS)


@dataclass(frozen=True)
class OperatorSettings:
    api_key: str | None
    base_url: str | None
    worker_image: str
    worker_base_url: str | None
    drift_interval_seconds: float
    api_concurrency: int
    metrics_port: int
    peering_priority: int
    peering_name: str
    log_format: str
    pod_relist_seconds: float = 60.0

    def __repr__(self) -> str:  # never print the key
        return (
            f"OperatorSettings(api_key={'<set>' if self.api_key else None}, base_url={self.base_url!r}, "
            f"worker_image={self.worker_image!r}, drift_interval_seconds={self.drift_interval_seconds}, "
            f"api_concurrency={self.api_concurrency}, metrics_port={self.metrics_port})"
        )


class SettingsError(ValueError):
    """A variable holds a value that cannot be used; the message names the variable."""


def _get(environ: Mapping[str, str], name: str) -> str | None:
    spec = next(s for s in SETTINGS if s.env == name)
    value = environ.get(name)
    if value is None or value == "":
        return spec.default
    return value


def _number(environ: Mapping[str, str], name: str, kind: type[int] | type[float], minimum: float) -> float:
    raw = _get(environ, name)
    try:
        value = kind(raw) if raw is not None else kind(0)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be >= {minimum}")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    env = os.environ if environ is None else environ
    log_format = _get(env, "ENVIRONMENTS_OPERATOR_LOG_FORMAT") or "plain"
    if log_format not in ("plain", "json"):
        raise SettingsError(f"ENVIRONMENTS_OPERATOR_LOG_FORMAT={log_format!r} must be 'plain' or 'json'")
    base_url = _get(env, "ANTHROPIC_BASE_URL")
    return OperatorSettings(
        api_key=_get(env, "ANTHROPIC_API_KEY"),
        base_url=base_url,
        worker_image=_get(env, "ENVIRONMENTS_OPERATOR_WORKER_IMAGE") or "",
        worker_base_url=_get(env, "ENVIRONMENTS_OPERATOR_WORKER_BASE_URL") or base_url,
        drift_interval_seconds=float(_number(env, "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS", float, 1)),
        api_concurrency=int(_number(env, "ENVIRONMENTS_OPERATOR_API_CONCURRENCY", int, 1)),
        metrics_port=int(_number(env, "ENVIRONMENTS_OPERATOR_METRICS_PORT", int, 0)),
        peering_priority=int(_number(env, "ENVIRONMENTS_OPERATOR_PEERING_PRIORITY", int, -(2**31))),
        peering_name=_get(env, "ENVIRONMENTS_OPERATOR_PEERING_NAME") or "",
        log_format=log_format,
        pod_relist_seconds=float(_number(env, "ENVIRONMENTS_OPERATOR_POD_RELIST_SECONDS", float, 1)),
    )
