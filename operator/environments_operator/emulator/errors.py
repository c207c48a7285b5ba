"""Errors of the emulator in the Anthropic API's shape.

Every failure the emulator reports, whether a bad request, a state conflict or an injected fault, is
an ``ApiError`` rendered as ``{"type": "error", "error": {"type": ..., "message": ...}}``, optionally
with ``error.details`` (where the SDK reads ``error_code``). This module only builds errors; it may
not touch emulator state or aiohttp requests.
"""

from __future__ import annotations

from typing import Any

# The error ``type`` the real API uses for each status, so the SDK maps responses to the same
# exception classes it would against the real service.
ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    412: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    if status in ERROR_TYPE_BY_STATUS:
        return ERROR_TYPE_BY_STATUS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """A failure to report to the client as an Anthropic-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.details = details
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"type": "error", "error": error}


def invalid_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str, *, error_code: str | None = None) -> ApiError:
    details = {"error_code": error_code} if error_code else None
    return ApiError(404, message, details=details)


def conflict(message: str) -> ApiError:
    # A state conflict never resolves by retrying the same request, but the SDK retries 409 by
    # default; ``x-should-retry: false`` tells it not to, as the real API does for such conflicts.
    return ApiError(409, message, headers={"x-should-retry": "false"})


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)
