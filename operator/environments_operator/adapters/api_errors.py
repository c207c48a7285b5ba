"""SDK exceptions translated into the domain's ``ApiFailure``: one translation for both controllers.

What this module may not do: log, or put anything into a failure but the status, the API's own error
message and the retry-after it asked for (never a key, a request body or a work secret).
"""

from __future__ import annotations

from datetime import UTC, datetime

import anthropic
import httpx2

from environments_operator.domain.api_failure import ApiFailure, parse_retry_after

# The API's messages are short; a proxy's HTML error page is not, and a condition should stay readable.
MAX_MESSAGE_CHARS = 500


def failure_of(exc: BaseException) -> ApiFailure | None:
    """The domain's view of a failed call, or None when ``exc`` is no API or transport error (a bug)."""
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error")
        message = (error.get("message") if isinstance(error, dict) else None) or exc.message
        retry_after = parse_retry_after(dict(exc.response.headers), now=datetime.now(UTC))
        return ApiFailure(status=exc.status_code, message=str(message)[:MAX_MESSAGE_CHARS], retry_after=retry_after)
    if isinstance(exc, anthropic.APITimeoutError):
        return ApiFailure(status=None, message="the request timed out")
    if isinstance(exc, anthropic.APIConnectionError | httpx2.HTTPError):
        return ApiFailure(status=None, message="could not connect to the Environments API")
    if isinstance(exc, anthropic.APIError):
        return ApiFailure(status=None, message=type(exc).__name__)
    return None
