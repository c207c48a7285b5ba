"""What the Environment controller keeps between handler calls: the shared runtime, and each object's state.

It owns the API client pool, this instance's identity, the settings and the count of Environments by
their Ready condition (``EnvironmentsRuntime``, one per operator), and per object the drift schedule, the
lock and the status overlay (``ObjectState``). It may not call the API nor write status.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from environments_operator import metrics
from environments_operator.adapters.environments_api import EnvironmentsApiPool
from environments_operator.domain import environment_sync as sync


class ReadyTally:
    """The ``environments`` metric: Environments by namespace and the status and reason of their stored
    Ready condition, kept from the resources' watch events (one entry per resource uid)."""

    def __init__(self) -> None:
        self._labels: dict[str, tuple[str, str, str]] = {}  # uid -> (namespace, ready, reason)
        self._counts: dict[tuple[str, str, str], int] = {}

    def saw(self, uid: str, namespace: str, status: Any) -> None:
        labels = (namespace, *sync.ready_summary(status if isinstance(status, dict) else None))
        if self._labels.get(uid) == labels:
            return
        self.gone(uid)
        self._labels[uid] = labels
        self._counts[labels] = self._counts.get(labels, 0) + 1
        metrics.ENVIRONMENTS.labels(*labels).set(self._counts[labels])

    def gone(self, uid: str) -> None:
        labels = self._labels.pop(uid, None)
        if labels is None:
            return
        self._counts[labels] -= 1
        if self._counts[labels]:
            metrics.ENVIRONMENTS.labels(*labels).set(self._counts[labels])
        else:
            del self._counts[labels]
            metrics.ENVIRONMENTS.remove(*labels)  # no series stays behind for a reason nobody has

    def clear(self) -> None:
        """This operator stops serving: it reports no Environments any more."""
        for uid in list(self._labels):
            self.gone(uid)


@dataclass
class EnvironmentsRuntime:
    """What all Environment handlers share: API clients, this instance's identity, the settings, the tally."""

    pool: EnvironmentsApiPool
    instance_id: str
    default_api_key: str | None
    drift_interval_seconds: float
    ready_tally: ReadyTally = field(default_factory=ReadyTally)


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

