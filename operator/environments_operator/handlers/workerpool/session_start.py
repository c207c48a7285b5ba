"""The session start clock: from the claim of a work item to its worker pod's first Running phase.

The item dispatcher records the claim time of each item whose pod it is about to release (before the
release: a gated pod cannot start, so the pod's Running can never be seen before its claim is known).
The pod index sees every change of every worker pod, and reports each view here: the first view in
phase Running observes ``environments_operator_session_start_seconds`` once and forgets the claim; a
pod seen finished or deleting first (it ended before it ran, or ran unseen) forgets it unobserved.

It owns the claim times, process-wide like the metric it feeds, keyed by (namespace, pool, work id),
in the event loop's clock. It is memory only: an item claimed by an operator process that died is not
observed by the next one. Claims whose pod is never seen running are forgotten after
``FORGET_AFTER_SECONDS`` or when their pool is deleted, and at most ``MAX_CLAIMS`` are kept.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from environments_operator import metrics
from environments_operator.domain.dispatch import PHASE_RUNNING, WorkerPodView

# A pod that has not run an hour after its claim has long timed out (startupTimeoutSeconds).
FORGET_AFTER_SECONDS = 3600.0
MAX_CLAIMS = 10_000

Key = tuple[str, str, str]


class SessionStartClock:
    """Claim times of items whose worker pod has not been seen Running yet."""

    def __init__(self) -> None:
        self._claims: OrderedDict[Key, float] = OrderedDict()  # oldest claim first

    def __len__(self) -> int:
        return len(self._claims)

    def claimed(self, namespace: str, pool: str, work_id: str, claimed_at: float) -> None:
        """The item's pod is about to be released; ``claimed_at`` is its claim in loop time."""
        self._claims[(namespace, pool, work_id)] = claimed_at
        self._claims.move_to_end((namespace, pool, work_id))
        now = asyncio.get_running_loop().time()
        while self._claims:
            oldest_key, oldest_at = next(iter(self._claims.items()))
            if len(self._claims) <= MAX_CLAIMS and now - oldest_at <= FORGET_AFTER_SECONDS:
                break
            del self._claims[oldest_key]

    def saw(self, view: WorkerPodView) -> None:
        """A view of a worker pod from the pod index: observe its first Running."""
        key = (view.namespace, view.pool, view.work_id)
        if key not in self._claims:
            return
        if view.phase == PHASE_RUNNING:
            claimed_at = self._claims.pop(key)
            metrics.SESSION_START.labels(namespace=view.namespace, pool=view.pool).observe(
                max(0.0, asyncio.get_running_loop().time() - claimed_at))
        elif view.finished or view.deleting:
            del self._claims[key]

    def forget_pool(self, namespace: str, pool: str) -> None:
        for key in [key for key in self._claims if key[:2] == (namespace, pool)]:
            del self._claims[key]


SESSION_STARTS = SessionStartClock()
