"""The Kubernetes API, as used by the controllers: Pods, Secrets and warm pods' RBAC objects, in plain dicts.

Built on the synchronous ``kubernetes`` client, called through a bounded thread pool so that no call
ever blocks kopf's event loop (every pool's dispatch shares it). Responses are read raw
(``_preload_content=False``) and returned as dicts: the controllers work on manifests, not on the
client's model classes, and skipping the model round trip keeps dispatch fast.

The configuration is loaded the way kopf's default login loads it (in-cluster, else the current
kubeconfig), so the operator and its own calls always talk to the same apiserver.

Every call has a connect and a read timeout, and every connection TCP keepalive: one hung call (a slow
admission webhook, a connection a load balancer dropped without a word) fails within
``READ_TIMEOUT_SECONDS`` instead of holding a thread of the shared pool, and its dispatch, for minutes.

This module does no decision making: it creates, reads, lists and deletes what it is told to.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

JSON = dict[str, Any]
T = TypeVar("T")

# Enough threads to keep pipelined dispatch busy without letting one burst open hundreds of sockets.
DEFAULT_MAX_THREADS = 16
# An admission webhook may take up to 30 s (its maximum timeoutSeconds); nothing we call takes longer.
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 35.0
MERGE_PATCH = "application/merge-patch+json"
# The kinds the controllers write (a warm pod's ServiceAccount, Role and RoleBinding among them), as the
# client library names them in its method names.
_KIND_NAMES = {"Pod": "pod", "Secret": "secret", "ServiceAccount": "service_account", "Role": "role",
               "RoleBinding": "role_binding"}


class KubeApiError(Exception):
    """A refused Kubernetes API call; ``status`` and ``reason`` are the apiserver's."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        # status 0: no answer (connection refused or dropped, or the read timed out)
        super().__init__(f"{status or 'no response'} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class SecretKeyError(Exception):
    """A referenced Secret or key is missing or unusable; the message names it (never its value)."""


def load_configuration() -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # The client library reads KUBECONFIG once, at import; read it now, as kubectl would.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return configuration


def _error(exc: ApiException) -> KubeApiError:
    reason, message = str(exc.reason or ""), ""
    try:
        body = json.loads(exc.body or "{}")
        reason = body.get("reason") or reason
        message = body.get("message") or ""
    except (TypeError, ValueError):
        message = str(exc.body or "")[:200]
    return KubeApiError(int(exc.status or 0), reason, message)


class KubeClient:
    def __init__(self, configuration: kubernetes.client.Configuration | None = None,
                 max_threads: int = DEFAULT_MAX_THREADS) -> None:
        configuration = configuration or load_configuration()
        configuration.connection_pool_maxsize = max_threads
        configuration.keep_alive = True  # client-go's keepalive timings
        self._api = kubernetes.client.ApiClient(configuration)
        self._core = kubernetes.client.CoreV1Api(self._api)
        self._rbac = kubernetes.client.RbacAuthorizationV1Api(self._api)
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="kube")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    def _method(self, verb: str, kind: str) -> Callable[..., Any]:
        if kind not in _KIND_NAMES:
            raise ValueError(f"unsupported kind {kind!r}")
        api = self._rbac if kind in ("Role", "RoleBinding") else self._core
        method: Callable[..., Any] = getattr(api, f"{verb}_namespaced_{_KIND_NAMES[kind]}")
        return method

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def raw() -> Any:
            try:
                response = fn(*args, _preload_content=False,
                              _request_timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS), **kwargs)
            except ApiException as exc:
                raise _error(exc) from None
            except urllib3.exceptions.HTTPError as exc:  # timeouts, refused or dropped connections
                raise KubeApiError(0, type(exc).__name__, str(exc)[:200]) from None
            data = response.data
            return json.loads(data) if data else None

        return await asyncio.get_running_loop().run_in_executor(self._executor, raw)

    async def create(self, kind: str, namespace: str, body: JSON) -> JSON | None:
        """Create a Pod or Secret and return it as stored; None if one of that name already exists (409)."""
        try:
            created: JSON = await self._call(self._method("create", kind), namespace, body)
        except KubeApiError as exc:
            if exc.status == 409:
                return None
            raise
        return created

    async def get(self, kind: str, namespace: str, name: str) -> JSON | None:
        """A Pod or Secret; None if there is none of that name."""
        try:
            found: JSON = await self._call(self._method("read", kind), name, namespace)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: JSON) -> JSON:
        """JSON-merge-patch a Pod or Secret (no resourceVersion: the patch says exactly what changes)."""
        patched: JSON = await self._call(self._method("patch", kind), name, namespace, patch, _content_type=MERGE_PATCH)
        return patched

    async def delete_if_present(self, kind: str, namespace: str, name: str, *, uid: str | None = None,
                                grace_period_seconds: int | None = None) -> bool:
        """Delete a Pod or Secret; False if it was already gone.

        ``uid`` deletes only that object (a 409 when the name now belongs to another one, which counts as
        gone); ``grace_period_seconds=0`` is a force delete, which removes a pod its kubelet never confirms.
        """
        options: JSON = {}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        try:
            await self._call(self._method("delete", kind), name, namespace, body=options or None)
        except KubeApiError as exc:
            if exc.status == 404 or (exc.status == 409 and uid is not None):
                return False
            raise
        return True

    async def list(self, kind: str, namespace: str, label_selector: str) -> list[JSON]:
        list_ = self._method("list", kind)
        result = await self._call(list_, namespace, label_selector=label_selector)
        return list(result.get("items") or [])

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """The decoded value of one key of a Secret. Raises ``SecretKeyError`` naming what is missing."""
        try:
            secret = await self._call(self._core.read_namespaced_secret, name, namespace)
        except KubeApiError as exc:
            if exc.status == 404:
                raise SecretKeyError(f"Secret {namespace}/{name} not found") from None
            if exc.status == 403:
                raise SecretKeyError(f"Secret {namespace}/{name} is not readable by the operator (403)") from None
            raise
        data = secret.get("data") or {}
        string_data = secret.get("stringData") or {}
        if key in data:
            try:
                value = base64.b64decode(data[key], validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise SecretKeyError(f"Secret {namespace}/{name} key {key!r} is not valid base64 UTF-8") from None
        elif key in string_data:  # only seen on servers that do not fold stringData into data
            value = str(string_data[key])
        else:
            raise SecretKeyError(f"Secret {namespace}/{name} has no key {key!r}")
        value = value.strip()
        if not value:
            raise SecretKeyError(f"Secret {namespace}/{name} key {key!r} is empty")
        return value

    async def patch_custom_status(self, group: str, version: str, plural: str, namespace: str, name: str,
                                  status: JSON) -> None:
        """Merge-patch the status subresource of a custom object (no resourceVersion: never a 409)."""
        api = kubernetes.client.CustomObjectsApi(self._api)
        await self._call(api.patch_namespaced_custom_object_status, group, version, namespace, plural, name,
                         {"status": status}, _content_type="application/merge-patch+json")
