"""The pool's access to its work queue: the environment it serves, its key, and the ``WorkQueue`` client.

It owns the environment id, the client, when the key was last read, and the backoff of failed key
reads. The environment key is read into the ``WorkQueue`` client and nowhere else: it is never logged,
never put in an Event, a status, a pod or a Secret.

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

    def reread_key(self) -> None:
        """The API rejected the key: read it again on the next pass."""
        self._key_read_at = None

    async def resolve(self, spec: WorkerPoolSpec, now: float) -> Blocker | None:
        """The environment from the index (no API call) and its key from the Secret (read when needed)."""
        ctx = self.ctx
        resolved = dispatch.resolve_environment(spec, ctx.namespace, self.environments)
        if isinstance(resolved, Blocker):
            return resolved
        self.environment_id = resolved
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
        if self.queue is not None:
            await self.queue.close()
        self.queue = WorkQueue(environment_id=environment_id, environment_key=key, base_url=self.ctx.settings.base_url,
                               worker_id=f"environments-operator/{self.ctx.namespace}/{self.ctx.name}")
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
