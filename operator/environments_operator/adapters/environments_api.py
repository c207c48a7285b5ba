"""The Environments API, as used by the Environment controller, through the official ``anthropic`` SDK.

``EnvironmentsApiPool`` keeps one ``AsyncAnthropic`` client per API key (keyed by a fingerprint, never
by the key itself, and bounded), and one semaphore shared by all of them: the operator's whole budget
of concurrent API calls (``ENVIRONMENTS_OPERATOR_API_CONCURRENCY``), so that 500 resources syncing at
once queue here instead of flooding the API. ``EnvironmentsApi`` is one key's view of
``client.beta.environments``: it returns ``RemoteEnvironment`` and raises ``ApiCallError`` carrying the
domain's ``ApiFailure`` (status, the API's own message, retry-after).

The SDK's own retries are off (``max_retries=0``): a create request is not idempotent, so a blind
retry after a timeout could create a second environment; the controller retries instead, after
looking for the first one, and waits out backoffs without holding a slot of the semaphore.

Every call is counted in the ``api_requests`` metric (route ``environments.<method>``), every failure also
in ``api_errors``. This module makes no decisions and never logs: a key, a request body or a response could all carry
something that must not reach a log.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from anthropic import AsyncAnthropic

from environments_operator import metrics
from environments_operator.adapters.api_errors import failure_of
from environments_operator.domain.api_failure import ApiFailure
from environments_operator.domain.environment_sync import RemoteEnvironment, find_own, page_ends_lookup

T = TypeVar("T")

# Long enough for a loaded API, short enough that a hung connection does not pin a handler for minutes.
REQUEST_TIMEOUT_SECONDS = 30.0
# The most a list page may hold; fewer pages for the UID lookup.
LIST_PAGE_LIMIT = 100
# Distinct API keys (Secrets) are few in practice; beyond this the least recently used client closes.
MAX_CLIENTS = 64


class ApiCallError(Exception):
    """A failed Environments API call; ``failure`` says how (never the key or the request body)."""

    def __init__(self, failure: ApiFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def _remote(environment: Any) -> RemoteEnvironment:
    return RemoteEnvironment.from_api(environment.model_dump(mode="json"))


class EnvironmentsApi:
    """One API key's calls to ``client.beta.environments``, each within the shared concurrency limit."""

    def __init__(self, client: AsyncAnthropic, limit: asyncio.Semaphore) -> None:
        self._environments = client.beta.environments
        self._limit = limit

    async def _call(self, route: str, call: Callable[[], Awaitable[T]]) -> T:
        async with self._limit:
            try:
                result = await call()
            except Exception as exc:
                failure = failure_of(exc)
                if failure is None:
                    raise
                metrics.count_api_failure(route, failure.status or 0)
                raise ApiCallError(failure) from None
        metrics.count_api_success(route)
        return result

    async def create(self, params: dict[str, Any]) -> RemoteEnvironment:
        return _remote(await self._call("environments.create", lambda: self._environments.create(**params)))

    async def retrieve(self, environment_id: str) -> RemoteEnvironment:
        return _remote(await self._call("environments.retrieve", lambda: self._environments.retrieve(environment_id)))

    async def update(self, environment_id: str, params: dict[str, Any]) -> RemoteEnvironment:
        return _remote(await self._call("environments.update",
                                        lambda: self._environments.update(environment_id, **params)))

    async def archive(self, environment_id: str) -> RemoteEnvironment:
        return _remote(await self._call("environments.archive", lambda: self._environments.archive(environment_id)))

    async def delete(self, environment_id: str) -> None:
        await self._call("environments.delete", lambda: self._environments.delete(environment_id))

    async def find_by_uid(self, uid: str, *, window_start: datetime | None) -> RemoteEnvironment | None:
        """The environment stamped with the resource ``uid``, archived ones included; pages newest first
        and stops at the first page that reaches back before ``window_start``."""
        page = await self._call("environments.list",
                                lambda: self._environments.list(include_archived=True, limit=LIST_PAGE_LIMIT))
        while True:
            environments = [_remote(environment) for environment in page.data]
            found = find_own(environments, uid)
            if found is not None:
                return found
            if page_ends_lookup(environments, window_start) or not page.has_next_page():
                return None
            page = await self._call("environments.list", page.get_next_page)


class EnvironmentsApiPool:
    """SDK clients per API key, all sharing one limit on concurrent calls."""

    def __init__(self, *, base_url: str | None, concurrency: int, timeout: float = REQUEST_TIMEOUT_SECONDS,
                 max_clients: int = MAX_CLIENTS) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._max_clients = max_clients
        self._limit = asyncio.Semaphore(concurrency)
        self._clients: OrderedDict[str, AsyncAnthropic] = OrderedDict()
        self._retired: list[AsyncAnthropic] = []

    def for_key(self, api_key: str) -> EnvironmentsApi:
        fingerprint = hashlib.sha256(api_key.encode()).hexdigest()
        client = self._clients.get(fingerprint)
        if client is None:
            client = AsyncAnthropic(
                api_key=api_key, base_url=self._base_url, max_retries=0, timeout=self._timeout
            )
            self._clients[fingerprint] = client
            if len(self._clients) > self._max_clients:
                # Closed later, not now: a call in flight may still be using it.
                self._retired.append(self._clients.popitem(last=False)[1])
        else:
            self._clients.move_to_end(fingerprint)
        return EnvironmentsApi(client, self._limit)

    async def close(self) -> None:
        clients = [*self._clients.values(), *self._retired]
        self._clients.clear()
        self._retired.clear()
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
