"""The work-queue calls of one WorkerPool, through the official SDK, authenticated by the environment key.

``WorkQueue`` wraps ``AsyncAnthropic().beta.environments.work``: ``poll``, ``ack``, ``stop``,
``stats`` and ``list`` (as ``state``), the calls that take the environment key. Every failure
comes out as a ``WorkApiError`` naming the route and HTTP status (0 for a connection failure or
timeout), whether retrying can help, and any ``retry-after`` the server asked for; every call (each
attempt of a retried one) is counted in the ``api_requests`` metric, and every failure also in ``api_errors``.

Retries are narrow and per call, as in the SDK's own poller: ``ack`` and ``stop`` retry transient
failures a few times with their own attempt counter (both are safe to repeat); ``poll`` and
``stats`` never retry here, because the dispatch loop already decides when to poll again.

The environment key lives only inside the SDK client built here. Nothing in this module logs,
formats or returns it; the per-item ``secret`` a poll returns is handed on in ``ClaimedWork``, whose
repr hides it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from environments_operator import metrics
from environments_operator.adapters.api_errors import failure_of
from environments_operator.domain.vocabulary import backoff_seconds, parse_time
from environments_operator.domain.workerpool import QueueStatus, queue_status_from_stats

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

T = TypeVar("T")

# Each request ends well before kopf would consider the daemon stuck; a long-poll is under 1 s.
REQUEST_TIMEOUT_SECONDS = 30.0
# Ack and stop are idempotent on the server (a repeated ack of a started item, a stop of a stopped
# one); three tries ride out a blip, and a lost ack still ends well: the item is offered again after
# the reclaim window, meets its existing pod, and is acknowledged then.
CALL_ATTEMPTS = 3
# Never wait longer than this for a retry-after within one call; the dispatch loop backs off further.
MAX_RETRY_AFTER_SECONDS = 5.0
# ``state`` looks for an item among the newest this many pages of this many items.
STATE_SEARCH_PAGES, STATE_SEARCH_PAGE_SIZE = 20, 100
UNKNOWN_STATE = "unknown"


class WorkApiError(Exception):
    """A failed work-queue call. ``status`` is the HTTP status, 0 when no response arrived."""

    def __init__(self, route: str, status: int, message: str, *, retryable: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{route} failed ({status or 'no response'}): {message}")
        self.route = route
        self.status = status
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after

    @property
    def credential_rejected(self) -> bool:
        return self.status in (401, 403)


@dataclass(frozen=True)
class ClaimedWork:
    """A work item a poll returned (claimed, not yet acknowledged). ``secret`` is hidden from repr."""

    work_id: str
    environment_id: str
    work_type: str
    session_id: str | None
    secret: str | None = field(repr=False)
    created_at: datetime | None = None  # when the item was queued (the API's created_at)


def classify(route: str, exc: Exception) -> WorkApiError:
    """Turn an SDK or transport exception into a ``WorkApiError`` (and count it); re-raise anything else."""
    failure = failure_of(exc)
    if failure is None:
        raise exc
    status = failure.status or 0
    metrics.count_api_failure(route, status)
    return WorkApiError(route, status, failure.message, retryable=failure.retryable, retry_after=failure.retry_after)


class WorkQueue:
    """The work queue of one environment, as one pool's dispatcher uses it."""

    def __init__(self, *, environment_id: str, environment_key: str, base_url: str | None, worker_id: str) -> None:
        from anthropic import AsyncAnthropic, DefaultAioHttpClient

        self.environment_id = environment_id
        self.worker_id = worker_id
        # SDK 2.10 sends api_key as a Bearer token, exactly as the SDK's own poller sends the key. The
        # SDK's aiohttp transport costs half the CPU per request of its default one, and dispatch is a
        # stream of small requests; the operator's event loop is asyncio, which that transport needs.
        self._client: AsyncAnthropic = AsyncAnthropic(
            api_key=environment_key, base_url=base_url, max_retries=0, timeout=REQUEST_TIMEOUT_SECONDS,
            http_client=DefaultAioHttpClient(timeout=REQUEST_TIMEOUT_SECONDS),
        )
        self._work = self._client.beta.environments.work

    @staticmethod
    async def _call(route: str, call: Callable[[], Awaitable[T]]) -> T:
        """One request, counted; a failure comes out as a ``WorkApiError``."""
        try:
            result = await call()
        except Exception as exc:  # classify re-raises what is not an API or transport error
            raise classify(route, exc) from None
        metrics.count_api_success(route)
        return result

    async def close(self) -> None:
        await self._client.close()

    async def poll(self, *, block_ms: int, reclaim_older_than_ms: int) -> ClaimedWork | None:
        """One long-poll; the claimed item, or ``None`` when the queue stayed empty for ``block_ms``."""
        item = await self._call("work.poll", lambda: self._work.poll(
            self.environment_id,
            block_ms=block_ms,
            reclaim_older_than_ms=reclaim_older_than_ms,
            anthropic_worker_id=self.worker_id,
        ))
        if item is None:
            return None
        data = item.data
        return ClaimedWork(
            work_id=item.id,
            environment_id=item.environment_id,
            work_type=str(getattr(data, "type", "") or ""),
            session_id=getattr(data, "id", None),
            secret=item.secret,
            created_at=parse_time(item.created_at),
        )

    async def _with_retries(self, route: str, call: Callable[[], Awaitable[object]]) -> object:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._call(route, call)
            except WorkApiError as error:
                if not error.retryable or attempt >= CALL_ATTEMPTS:
                    raise error from None
                wait = max(backoff_seconds(attempt, base=0.1, cap=1.0), error.retry_after or 0.0)
                await asyncio.sleep(min(wait, MAX_RETRY_AFTER_SECONDS))

    async def ack(self, work_id: str) -> None:
        """Acknowledge a claimed item (queued → starting). Raises ``WorkApiError`` when it could not."""
        await self._with_retries(
            "work.ack", lambda: self._work.ack(work_id, environment_id=self.environment_id)
        )

    async def stop(self, work_id: str, *, force: bool = True) -> bool:
        """Stop an item; ``False`` when it was already stopped (409) or is gone (404)."""
        try:
            await self._with_retries(
                "work.stop", lambda: self._work.stop(work_id, environment_id=self.environment_id, force=force)
            )
        except WorkApiError as error:
            if error.status in (404, 409):
                return False
            raise
        return True

    async def state(self, work_id: str) -> str | None:
        """The item's state (``queued``, ``starting``, ...); None if the environment has no such item, and
        ``UNKNOWN_STATE`` if it is not among the newest ``STATE_SEARCH_PAGES`` pages.

        ``work.retrieve`` takes an API key, which a pool does not have; ``work.list`` takes the environment
        key and lists the newest items first, and the items asked about are recent ones.
        """
        from anthropic import omit

        page: str | None = None
        for _ in range(STATE_SEARCH_PAGES):
            listed = await self._call("work.list", functools.partial(
                self._work.list, self.environment_id, limit=STATE_SEARCH_PAGE_SIZE, page=page if page else omit))
            for item in listed.data:
                if item.id == work_id:
                    return str(item.state)
            page = listed.next_page
            if not page:
                return None
        return UNKNOWN_STATE

    async def update_metadata(self, work_id: str, metadata: dict[str, str | None]) -> None:
        """Merge ``metadata`` into the item's (``work.update``; this call takes an API key, not the environment key)."""
        await self._with_retries("work.update", lambda: self._work.update(
            work_id, environment_id=self.environment_id, metadata=metadata))

    async def stats(self) -> QueueStatus:
        stats = await self._call("work.stats", lambda: self._work.stats(self.environment_id))
        return queue_status_from_stats(stats.model_dump())
