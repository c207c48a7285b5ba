"""The words both controllers share: a ``Problem``, a ``Backoff``, one backoff curve, timestamps, validation errors.

Each is defined once here, so that an Environment and a WorkerPool report, wait and parse alike. Pure:
no I/O, no clock (callers pass ``now``), no state beyond the immutable values themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from pydantic import ValidationError

# 2**30 times any base is past every cap in use; stopping there keeps the float finite after any streak.
MAX_BACKOFF_EXPONENT = 30


@dataclass(frozen=True)
class Problem:
    """Why something cannot proceed: a CamelCase ``reason`` (a condition reason) and a message naming the cause."""

    reason: str
    message: str


def backoff_seconds(failures: int, *, base: float = 0.5, cap: float = 30.0, jitter: float | None = None) -> float:
    """Exponential backoff after the ``failures``-th failure in a row (1 for the first): base, 2*base, ... cap.

    The defaults are the work queue's poll backoff; every other caller names its own base and cap.
    ``jitter`` (a random number in [0, 1) the caller draws) spreads the pause over its upper half, so
    that clients which failed together do not retry in lockstep.
    """
    exponent = min(max(0, failures - 1), MAX_BACKOFF_EXPONENT)
    pause = float(min(cap, base * 2**exponent))
    return pause if jitter is None else pause * (0.5 + 0.5 * jitter)


@dataclass(frozen=True)
class Backoff:
    """A run of failures of one kind: how many in a row, until when to wait, and what to report (if anything)."""

    attempts: int = 0
    paused_until: float = 0.0
    problem: Problem | None = None

    def failed(self, *, pause_until: float, problem: Problem | None) -> Backoff:
        """One more failure; the pause only ever grows, and ``problem`` None keeps the one reported."""
        return Backoff(attempts=self.attempts + 1, paused_until=max(self.paused_until, pause_until),
                       problem=problem if problem is not None else self.problem)

    def paused_at_least_until(self, until: float) -> Backoff:
        """A pause that is not a counted failure (e.g. after a bug)."""
        return replace(self, paused_until=max(self.paused_until, until))

    def succeeded(self) -> Backoff:
        """The run is over. A pause another failure set meanwhile still holds."""
        return Backoff(paused_until=self.paused_until)

    @property
    def failing(self) -> bool:
        return self.attempts > 0 or self.problem is not None


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def validation_message(error: ValidationError) -> str:
    """A pydantic validation error of a spec as one part per field: ``spec.config.type: <reason>``."""
    parts = []
    for item in error.errors():
        path = ".".join(str(part) for part in ("spec", *item.get("loc", ())))
        parts.append(f"{path}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)
