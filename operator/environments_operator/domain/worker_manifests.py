"""Manifests for per-work-item dispatch: the worker Pod and its per-item Secret; warm pods and their assignment.

The worker pod contract (DESIGN.md) lives here in one place: the ``ANTHROPIC_*`` variables the SDK's
``EnvironmentWorker.handle_item()`` reads, the labels that tie a pod to its pool and work item, and
the restricted defaults every worker pod gets. Names are derived from a hash of the work ID, so a
second dispatch of the same item (after an operator crash) meets AlreadyExists instead of creating
a duplicate.

What goes into a per-item Secret is the work item's own ``secret`` payload (a sessions token scoped
to that one item), never the environment key: the builders here have no parameter that could carry
it. Pure: builds plain dicts, no I/O.

A warm pod (``spec.minWorkers``) is started before any item exists: it carries no work ID, and its
worker waits for its assignment, a Secret named after the pod that only the pod's own ServiceAccount
may get and watch (``build_warm_access``: a ServiceAccount, a Role for that one Secret, a
RoleBinding). Binding an item labels the pod (``bind_patch``); the per-item Secret is written as for
a fresh pod (it keeps the item's ``secret`` durable, and the warm pod cannot read it); the
assignment Secret (``build_assignment_secret``) is written only once the item is acknowledged.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from environments_operator.domain.common import API_VERSION
from environments_operator.domain.workerpool import KIND as WORKER_POOL_KIND

JSON = dict[str, Any]

LABEL_WORKER_POOL = "managedagents.dev/worker-pool"
LABEL_WORK_ID = "managedagents.dev/work-id"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# So that `kubectl get pods -l managedagents.dev/session-id=<id>` finds a session's sandbox. Session IDs
# are case-sensitive, as label values are.
LABEL_SESSION_ID = "managedagents.dev/session-id"
MANAGED_BY = "environments-operator"
# The exact IDs are also kept in annotations: a label value is capped at 63 characters, so an ID
# that does not fit is labelled with a hashed stand-in and read back from here.
ANNOTATION_WORK_ID = "managedagents.dev/work-id"
ANNOTATION_WORKER_POOL = "managedagents.dev/worker-pool"
ANNOTATION_SESSION_ID = "managedagents.dev/session-id"
# The environment whose queue the item came from: force-stops go there even after the pool's
# environmentId or environmentRef changed.
ANNOTATION_ENVIRONMENT_ID = "managedagents.dev/environment-id"
# Every worker pod is created behind this scheduling gate and released only once its item is
# acknowledged: no worker can start on an item it does not hold (DESIGN.md § "Dispatch must be exactly-once").
SCHEDULING_GATE = "managedagents.dev/work-acknowledged"
# Warm pods: the label that marks one from its start (bound or not), the annotation that says its
# assignment Secret was written (the warm pod's "gate" is open), and the hash of the pod template it
# was made from (a changed template refreshes idle warm pods).
LABEL_WARM = "managedagents.dev/warm"
ANNOTATION_ASSIGNED = "managedagents.dev/assigned"
ANNOTATION_TEMPLATE_HASH = "managedagents.dev/template-hash"
# The objects made for one warm pod (ServiceAccount, Role, RoleBinding, assignment Secret) carry its name.
LABEL_WARM_POD = "managedagents.dev/warm-pod"

WORK_SECRET_KEY = "work-secret"
WORKER_CONTAINER_NAME = "worker"
DEFAULT_WORKER_COMMAND = ("environments-operator", "worker")

ENV_WORK_ID = "ANTHROPIC_WORK_ID"
ENV_ENVIRONMENT_ID = "ANTHROPIC_ENVIRONMENT_ID"
ENV_SESSION_ID = "ANTHROPIC_SESSION_ID"
ENV_WORK_SECRET = "ANTHROPIC_WORK_SECRET"
ENV_BASE_URL = "ANTHROPIC_BASE_URL"
# The pool's spec.maxIdleSeconds, read by `environments-operator worker` (worker.MAX_IDLE_VARIABLE).
ENV_MAX_IDLE = "ENVIRONMENTS_OPERATOR_WORKER_MAX_IDLE_SECONDS"
# A warm pod's worker reads its assignment from this Secret (worker.ASSIGNMENT_VARIABLE).
ENV_ASSIGNMENT_SECRET = "ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET"
CONTRACT_ENV = (ENV_WORK_ID, ENV_ENVIRONMENT_ID, ENV_SESSION_ID, ENV_WORK_SECRET, ENV_BASE_URL, ENV_MAX_IDLE,
                ENV_ASSIGNMENT_SECRET)
# The keys of a warm pod's assignment Secret.
ASSIGNMENT_WORK_ID, ASSIGNMENT_ENVIRONMENT_ID, ASSIGNMENT_SESSION_ID, ASSIGNMENT_WORK_SECRET = (
    "work-id", "environment-id", "session-id", "work-secret")
WARM_POD_PREFIX_MAX = 40

# 80 bits of SHA-256: collisions among the items of one namespace are not a practical concern,
# and the name stays short enough to read in `kubectl get pods`.
_NAME_HASH_CHARS = 20
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_VALUE_MAX = 63


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def worker_pod_name(work_id: str) -> str:
    """The pod name of a work item: lowercase DNS-1123, a function of the (case-sensitive) work ID only.

    It does not include the pool name, so two pools of one namespace that serve the same
    environment still meet AlreadyExists for an item that moved from one to the other.
    """
    return f"work-{_digest(work_id, _NAME_HASH_CHARS)}"


def work_secret_name(work_id: str) -> str:
    """The name of the per-item Secret holding the work item's ``secret`` payload."""
    return f"{worker_pod_name(work_id)}-secret"


def label_value(text: str) -> str:
    """``text`` itself when it is a valid label value, else a stable hashed stand-in that is."""
    if len(text) <= _LABEL_VALUE_MAX and _LABEL_VALUE.match(text):
        return text
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:40].strip("-_.")
    return f"{prefix}-{_digest(text, 16)}" if prefix else f"h-{_digest(text, 16)}"


def pool_selector(pool_name: str) -> str:
    """Label selector for everything dispatched for one WorkerPool."""
    return f"{LABEL_WORKER_POOL}={label_value(pool_name)},{LABEL_MANAGED_BY}={MANAGED_BY}"


@dataclass(frozen=True)
class PoolIdentity:
    """The WorkerPool a dispatched object belongs to: owner reference and labels."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class WorkAssignment:
    """One claimed session work item, as a pod needs to know it. ``secret`` is hidden from repr."""

    work_id: str
    environment_id: str
    session_id: str
    secret: str = field(repr=False)


def _owner_reference(pool: PoolIdentity) -> JSON:
    return {
        "apiVersion": API_VERSION,
        "kind": WORKER_POOL_KIND,
        "name": pool.name,
        "uid": pool.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def contract_labels(pool: PoolIdentity, work_id: str) -> dict[str, str]:
    return {
        LABEL_WORKER_POOL: label_value(pool.name),
        LABEL_WORK_ID: label_value(work_id),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def _contract_metadata(name: str, pool: PoolIdentity, work: WorkAssignment, owner: JSON) -> JSON:
    return {
        "name": name,
        "namespace": pool.namespace,
        "labels": {**contract_labels(pool, work.work_id), LABEL_SESSION_ID: label_value(work.session_id)},
        "annotations": {
            ANNOTATION_WORK_ID: work.work_id,
            ANNOTATION_WORKER_POOL: pool.name,
            ANNOTATION_SESSION_ID: work.session_id,
            ANNOTATION_ENVIRONMENT_ID: work.environment_id,
        },
        "ownerReferences": [owner],
    }


def _pod_owner(pod_name: str, pod_uid: str) -> JSON:
    return {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid,
            "controller": True, "blockOwnerDeletion": False}


def build_work_secret(pool: PoolIdentity, work: WorkAssignment, *, pod_uid: str, pod_name: str | None = None) -> JSON:
    """The per-item Secret: the work item's ``secret`` payload under ``WORK_SECRET_KEY``, immutable.

    It belongs to its pod (owner reference), not to the pool: it goes when the pod goes, and exactly
    one pool's pod ever uses it. ``pool`` is the pool of that pod; ``pod_name`` that pod's name (a warm
    pod's; by default the item's fresh pod).
    """
    owner = _pod_owner(pod_name or worker_pod_name(work.work_id), pod_uid)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _contract_metadata(work_secret_name(work.work_id), pool, work, owner),
        "type": "Opaque",
        "immutable": True,
        "data": {WORK_SECRET_KEY: base64.b64encode(work.secret.encode("utf-8")).decode("ascii")},
    }


def _contract_env(work: WorkAssignment, base_url: str | None, max_idle_seconds: int) -> list[JSON]:
    env: list[JSON] = [
        {"name": ENV_WORK_ID, "value": work.work_id},
        {"name": ENV_ENVIRONMENT_ID, "value": work.environment_id},
        {"name": ENV_SESSION_ID, "value": work.session_id},
        {
            "name": ENV_WORK_SECRET,
            "valueFrom": {"secretKeyRef": {"name": work_secret_name(work.work_id), "key": WORK_SECRET_KEY}},
        },
    ]
    if base_url:
        env.append({"name": ENV_BASE_URL, "value": base_url})
    env.append({"name": ENV_MAX_IDLE, "value": str(max_idle_seconds)})
    return env


# Pod Security Standards "restricted" defaults; a template that sets any of these keeps its value.
_POD_SECURITY_DEFAULTS: JSON = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
_CONTAINER_SECURITY_DEFAULTS: JSON = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _with_defaults(given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> JSON:
    merged = dict(copy.deepcopy(dict(given or {})))
    for key, value in defaults.items():
        merged.setdefault(key, copy.deepcopy(value))
    return merged


def _worker_container_index(containers: list[JSON]) -> int:
    for index, container in enumerate(containers):
        if container.get("name") == WORKER_CONTAINER_NAME:
            return index
    return 0


def build_worker_pod(
    pool: PoolIdentity,
    work: WorkAssignment,
    *,
    template: Mapping[str, Any],
    default_image: str,
    base_url: str | None,
    max_idle_seconds: int,
) -> JSON:
    """The worker Pod of one work item: the pool's pod template with the contract laid over it.

    The contract wins over the template where they meet: the name, namespace, owner reference,
    the contract labels and env vars (on the worker container: the one named ``worker``, else the
    first), and ``restartPolicy: Never`` (a restarted worker would serve an item it no longer holds).
    Everything else is the template's, with defaults where it is silent: the operator's worker image
    and ``environments-operator worker`` (as ``args`` under the default image's tini entrypoint, else
    as the ``command``), no service account token, and the restricted
    security context on the pod and on every container. The pod is created behind ``SCHEDULING_GATE``
    (after any gates of the template); ``release_patch`` removes it once the item is acknowledged.
    """
    metadata = _contract_metadata(worker_pod_name(work.work_id), pool, work, _owner_reference(pool))
    pod = _pod_from_template(template, metadata, _contract_env(work, base_url, max_idle_seconds),
                             default_image=default_image)
    pod["spec"].setdefault("automountServiceAccountToken", False)
    pod["spec"]["schedulingGates"] = [*_other_gates(pod["spec"]), {"name": SCHEDULING_GATE}]
    return pod


def _pod_from_template(template: Mapping[str, Any], metadata: JSON, contract_env: list[JSON], *,
                       default_image: str) -> JSON:
    """The pool's pod template under ``metadata``, with the contract env and the restricted defaults laid over it."""
    template_metadata: Mapping[str, Any] = template.get("metadata") or {}
    spec: JSON = copy.deepcopy(dict(template.get("spec") or {}))
    metadata["labels"] = {**dict(template_metadata.get("labels") or {}), **metadata["labels"]}
    metadata["annotations"] = {**dict(template_metadata.get("annotations") or {}), **metadata["annotations"]}

    containers: list[JSON] = [dict(c) for c in spec.get("containers") or []]
    if not containers:
        containers = [{"name": WORKER_CONTAINER_NAME}]
    worker_index = _worker_container_index(containers)
    worker = containers[worker_index]
    worker.setdefault("name", WORKER_CONTAINER_NAME)
    if "command" not in worker:
        if "image" not in worker and "args" not in worker:
            # The operator's image starts everything under tini (signal forwarding, reaping the orphans
            # of the agent's bash tool); a `command` would bypass that entrypoint, `args` keeps it.
            worker["args"] = list(DEFAULT_WORKER_COMMAND)
        else:
            worker["command"] = list(DEFAULT_WORKER_COMMAND)
    worker.setdefault("image", default_image)
    user_env = [e for e in worker.get("env") or [] if e.get("name") not in CONTRACT_ENV]
    worker["env"] = [*user_env, *contract_env]
    containers[worker_index] = worker
    spec["containers"] = [
        {**c, "securityContext": _with_defaults(c.get("securityContext"), _CONTAINER_SECURITY_DEFAULTS)}
        for c in containers
    ]
    if spec.get("initContainers"):
        spec["initContainers"] = [
            {**c, "securityContext": _with_defaults(c.get("securityContext"), _CONTAINER_SECURITY_DEFAULTS)}
            for c in spec["initContainers"]
        ]
    spec["restartPolicy"] = "Never"
    spec["securityContext"] = _with_defaults(spec.get("securityContext"), _POD_SECURITY_DEFAULTS)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _other_gates(spec: Mapping[str, Any]) -> list[JSON]:
    return [dict(gate) for gate in spec.get("schedulingGates") or [] if gate.get("name") != SCHEDULING_GATE]


# Where an item runs, recorded in its metadata (``work.update``) once its pod is released.
PLACEMENT_NAMESPACE, PLACEMENT_POD, PLACEMENT_POOL = (
    "managedagents.dev/namespace", "managedagents.dev/pod", "managedagents.dev/worker-pool")


def placement_metadata(namespace: str, pod_name: str, pool_name: str) -> dict[str, str | None]:
    """The work item metadata that says where it runs: anyone reading the item through the API finds its sandbox."""
    return {PLACEMENT_NAMESPACE: namespace, PLACEMENT_POD: pod_name, PLACEMENT_POOL: pool_name}


def release_patch(gates: tuple[str, ...]) -> JSON:
    """The merge patch that removes our scheduling gate from a pod with ``gates`` and keeps every other
    (a merge patch replaces a list as a whole)."""
    others = [{"name": name} for name in gates if name != SCHEDULING_GATE]
    return {"spec": {"schedulingGates": others or None}}


# ----- warm pods ------------------------------------------------------------------------------------


def warm_pod_name(pool_name: str, suffix: str) -> str:
    """A warm pod's name (also its ServiceAccount's, Role's, RoleBinding's and assignment Secret's):
    the pool's name, cut to stay a valid DNS-1123 name, then ``-warm-`` and a random ``suffix``."""
    prefix = re.sub(r"[^a-z0-9-]", "-", pool_name.lower())[:WARM_POD_PREFIX_MAX].strip("-") or "pool"
    return f"{prefix}-warm-{suffix}"


def template_hash(template: Mapping[str, Any]) -> str:
    """A digest of the pod template: a warm pod made from another template is refreshed while idle."""
    import json

    return _digest(json.dumps(template, sort_keys=True, default=str), 16)


def warm_labels(pool: PoolIdentity, pod_name: str) -> dict[str, str]:
    """The labels of every object made for one warm pod (the pool's selector matches them all)."""
    return {LABEL_WORKER_POOL: label_value(pool.name), LABEL_MANAGED_BY: MANAGED_BY, LABEL_WARM_POD: pod_name}


def _warm_object_metadata(pool: PoolIdentity, pod_name: str) -> JSON:
    owner = {**_owner_reference(pool), "controller": False, "blockOwnerDeletion": False}
    return {"name": pod_name, "namespace": pool.namespace, "labels": warm_labels(pool, pod_name),
            "annotations": {ANNOTATION_WORKER_POOL: pool.name}, "ownerReferences": [owner]}


def build_warm_access(pool: PoolIdentity, pod_name: str) -> list[JSON]:
    """The ServiceAccount a warm pod runs as, and the Role and RoleBinding that let it get and watch
    one Secret: its own assignment, named after the pod. Nothing else: not its pod, not other Secrets.

    They belong to the pool (they exist before the pod, which a real apiserver refuses without its
    ServiceAccount); the operator deletes them with the pod.
    """
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": _warm_object_metadata(pool, pod_name)}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _warm_object_metadata(pool, pod_name),
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [pod_name],
                   "verbs": ["get", "watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _warm_object_metadata(pool, pod_name),
        "subjects": [{"kind": "ServiceAccount", "name": pod_name, "namespace": pool.namespace}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": pod_name},
    }
    return [service_account, role, binding]


def build_warm_pod(
    pool: PoolIdentity,
    pod_name: str,
    *,
    template: Mapping[str, Any],
    default_image: str,
    base_url: str | None,
    max_idle_seconds: int,
) -> JSON:
    """A warm worker Pod: the pool's template as for a fresh pod, with no work item yet.

    Its worker gets ``ENV_ASSIGNMENT_SECRET`` instead of the item's variables, runs as the pod's own
    ServiceAccount (``build_warm_access``) with its token mounted (the template's service account
    settings give way: the pod's token must be the one its Role is bound to), and has no scheduling
    gate: it starts now, and its assignment is what it waits for.
    """
    metadata = {
        "name": pod_name,
        "namespace": pool.namespace,
        "labels": {LABEL_WORKER_POOL: label_value(pool.name), LABEL_MANAGED_BY: MANAGED_BY, LABEL_WARM: "true"},
        "annotations": {ANNOTATION_WORKER_POOL: pool.name, ANNOTATION_TEMPLATE_HASH: template_hash(template)},
        "ownerReferences": [_owner_reference(pool)],
    }
    env: list[JSON] = [{"name": ENV_ASSIGNMENT_SECRET, "value": pod_name}]
    if base_url:
        env.append({"name": ENV_BASE_URL, "value": base_url})
    env.append({"name": ENV_MAX_IDLE, "value": str(max_idle_seconds)})
    pod = _pod_from_template(template, metadata, env, default_image=default_image)
    pod["spec"]["serviceAccountName"] = pod_name
    pod["spec"].pop("serviceAccount", None)
    pod["spec"]["automountServiceAccountToken"] = True
    return pod


def bind_patch(pool: PoolIdentity, work: WorkAssignment, *, resource_version: str | None = None) -> JSON:
    """The merge patch that binds a warm pod to an item: the per-item labels and annotations a fresh pod has.

    With ``resource_version`` the apiserver applies it only to the pod as it was then (else 409
    Conflict): a pod that another dispatch bound meanwhile is never bound twice.
    """
    metadata: JSON = {
        "labels": {LABEL_WORK_ID: label_value(work.work_id), LABEL_SESSION_ID: label_value(work.session_id)},
        "annotations": {ANNOTATION_WORK_ID: work.work_id, ANNOTATION_SESSION_ID: work.session_id,
                        ANNOTATION_ENVIRONMENT_ID: work.environment_id, ANNOTATION_WORKER_POOL: pool.name},
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"metadata": metadata}


def assigned_patch() -> JSON:
    """The merge patch that records on a bound warm pod that its assignment Secret is written."""
    return {"metadata": {"annotations": {ANNOTATION_ASSIGNED: "true"}}}


def build_assignment_secret(pool: PoolIdentity, work: WorkAssignment, *, pod_name: str, pod_uid: str) -> JSON:
    """A warm pod's assignment: what a fresh pod gets in its env, as one Secret the pod may get and watch.

    Written only after the item is acknowledged (it is the warm pod's scheduling gate); immutable, and
    owned by the pod.
    """
    metadata = _contract_metadata(pod_name, pool, work, _pod_owner(pod_name, pod_uid))
    metadata["labels"][LABEL_WARM_POD] = pod_name
    values = {ASSIGNMENT_WORK_ID: work.work_id, ASSIGNMENT_ENVIRONMENT_ID: work.environment_id,
              ASSIGNMENT_SESSION_ID: work.session_id, ASSIGNMENT_WORK_SECRET: work.secret}
    return {
        "apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "immutable": True,
        "data": {key: base64.b64encode(value.encode("utf-8")).decode("ascii") for key, value in values.items()},
    }
