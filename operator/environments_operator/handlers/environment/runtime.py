"""What the Environment controller keeps between handler calls: the shared runtime, and each object's state.

It owns the API client pool, this instance's identity and the settings (``EnvironmentsRuntime``, one per
operator), and per object the drift schedule, the lock and the status overlay (``ObjectState``). It may
not call the API nor write status.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from environments_operator.adapters.environments_api import EnvironmentsApiPool
from environments_operator.domain import environment_sync as sync


@dataclass
class EnvironmentsRuntime:
    """What all Environment handlers share: API clients, this instance's identity, the settings."""

    pool: EnvironmentsApiPool
    instance_id: str
    default_api_key: str | None
    drift_interval_seconds: float


@dataclass
class ObjectState:
    """What one operator instance remembers about one Environment between handler calls."""

    schedule: sync.DriftSchedule
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    foreign_claim_seen: bool = False  # our claim replaced another instance's: it may have created one
    outcome_unknown: bool = False  # our last create request got no definite answer
    status_overlay: dict[str, Any] = field(default_factory=dict)
    complaints: set[str] = field(default_factory=set)


def utcnow() -> datetime:
    return datetime.now(UTC)


def runtime_of(memo: kopf.Memo) -> EnvironmentsRuntime:
    runtime: EnvironmentsRuntime = memo["environments"]
    return runtime


def object_state(memo: kopf.Memo) -> ObjectState:
    # kopf gives each object a shallow copy of the operator memo, so this key is per object.
    state: ObjectState | None = memo.get("environment_state")
    if state is None:
        state = ObjectState(schedule=sync.DriftSchedule(fraction=random.random(), first_seen=utcnow()))  # noqa: S311
        memo["environment_state"] = state
    return state

