"""Spec and status models of the ``WorkerPool`` custom resource, and the queue stats read into status. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from environments_operator.domain.common import (
    Condition,
    LocalObjectReference,
    SecretKeyReference,
    SpecModel,
    StatusModel,
    cel,
)
from environments_operator.domain.vocabulary import parse_time

KIND = "WorkerPool"
PLURAL = "workerpools"

# One value today. The field stays so that manifests naming it keep working, and so that another way of
# serving a queue can be added later without a new field; the schema accepts no value that is refused.
PoolMode = Literal["PerWorkItem"]

# The API refuses block_ms outside 1..999 (0 is not "non-blocking"; omit the parameter for that).
BLOCK_MS_MIN, BLOCK_MS_MAX = 1, 999


# The floor of poll.reclaimOlderThanMs: well above a pod create and an ack on a healthy cluster.
RECLAIM_MS_MIN = 1000


class PollSettings(SpecModel):
    model_config = SpecModel.model_config | {
        "json_schema_extra": cel({
            "rule": f"!has(self.blockMs) || (self.blockMs >= {BLOCK_MS_MIN} && self.blockMs <= {BLOCK_MS_MAX})",
            "message": f"blockMs must be between {BLOCK_MS_MIN} and {BLOCK_MS_MAX}",
        })
    }

    blockMs: int = Field(
        default=900, ge=BLOCK_MS_MIN, le=BLOCK_MS_MAX,
        description="Long-poll duration of each work poll, in milliseconds (1..999).",
    )
    reclaimOlderThanMs: int = Field(
        default=5000, ge=RECLAIM_MS_MIN, le=3_600_000,
        description=("An item claimed but not acknowledged for this long is offered again (milliseconds). "
                     f"At least {RECLAIM_MS_MIN}: a shorter window re-offers items whose dispatch is still "
                     "creating their pod."),
    )


# An idle warm pod older than this is replaced. An hour bounds how stale an idle sandbox gets (an image
# tag that moved, a node drained of its caches, a token the worker read long ago) for the price of
# minWorkers pod starts an hour, which is noise next to the sessions it serves.
DEFAULT_WARM_MAX_AGE_SECONDS = 3600

# The SDK's own default (anthropic.lib.environments.DEFAULT_MAX_IDLE): a follow-up message within a minute
# reuses the sandbox, at the cost of a pod slot held for that minute.
DEFAULT_MAX_IDLE_SECONDS = 60


class WorkerPoolSpec(SpecModel):
    model_config = SpecModel.model_config | {
        "json_schema_extra": cel(
            {
                "rule": "has(self.environmentRef) != has(self.environmentId)",
                "message": "exactly one of environmentRef and environmentId must be set",
            },
            {
                "rule": "!has(self.minWorkers) || !has(self.maxWorkers) || self.minWorkers <= self.maxWorkers",
                "message": "minWorkers must be less than or equal to maxWorkers",
            },
        )
    }

    environmentRef: LocalObjectReference | None = Field(
        default=None, description="A self_hosted Environment in the same namespace whose queue this pool serves."
    )
    environmentId: str | None = Field(
        default=None, pattern=r"^env_[A-Za-z0-9]+$",
        description="ID of a self_hosted environment (env_...), instead of environmentRef.",
    )
    environmentKeySecretRef: SecretKeyReference = Field(
        description="Secret key holding the environment key used to poll and acknowledge work. "
        "It never reaches worker pods."
    )
    mode: PoolMode = Field(
        default="PerWorkItem",
        description="PerWorkItem: every work item gets a fresh pod that serves it and exits (a warm pod counts "
        "as fresh: it has served nothing). The only mode.",
    )
    minWorkers: int = Field(
        default=0, ge=0, le=10_000,
        description="Warm workers: this many pods are kept started and idle, each bound to the next claimed "
        "item (a session starts without waiting for a pod to schedule and start), then replaced. Each "
        "serves one item and exits, like any worker pod, and counts against maxWorkers. Each runs as a "
        "ServiceAccount of its own that may read only its assignment. Must not exceed maxWorkers.")
    warmMaxAgeSeconds: int = Field(
        default=DEFAULT_WARM_MAX_AGE_SECONDS, ge=0, le=604_800,
        description="An idle warm pod older than this is replaced by a new one (0: never). A warm pod made from "
        "an older pod template is replaced at once while idle.")
    maxWorkers: int = Field(default=10, ge=1, le=10_000, description="Upper bound on unfinished worker pods.")
    template: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="PodTemplateSpec for worker pods; the operator adds the contract env vars, labels and a "
        "restricted security context.",
    )
    startupTimeoutSeconds: int = Field(
        default=300, ge=1, le=86_400,
        description="A worker pod still Pending after this long is deleted and its item force-stopped.",
    )
    ttlSecondsAfterFinished: int = Field(
        default=300, ge=0, le=604_800,
        description="Finished worker pods and their Secrets are deleted this long after they finish.",
    )
    maxIdleSeconds: int = Field(
        default=DEFAULT_MAX_IDLE_SECONDS, ge=0, le=86_400,
        description="How long a worker stays attached after its session's turn ends, so that a follow-up "
        "message within that time is served by the same sandbox without a new work item; the pod holds its "
        "slot of maxWorkers meanwhile. 0 ends the pod as soon as the turn ends. Default 60, the SDK's.",
    )
    suspend: bool = Field(
        default=False,
        description="true: claim no new work item (the queue keeps them); running sessions and their pods are "
        "left alone, and Ready is False with reason Suspended. false again: the queue is picked up. Deleting a "
        "suspended pool still force-stops its running sessions.",
    )
    poll: PollSettings = Field(
        default_factory=PollSettings,
        # An object default lets the apiserver fill in blockMs and reclaimOlderThanMs when poll is omitted.
        json_schema_extra={"default": {}},
        description="Work queue polling settings.",
    )

    @model_validator(mode="after")
    def _invariants(self) -> WorkerPoolSpec:
        if (self.environmentRef is None) == (self.environmentId is None):
            raise ValueError("exactly one of environmentRef and environmentId must be set")
        if self.minWorkers > self.maxWorkers:
            raise ValueError("minWorkers must be less than or equal to maxWorkers")
        return self


class QueueStatus(StatusModel):
    depth: int | None = Field(default=None, description="Items waiting in the queue.")
    pending: int | None = Field(default=None, description="Items claimed but not yet acknowledged.")
    oldestQueuedAt: datetime | None = Field(default=None, description="Enqueue time of the oldest waiting item.")
    workersPolling: int | None = Field(default=None, description="Distinct workers seen polling in the last 30s.")


class WorkerCounts(StatusModel):
    warm: int = Field(default=0, description="Warm pods running and bound to no item yet (minWorkers).")
    starting: int = Field(default=0, description="Worker pods not yet running (warm pods still starting included).")
    running: int = Field(default=0, description="Worker pods running.")
    succeeded: int = Field(default=0, description="Worker pods that finished successfully (until cleaned up).")
    failed: int = Field(default=0, description="Worker pods that failed (until cleaned up).")


class WorkerPoolStatus(StatusModel):
    environmentId: str | None = Field(default=None, description="Resolved environment ID.")
    observedGeneration: int | None = Field(default=None, description="The .metadata.generation last acted on.")
    queue: QueueStatus | None = Field(default=None, description="Queue statistics from the API.")
    workers: WorkerCounts | None = Field(default=None, description="Worker pods by phase.")
    desiredWorkers: int | None = Field(default=None, description="min(maxWorkers, active + depth).")
    lastDispatchTime: datetime | None = Field(default=None, description="When an item was last dispatched.")
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, AtCapacity and DispatchFailing conditions."
    )


def queue_status_from_stats(stats: Mapping[str, Any]) -> QueueStatus:
    """The API's queue stats (snake_case) as the status's ``queue`` block."""
    return QueueStatus(
        depth=stats.get("depth"),
        pending=stats.get("pending"),
        oldestQueuedAt=parse_time(stats.get("oldest_queued_at")),
        workersPolling=stats.get("workers_polling"),
    )
