"""The shared vocabulary: one backoff curve, the ``Backoff`` value, ``parse_time``, the validation message."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ValidationError

from environments_operator.domain.vocabulary import Backoff, Problem, backoff_seconds, parse_time, validation_message

BROKEN = Problem("Broken", "it broke")


@pytest.mark.parametrize(("failures", "base", "cap", "seconds"), [
    (1, 1.0, 60.0, 1.0),
    (2, 1.0, 60.0, 2.0),
    (7, 1.0, 60.0, 60.0),
    (0, 1.0, 60.0, 1.0),  # no failure yet counts as the first
    (10_000, 0.5, 30.0, 30.0),  # a long streak stays finite
])
def test_backoff_seconds_doubles_from_base_to_cap(failures: int, base: float, cap: float, seconds: float) -> None:
    assert backoff_seconds(failures, base=base, cap=cap) == seconds


@pytest.mark.parametrize(("start", "step", "expected"), [
    pytest.param(Backoff(), lambda b: b.failed(pause_until=5.0, problem=BROKEN),
                 Backoff(1, 5.0, BROKEN), id="first failure"),
    pytest.param(Backoff(1, 9.0, BROKEN), lambda b: b.failed(pause_until=5.0, problem=None),
                 Backoff(2, 9.0, BROKEN), id="the pause only grows; no new problem keeps the old"),
    pytest.param(Backoff(2, 9.0, BROKEN), lambda b: b.succeeded(),
                 Backoff(0, 9.0, None), id="success ends the run, a pending pause holds"),
    pytest.param(Backoff(), lambda b: b.paused_at_least_until(3.0),
                 Backoff(0, 3.0, None), id="a pause that is not a failure"),
])
def test_backoff_transitions(start: Backoff, step: object, expected: Backoff) -> None:
    assert step(start) == expected  # type: ignore[operator]


@pytest.mark.parametrize(("backoff", "failing"), [
    (Backoff(), False), (Backoff(1), True), (Backoff(problem=BROKEN), True), (Backoff(paused_until=5.0), False),
])
def test_backoff_failing(backoff: Backoff, failing: bool) -> None:
    assert backoff.failing is failing


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-05-01T12:00:00Z", datetime(2026, 5, 1, 12, tzinfo=UTC)),
    ("2026-05-01T12:00:00+00:00", datetime(2026, 5, 1, 12, tzinfo=UTC)),
    ("", None), (None, None), ("yesterday", None), (17, None),
])
def test_parse_time(value: object, expected: datetime | None) -> None:
    assert parse_time(value) == expected


class _Spec(BaseModel):
    replicas: int


def test_validation_message_names_each_field() -> None:
    with pytest.raises(ValidationError) as caught:
        _Spec.model_validate({"replicas": "many"})
    assert validation_message(caught.value).startswith("spec.replicas: ")
