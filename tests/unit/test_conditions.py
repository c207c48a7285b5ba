"""Condition bookkeeping: transitions move lastTransitionTime, repeats do not."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from environments_operator.domain.conditions import get_condition, set_condition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("first", "second", "expected_time"),
    [
        (("True", "Synced"), ("True", "Synced"), "2026-01-01T00:00:00Z"),
        (("True", "Synced"), ("True", "Updated"), "2026-01-01T00:00:00Z"),
        (("True", "Synced"), ("False", "ApiError"), "2026-01-02T00:00:00Z"),
        (("Unknown", "Pending"), ("True", "Synced"), "2026-01-02T00:00:00Z"),
    ],
)
def test_last_transition_time_moves_only_on_status_change(
    first: tuple[str, str], second: tuple[str, str], expected_time: str
) -> None:
    conditions = set_condition(None, type="Ready", status=first[0], reason=first[1],  # type: ignore[arg-type]
                               observed_generation=1, now=T0)
    conditions = set_condition(conditions, type="Ready", status=second[0], reason=second[1],  # type: ignore[arg-type]
                               observed_generation=2, now=T1)
    ready = get_condition(conditions, "Ready")
    assert ready is not None and len(conditions) == 1
    assert ready["lastTransitionTime"] == expected_time
    assert ready["reason"] == second[1] and ready["observedGeneration"] == 2


def test_other_conditions_are_kept_in_place() -> None:
    conditions = set_condition(None, type="Ready", status="True", reason="A", observed_generation=1, now=T0)
    conditions = set_condition(conditions, type="Synced", status="True", reason="B", observed_generation=1, now=T0)
    conditions = set_condition(conditions, type="Ready", status="False", reason="C", observed_generation=1, now=T1)
    assert [c["type"] for c in conditions] == ["Ready", "Synced"]
    assert get_condition(conditions, "Missing") is None
