"""A warm worker's assignment: the in-cluster API client, and the wait for its one Secret.

A warm pod starts before any work item exists. Its worker container gets
``ENVIRONMENTS_OPERATOR_ASSIGNMENT_SECRET`` (the pod's own name) instead of the four per-item
``ANTHROPIC_*`` variables, and runs under a ServiceAccount whose Role allows only ``get`` and ``watch``
on that one Secret. The operator creates the Secret (type Opaque) in the pod's namespace once it has
acknowledged the item it binds to the pod, with four data keys: ``work-id``, ``environment-id``,
``session-id`` and ``work-secret``.

This module owns:

- the in-cluster configuration (``KUBERNETES_SERVICE_HOST``/``PORT``, the service account's ``token``,
  ``ca.crt`` and ``namespace`` files), read the way the official clients read it; the token file is
  re-read for every request, because kubelets rotate projected tokens;
- reading the Secret (``parse_assignment``): its four keys become the four ``ANTHROPIC_*`` variables;
- the wait (``wait_for_assignment``): one plain GET (404 means not yet), then one long-lived watch on
  the Secret's name, and on each end of a watch without it (timeout, 410 Gone, a dropped connection,
  a 5xx) a short backoff, a GET and a new watch. Never a list: the Role does not allow it.

Anything that waiting will not fix raises ``AssignmentError``, which the worker turns into its contract
exit code 2: no in-cluster configuration, 401/403 from the API (a ServiceAccount or Role problem), a
Secret without one of the four keys. Never logs or prints a value of the Secret, nor the token.

Only ``httpx`` (a core dependency) and the standard library: the worker must not need the kubernetes
client library, and this module is imported before the SDK, while the pod waits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Secret data key -> the variable the SDK's EnvironmentWorker.handle_item() reads.
ASSIGNMENT_KEYS: dict[str, str] = {
    "work-id": "ANTHROPIC_WORK_ID",
    "environment-id": "ANTHROPIC_ENVIRONMENT_ID",
    "session-id": "ANTHROPIC_SESSION_ID",
    "work-secret": "ANTHROPIC_WORK_SECRET",
}
# How long one watch may stay open (the apiserver may end it sooner); the client's read timeout is a
# little longer, so a healthy idle watch ends by the server's timeout, not ours.
WATCH_TIMEOUT_SECONDS = 300
READ_MARGIN_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
# Backoff between reconnections: short (a warm pod is waiting to be fast), doubling while failing.
BACKOFF_INITIAL_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 2.0
# A watch that stayed open this long was healthy: the next failure starts the backoff afresh.
HEALTHY_WATCH_SECONDS = 10.0

log = logging.getLogger("environments_operator.worker")


class AssignmentError(Exception):
    """The warm pod's contract is broken in a way that waiting will not fix (the worker exits 2)."""


@dataclass(frozen=True)
class InClusterConfig:
    """Where the API is and how this pod authenticates to it (the pod's ServiceAccount)."""

    base_url: str
    namespace: str
    token_path: Path
    ca_path: Path

    def token(self) -> str:
        """The current token, read afresh: kubelets rotate the projected token file."""
        try:
            token = self.token_path.read_text().strip()
        except OSError as exc:
            raise AssignmentError(f"cannot read the service account token {self.token_path}: {exc.strerror}") from None
        if not token:
            raise AssignmentError(f"the service account token {self.token_path} is empty")
        return token

    def ssl_context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=str(self.ca_path))
        except (OSError, ssl.SSLError) as exc:
            raise AssignmentError(f"cannot load the cluster CA {self.ca_path}: {exc}") from None


def in_cluster_config(environ: Mapping[str, str], directory: Path = SERVICE_ACCOUNT_DIR) -> InClusterConfig:
    """The in-cluster configuration, as every pod with a mounted service account token has it.

    Raises ``AssignmentError`` naming what is missing.
    """
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        missing = [name for name, value in (("KUBERNETES_SERVICE_HOST", host), ("KUBERNETES_SERVICE_PORT", port))
                   if not value]
        raise AssignmentError(
            f"no in-cluster configuration: {' and '.join(missing)} not set "
            "(a warm worker reads its assignment from the Kubernetes API)"
        )
    token_path, ca_path, namespace_path = directory / "token", directory / "ca.crt", directory / "namespace"
    for path in (token_path, ca_path, namespace_path):
        if not path.is_file():
            raise AssignmentError(
                f"no in-cluster configuration: {path} does not exist "
                "(mount the pod's service account token: automountServiceAccountToken)"
            )
    namespace = namespace_path.read_text().strip()
    if not namespace:
        raise AssignmentError(f"no in-cluster configuration: {namespace_path} is empty")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return InClusterConfig(f"https://{host}:{port}", namespace, token_path, ca_path)


def parse_assignment(secret: Mapping[str, Any], name: str) -> dict[str, str]:
    """The four ``ANTHROPIC_*`` variables from the assignment Secret's ``data`` (base64, as always).

    Raises ``AssignmentError`` naming the first key that is missing, empty or not decodable; never
    includes a value.
    """
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise AssignmentError(f"assignment Secret {name}: its data is not a mapping")
    assignment: dict[str, str] = {}
    for key, variable in ASSIGNMENT_KEYS.items():
        raw = data.get(key)
        if not raw:
            raise AssignmentError(f"assignment Secret {name}: data key {key!r} is missing or empty")
        try:
            value = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, TypeError, ValueError):
            raise AssignmentError(f"assignment Secret {name}: data key {key!r} is not base64 of UTF-8 text") from None
        if not value.strip():
            raise AssignmentError(f"assignment Secret {name}: data key {key!r} is empty")
        assignment[variable] = value.strip()
    return assignment


class _Retry(Exception):
    """A transient end of a request or watch: back off, GET again, watch again."""


class AssignmentWaiter:
    """Waits for one Secret with a GET, then a watch, resumed until the Secret is there."""

    def __init__(
        self,
        config: InClusterConfig,
        name: str,
        *,
        watch_timeout_seconds: int = WATCH_TIMEOUT_SECONDS,
        backoff_initial: float = BACKOFF_INITIAL_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
    ) -> None:
        self.config, self.name = config, name
        self.watch_timeout_seconds = watch_timeout_seconds
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.secret_path = f"/api/v1/namespaces/{config.namespace}/secrets/{name}"
        self.collection_path = f"/api/v1/namespaces/{config.namespace}/secrets"
        # A proxy from the pod's environment has no business between a pod and its own apiserver.
        self.client = httpx.AsyncClient(
            base_url=config.base_url, verify=config.ssl_context(), trust_env=False,
            timeout=httpx.Timeout(CONNECT_TIMEOUT_SECONDS, read=watch_timeout_seconds + READ_MARGIN_SECONDS),
        )
        self._failing = False

    async def __aenter__(self) -> AssignmentWaiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    @property
    def label(self) -> str:
        return f"{self.config.namespace}/{self.name}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.token()}", "Accept": "application/json"}

    def _check(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise AssignmentError(
                f"the Kubernetes API answered {response.status_code} for assignment Secret {self.label}: "
                "the pod's ServiceAccount must be allowed to get and watch it (its Role and RoleBinding)"
            )
        if response.status_code != 200:
            raise _Retry(f"HTTP {response.status_code}")

    async def get(self) -> dict[str, Any] | None:
        """The Secret, or None while it does not exist (404)."""
        try:
            response = await self.client.get(self.secret_path, headers=self._headers())
        except httpx.HTTPError as exc:
            raise _Retry(f"GET failed: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        self._check(response)
        try:
            return self._object(response.json())
        except ValueError:
            raise _Retry("GET answered something that is not JSON") from None

    async def watch(self) -> dict[str, Any] | None:
        """One watch: the Secret once it is ADDED or MODIFIED, or None when the watch ended without it."""
        params = {
            "watch": "true",
            "fieldSelector": f"metadata.name={self.name}",
            "timeoutSeconds": str(self.watch_timeout_seconds),
        }
        try:
            async with self.client.stream("GET", self.collection_path, params=params,
                                          headers=self._headers()) as response:
                self._check(response)
                self._failing = False
                async for line in response.aiter_lines():
                    found = self._event(line)
                    if found is not None:
                        return found
        except httpx.HTTPError as exc:
            raise _Retry(f"watch failed: {type(exc).__name__}") from None
        return None

    def _event(self, line: str) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            event = json.loads(line)
            kind, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError):
            raise _Retry("the watch sent a line that is not an event") from None
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code in (401, 403):
                raise AssignmentError(
                    f"the Kubernetes API answered {code} for assignment Secret {self.label} in a watch: "
                    "the pod's ServiceAccount must be allowed to get and watch it (its Role and RoleBinding)"
                )
            raise _Retry(f"the watch ended with an ERROR event ({code})")  # 410 Gone, usually
        if kind in ("ADDED", "MODIFIED"):
            return self._object(obj)
        return None  # DELETED (not ours yet after all), BOOKMARK

    def _object(self, obj: Any) -> dict[str, Any] | None:
        if not isinstance(obj, dict) or (obj.get("metadata") or {}).get("name") != self.name:
            return None  # the field selector makes this impossible; be sure
        return obj

    async def wait(self) -> dict[str, str]:
        """The assignment's four variables, once the Secret exists (forever, until it does)."""
        delay = self.backoff_initial
        while True:
            started = time.monotonic()
            try:
                secret = await self.get()
                if secret is None:
                    secret = await self.watch()
                if secret is not None:
                    return parse_assignment(secret, self.label)
                log.debug("warm: the watch on %s ended; watching again", self.label)
            except _Retry as exc:
                # The first failure of a run of them is a warning; the rest would only repeat it.
                level = logging.DEBUG if self._failing else logging.WARNING
                log.log(level, "warm: reading assignment Secret %s: %s; retrying", self.label, exc)
                self._failing = True
            if time.monotonic() - started >= HEALTHY_WATCH_SECONDS:
                delay = self.backoff_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)


async def wait_for_assignment(config: InClusterConfig, name: str, **options: Any) -> dict[str, str]:
    """Wait for the assignment Secret ``name``; returns the four ``ANTHROPIC_*`` variables.

    ``options`` go to ``AssignmentWaiter`` (the watch timeout and the backoff). Raises ``AssignmentError``
    for a broken contract; waits forever otherwise (cancel it to stop).
    """
    async with AssignmentWaiter(config, name, **options) as waiter:
        log.info("warm: waiting for assignment Secret %s", waiter.label)
        return await waiter.wait()
