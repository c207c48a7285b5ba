"""The pool's access to its work queue: the environment it serves, its key, and the ``WorkQueue`` client.

It owns the environment id, the client, when the key was last read, and the backoff of failed key
reads. The environment key is read into the ``WorkQueue`` client and nowhere else: it is never logged,
never put in an Event, a status, a pod or a Secret.

It also keeps the clients the pool no longer polls with, as long as something needs them: a client
replaced by a key rotation until the dispatches that hold it end, and the client of an environment
the pool served before its ``environmentId``/``environmentRef`` changed, while pods of that
environment remain or stops are owed there. A pod whose environment has no client left (after a
restart) is stopped through the operator's API key, if it has one.

It may not poll, dispatch or write status; when it replaces the client it asks its caller (the loop)
to stop the pollers first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from environments_operator.adapters.kube import KubeApiError, KubeClient, SecretKeyError
from environments_operator.adapters.work_api import WorkQueue
from environments_operator.domain import dispatch
from environments_operator.domain.dispatch import ENVIRONMENT_KEY_UNAVAILABLE, Blocker
from environments_operator.domain.pool_loop import KEY_BACKOFF_BASE_SECONDS, KEY_BACKOFF_CAP_SECONDS
from environments_operator.domain.vocabulary import Backoff, backoff_seconds
from environments_operator.domain.workerpool import WorkerPoolSpec
from environments_operator.handlers.workerpool.context import PoolContext

# The key is re-read at once when the API rejects it; this catches a rotation the API still accepts.
KEY_REFRESH_SECONDS = 300.0


class QueueAccess:
    """Resolves the environment and its key, and keeps one ``WorkQueue`` client for them."""

    def __init__(self, ctx: PoolContext, *, environments: dispatch.EnvironmentIndex,
                 before_replacing: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.environments = environments
        self.before_replacing = before_replacing
        self.environment_id: str | None = None
        self.queue: WorkQueue | None = None
        self._queue_credentials: tuple[str, str] | None = None  # (environment id, key); never logged
        self._key_read_at: float | None = None
        self.key_backoff = Backoff()  # of failed key reads; paused_until is when the Secret is read again
        self.retired: dict[str, WorkQueue] = {}  # environment id -> a client of an environment no longer served
        self.draining: list[WorkQueue] = []  # replaced clients of the current environment, until unused
        self._api_key_queue: WorkQueue | None = None

    def api_key_queue(self) -> WorkQueue | None:
        """A client of the current environment authenticated by the operator's API key (None without one):
        ``work.update`` takes an API key, not the environment key."""
        api_key, environment_id = self.ctx.settings.api_key, self.environment_id
        if not api_key or environment_id is None:
            return None
        if self._api_key_queue is None or self._api_key_queue.environment_id != environment_id:
            if self._api_key_queue is not None:
                self.draining.append(self._api_key_queue)
            self._api_key_queue = self._client(environment_id, api_key)
        return self._api_key_queue

    def queue_for(self, environment_id: str | None) -> WorkQueue | None:
        """The client that reaches the queue of ``environment_id`` (None: the one served now)."""
        if environment_id is None or (self.queue is not None and self.queue.environment_id == environment_id):
            return self.queue
        retired = self.retired.get(environment_id)
        if retired is None and self.ctx.settings.api_key:
            retired = self.retired[environment_id] = self._client(environment_id, self.ctx.settings.api_key)
        return retired

    async def close_unused(self, *, in_use: set[int], environments_needed: set[str]) -> None:
        """Close retired clients that no dispatch holds (``in_use``: their ``id()``) and no pod or stop needs."""
        for queue in [q for q in self.draining if id(q) not in in_use]:
            self.draining.remove(queue)
            await queue.close()
        for environment_id, queue in list(self.retired.items()):
            if environment_id not in environments_needed and id(queue) not in in_use:
                del self.retired[environment_id]
                await queue.close()

    async def close(self) -> None:
        for queue in [*self.draining, *self.retired.values(), *(q for q in (self.queue, self._api_key_queue) if q)]:
            await queue.close()
        self.draining, self.retired, self.queue, self._api_key_queue = [], {}, None, None

    def _client(self, environment_id: str, key: str) -> WorkQueue:
        return WorkQueue(environment_id=environment_id, environment_key=key, base_url=self.ctx.settings.base_url,
                         worker_id=f"environments-operator/{self.ctx.namespace}/{self.ctx.name}")

    def reread_key(self) -> None:
        """The API rejected the key: read it again on the next pass."""
        self._key_read_at = None

    async def resolve(self, spec: WorkerPoolSpec, now: float) -> Blocker | None:
        """The environment from the index (no API call) and its key from the Secret (read when needed)."""
        ctx = self.ctx
        resolved = dispatch.resolve_environment(spec, ctx.namespace, self.environments)
        if isinstance(resolved, Blocker):
            # Say no environment rather than a stale one; the client stays, for the pods it dispatched.
            self.environment_id = ctx.environment_id = None
            return resolved
        self.environment_id = ctx.environment_id = resolved
        key_is_current = (
            self.queue is not None and self._queue_credentials is not None
            and self._queue_credentials[0] == resolved
            and self._key_read_at is not None and now - self._key_read_at < KEY_REFRESH_SECONDS
        )
        if key_is_current:
            return None
        if self.key_backoff.problem is not None and now < self.key_backoff.paused_until:
            return self.key_backoff.problem
        key = await read_environment_key(ctx.kube, ctx.namespace, spec)
        if isinstance(key, Blocker):
            pause = backoff_seconds(self.key_backoff.attempts + 1, base=KEY_BACKOFF_BASE_SECONDS,
                                    cap=KEY_BACKOFF_CAP_SECONDS)
            self.key_backoff = self.key_backoff.failed(pause_until=now + pause, problem=key)
            return key
        self.key_backoff = self.key_backoff.succeeded()
        self._key_read_at = now
        if self._queue_credentials != (resolved, key):
            await self._replace_queue(resolved, key)
        return None

    async def _replace_queue(self, environment_id: str, key: str) -> None:
        await self.before_replacing()
        old = self.queue
        if old is not None:
            if old.environment_id == environment_id:
                self.draining.append(old)
            else:
                previous = self.retired.pop(old.environment_id, None)
                if previous is not None:
                    self.draining.append(previous)
                self.retired[old.environment_id] = old
        stale = self.retired.pop(environment_id, None)  # served again: the new client takes over
        if stale is not None:
            self.draining.append(stale)
        self.queue = self._client(environment_id, key)
        self._queue_credentials = (environment_id, key)


async def read_environment_key(kube: KubeClient, namespace: str, spec: WorkerPoolSpec) -> str | Blocker:
    """The environment key from ``environmentKeySecretRef``, or why it cannot be read (never the key itself)."""
    ref = spec.environmentKeySecretRef
    try:
        return await kube.read_secret_key(namespace, ref.name, ref.key)
    except (SecretKeyError, KubeApiError) as exc:
        detail = str(exc) if isinstance(exc, SecretKeyError) else (
            f"reading Secret {namespace}/{ref.name} failed: {exc.status} {exc.reason}")
        return Blocker(ENVIRONMENT_KEY_UNAVAILABLE, f"environmentKeySecretRef: {detail}")
