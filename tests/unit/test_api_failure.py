"""Which API failures are worth retrying, and which may have taken effect although they failed."""

from __future__ import annotations

import pytest

from environments_operator.domain.api_failure import ApiFailure


@pytest.mark.parametrize(
    ("status", "retryable", "outcome_unknown"),
    [
        (None, True, True),    # no answer: maybe done, maybe not
        (400, False, False),
        (401, False, False),
        (403, False, False),
        (404, False, False),
        (408, True, False),
        (409, False, False),
        (412, False, False),
        (429, True, False),
        (500, True, True),
        (503, True, True),
        (529, True, True),
    ],
)
def test_retryable_and_outcome(status: int | None, retryable: bool, outcome_unknown: bool) -> None:
    failure = ApiFailure(status, "m")
    assert failure.retryable is retryable
    assert failure.outcome_unknown is outcome_unknown
