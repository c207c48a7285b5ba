"""A failed Environments API call, as both controllers see it, and the server's retry-after.

Pure: the adapters translate SDK exceptions into ``ApiFailure``; the controllers decide on it.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ApiFailure:
    """A failed API call: HTTP status (None: no response), the API's own message, its retry-after."""

    status: int | None
    message: str
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later: no answer, a timeout, a rate limit or a 5xx."""
        return self.status is None or self.status >= 500 or self.status in (408, 429)

    @property
    def outcome_unknown(self) -> bool:
        """Whether the request may have taken effect although it failed (no answer, or a 5xx)."""
        return self.status is None or self.status >= 500

    def describe(self) -> str:
        code = f"HTTP {self.status}" if self.status is not None else "no response"
        return f"{code}: {self.message}"


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if now is None or moment.tzinfo is None:
        return None
    return max(0.0, (moment - now).total_seconds())
