"""Kubernetes-style conditions: set one without disturbing ``lastTransitionTime`` when nothing changed.

Pure: works on the plain dicts kept in ``status.conditions`` and returns new lists; the caller writes them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from environments_operator.domain.common import ConditionStatus

ConditionDict = dict[str, Any]


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[ConditionDict] | None,
    *,
    type: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    observed_generation: int | None,
    now: datetime,
) -> list[ConditionDict]:
    """Conditions with ``type`` set; ``lastTransitionTime`` moves only when ``status`` changes."""
    current = list(conditions or [])
    previous = next((c for c in current if c.get("type") == type), None)
    transition = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime")
        else rfc3339(now)
    )
    updated: ConditionDict = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "observedGeneration": observed_generation,
    }
    return [updated if c.get("type") == type else c for c in current] if previous else [*current, updated]


def get_condition(conditions: list[ConditionDict] | None, type: str) -> ConditionDict | None:
    return next((c for c in conditions or [] if c.get("type") == type), None)
