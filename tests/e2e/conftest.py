"""Shared fixtures of the end-to-end tests: the real operator (kopf on the fake apiserver) and the emulator.

Environment controller (``environment_world``): the Environment CRD installed with its schema (so every
write is pruned and validated as a real apiserver would), the emulator on a free port reached through
its real HTTP API, and the shipped operator (``environments_operator.handlers`` on kopf's default
registry) configured only through environment variables, as in production. At teardown it checks that
every stored Environment is storable as is, and that no API key reached a log line or an Event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from aiohttp import web
from anthropic import AsyncAnthropic

import environments_operator.handlers  # noqa: F401  (registers the operator's handlers on kopf's default registry)
from environments_operator.devcluster.kube import (
    DEFAULT_RESOURCES,
    ENVIRONMENTS,
    EVENTS,
    PODS,
    SECRETS,
    WORKERPOOLS,
    Kube,
)
from environments_operator.devcluster.kubelet import Kubelet
from environments_operator.devcluster.process_kubelet import ProcessKubelet
from environments_operator.emulator.server import EmulatorServer
from environments_operator.handlers.startup import apply_kopf_settings
from tests.harness.emulator import (
    API_KEY,
    SelfHostedEnvironment,
    api_client,
    enqueue_sessions,
    self_hosted_environment,
)
from tests.harness.operator import OperatorRunner, run_operator

ROOT = Path(__file__).resolve().parents[2]
ENVIRONMENTS_CRD: dict[str, Any] = yaml.safe_load((ROOT / "crds" / "environments.managedagents.dev.yaml").read_text())
NAMESPACE = "ns"
# A second key the emulator accepts: the one a test puts into a Secret for spec.apiKeySecretRef.
SECRET_API_KEY = "sk-ant-api03-secret-ref-test-key"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this directory is an end-to-end test: ``pytest -m e2e`` runs just them."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


def object_events(kube: Kube, namespace: str, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of every Event about the object ``name``."""
    return [(e.get("type", ""), e.get("reason", ""), e.get("message", ""))
            for e in kube.list(EVENTS, namespace)
            if (e.get("involvedObject") or {}).get("name") == name]


async def wait_for_event(kube: Kube, namespace: str, name: str, reason: str,
                         timeout: float = 10.0) -> tuple[str, str, str]:
    found = await kube.wait_until(
        lambda: next((e for e in object_events(kube, namespace, name) if e[1] == reason), None),
        timeout=timeout,
        message=lambda: f"event {reason} for {name}; seen: {object_events(kube, namespace, name)}")
    assert found is not None
    return found


@dataclass
class ApiRequest:
    method: str
    path: str
    body: Any
    credential: str = field(repr=False)  # the key it was sent with: compared in tests, never printed
    at: float = 0.0  # loop time of arrival
    status: int | None = None  # the emulator's answer, once sent


def record_requests(emulator: EmulatorServer) -> list[ApiRequest]:
    """Record every ``/v1/`` request the emulator receives, and its status (call before it starts serving)."""
    requests: list[ApiRequest] = []

    @web.middleware
    async def recorder(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        raw = await request.content.read()
        with warnings.catch_warnings():  # deprecated, but the one public way to put a body back
            warnings.simplefilter("ignore", DeprecationWarning)
            request.content.unread_data(raw)
        credential = request.headers.get("x-api-key") or request.headers.get("authorization", "")
        record = ApiRequest(request.method, request.path, json.loads(raw) if raw else None,
                            credential.removeprefix("Bearer "), asyncio.get_running_loop().time())
        requests.append(record)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        record.status = response.status
        return response

    emulator.app.middlewares.insert(0, recorder)
    return requests


@dataclass
class EnvironmentWorld:
    """The fake apiserver, the emulator and the running operator of one test, and shortcuts over them."""

    kube: Kube
    emulator: EmulatorServer
    operator: OperatorRunner
    requests: list[ApiRequest]
    secrets: list[str] = field(default_factory=lambda: [API_KEY, SECRET_API_KEY])
    namespace: str = NAMESPACE

    # --- resources --------------------------------------------------------------------------------------

    def create(self, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if annotations:
            metadata["annotations"] = annotations
        return self.kube.create(ENVIRONMENTS, {"apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
                                                "metadata": metadata, "spec": spec}, namespace=self.namespace)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.kube.get(ENVIRONMENTS, name, self.namespace)

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.kube.patch(ENVIRONMENTS, name, patch, self.namespace)

    def delete(self, name: str) -> dict[str, Any]:
        return self.kube.delete(ENVIRONMENTS, name, self.namespace)

    def create_secret(self, name: str, key: str, value: str) -> None:
        self.kube.create(SECRETS, {"metadata": {"name": name, "namespace": self.namespace},
                                   "data": {key: base64.b64encode(value.encode()).decode()}},
                         namespace=self.namespace)

    async def wait_condition(self, name: str, type_: str, status: str, reason: str | None = None, *,
                             generation: int | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The resource once its condition ``type_`` has ``status`` (and ``reason``, and was computed from
        ``generation``)."""
        def matches(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            condition = next((c for c in (obj.get("status") or {}).get("conditions") or []
                              if c.get("type") == type_), None)
            return condition is not None and condition.get("status") == status \
                and reason in (None, condition.get("reason")) \
                and generation in (None, condition.get("observedGeneration"))
        found = await self.kube.wait_for(ENVIRONMENTS, name, matches, self.namespace, timeout=timeout)
        assert found is not None
        return found

    async def wait_ready(self, name: str, reason: str | None = None, **kwargs: Any) -> dict[str, Any]:
        return await self.wait_condition(name, "Ready", "True", reason, **kwargs)

    async def wait_gone(self, name: str, timeout: float = 10.0) -> None:
        await self.kube.wait_for(ENVIRONMENTS, name, lambda o: o is None, self.namespace, timeout=timeout)

    # --- the remote side --------------------------------------------------------------------------------

    def api(self) -> AsyncAnthropic:
        """An SDK client for out-of-band changes, through the emulator's real HTTP API."""
        return api_client(self.emulator)

    def remote(self, environment_id: str) -> dict[str, Any] | None:
        environment = self.emulator.state.environments.get(environment_id)
        return environment.to_api() if environment is not None else None

    def remote_for(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Every remote environment stamped with the resource's UID."""
        uid = obj["metadata"]["uid"]
        return [e.to_api() for e in self.emulator.state.environments.values()
                if e.metadata.get("managedagents.dev/resource-uid") == uid]

    def calls(self, method: str, path_suffix: str = "/v1/environments") -> list[ApiRequest]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    def events(self, name: str) -> list[tuple[str, str, str]]:
        return object_events(self.kube, self.namespace, name)

    async def wait_event(self, name: str, reason: str, timeout: float = 10.0) -> tuple[str, str, str]:
        return await wait_for_event(self.kube, self.namespace, name, reason, timeout)

    async def fault(self, *rules: dict[str, Any]) -> None:
        """Inject faults through the emulator's own HTTP route, as an operator of the emulator would."""
        async with self.api() as client:
            await client.post("/_emulator/faults", body={"faults": list(rules)}, cast_to=object)

    def leaked(self) -> list[str]:
        """Log lines and Events that contain an API key."""
        texts = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.operator.logs]
        texts += [f"event {e.get('reason')}: {e.get('message')}" for e in self.kube.list(EVENTS)]
        return [text for text in texts if any(secret in text for secret in self.secrets)]


async def settle(kube: Kube, quiet: float = 0.3, timeout: float = 5.0) -> None:
    """Wait until the operator has sent no request for ``quiet`` seconds.

    kopf re-spawns timers for events it processes after its shutdown stopped them, and then waits 5 s
    for those "hung" tasks; stopping a quiet operator avoids that wait.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen, since = len(kube.calls), loop.time()
    while loop.time() < deadline and loop.time() - since < quiet:
        await asyncio.sleep(0.05)
        if len(kube.calls) != seen:
            seen, since = len(kube.calls), loop.time()


@pytest.fixture
def operator_environment() -> dict[str, str]:
    """Extra environment variables for the operator (parametrize this fixture to change them)."""
    return {}


@pytest.fixture
async def environment_world(kube: Kube, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                            operator_environment: dict[str, str]) -> AsyncIterator[EnvironmentWorld]:
    kube.install_crd(ENVIRONMENTS_CRD)
    emulator = EmulatorServer(api_keys=[API_KEY, SECRET_API_KEY])
    requests = record_requests(emulator)
    async with emulator:
        settings = {
            "ANTHROPIC_API_KEY": API_KEY,
            "ANTHROPIC_BASE_URL": emulator.base_url,
            # Long enough that no periodic check runs unless a test asks for one (by annotation).
            "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "3600",
            "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0",
            **operator_environment,
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        caplog.set_level(logging.DEBUG)
        async with run_operator(kube, registry=kopf.get_default_registry(), namespaces=[NAMESPACE],
                                settings_hook=apply_kopf_settings, log_level=logging.DEBUG) as operator:
            world = EnvironmentWorld(kube, emulator, operator, requests)
            yield world
            await settle(kube)
        leaked = world.leaked() + [r.getMessage() for r in caplog.records
                                   if any(s in r.getMessage() for s in world.secrets)]
        assert not leaked, f"an API key appeared in logs or Events: {leaked[:3]}"
        kube.assert_all_storable(ENVIRONMENTS_CRD)


# ----- WorkerPool controller (``workerpool_world``) ---------------------------------------------------------
#
# Both CRDs installed with their schemas, the emulator with one self_hosted environment and its key in a
# Secret, the shipped operator with short timeouts, and the harness kubelet. At teardown: every stored
# WorkerPool and Environment is storable as is, and the environment key appears in no object stored in
# the fake apiserver (pods, Secrets, Events, WorkerPools, ...) and in no log line.

WORKERPOOLS_CRD: dict[str, Any] = yaml.safe_load((ROOT / "crds" / "workerpools.managedagents.dev.yaml").read_text())
WORKER_IMAGE = "registry.example/worker:e2e"
ENVIRONMENT_KEY_SECRET = "env-key"


@dataclass
class WorkerPoolWorld:
    """The fake apiserver, kubelet, emulator and operator of one WorkerPool test, and shortcuts over them."""

    kube: Kube
    kubelet: Kubelet
    emulator: EmulatorServer
    operator: OperatorRunner
    environment: SelfHostedEnvironment
    responses: list[ApiRequest]
    namespace: str = NAMESPACE
    # Secrets where a test put the environment key on purpose (the only places it may be).
    key_secrets: set[str] = field(default_factory=lambda: {ENVIRONMENT_KEY_SECRET})

    def pool_spec(self, **overrides: Any) -> dict[str, Any]:
        """A spec with test-sized timeouts: a short long-poll and reclaim window keep every wait short."""
        spec: dict[str, Any] = {
            "environmentId": self.environment.id,
            "environmentKeySecretRef": {"name": ENVIRONMENT_KEY_SECRET, "key": "key"},
            "maxWorkers": 10,
            "startupTimeoutSeconds": 300,
            "ttlSecondsAfterFinished": 300,
            "poll": {"blockMs": 200, "reclaimOlderThanMs": 1000},
        }
        spec.update(overrides)
        return {key: value for key, value in spec.items() if value is not None}

    def create_pool(self, name: str = "pool", **overrides: Any) -> dict[str, Any]:
        return self.kube.create(WORKERPOOLS, {"apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
                                              "metadata": {"name": name, "namespace": self.namespace},
                                              "spec": self.pool_spec(**overrides)}, namespace=self.namespace)

    def pool(self, name: str = "pool") -> dict[str, Any] | None:
        return self.kube.get(WORKERPOOLS, name, self.namespace)

    def enqueue(self, count: int = 1) -> list[str]:
        """Queue ``count`` sessions' work items; returns their work IDs."""
        return [item.id for item in enqueue_sessions(self.emulator, self.environment.id, count)]

    def pods(self, pool: str | None = None) -> list[dict[str, Any]]:
        labels = {"managedagents.dev/worker-pool": pool} if pool else None
        return self.kube.list(PODS, self.namespace, labels)

    def pods_with_labels(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        return self.kube.list(PODS, self.namespace, labels)

    def pod_for(self, work_id: str) -> dict[str, Any] | None:
        return next((p for p in self.pods()
                     if p["metadata"]["annotations"].get("managedagents.dev/work-id") == work_id), None)

    def secrets_of_items(self) -> list[dict[str, Any]]:
        return self.kube.list(SECRETS, self.namespace, {"app.kubernetes.io/managed-by": "environments-operator"})

    def work_state(self, work_id: str) -> str:
        return str(self.emulator.state.work[work_id].state)

    def acks(self, work_id: str | None = None) -> list[ApiRequest]:
        """Successful acks (of one item, or all)."""
        return [r for r in self.responses if r.method == "POST" and r.status == 200 and r.path.endswith("/ack")
                and (work_id is None or f"/{work_id}/" in r.path)]

    async def wait_pods(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        found = await self.kube.wait_until(lambda: len(self.pods()) >= count and self.pods(), timeout=timeout,
                                           message=lambda: f"{count} worker pods (have {len(self.pods())})")
        assert isinstance(found, list)
        return found

    async def wait_work_state(self, work_ids: list[str], state: str, timeout: float = 10.0) -> None:
        await self.kube.wait_until(
            lambda: all(self.work_state(w) == state for w in work_ids), timeout=timeout,
            message=lambda: f"work items {state}: {[(w, self.work_state(w)) for w in work_ids][:5]}")

    async def wait_released(self, work_ids: list[str], timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until each item's pod is released (its scheduling gate removed: from now on a kubelet may
        run it); returns the pods. An item is ``starting`` a moment before: ack, then release."""
        def released() -> list[dict[str, Any]] | None:
            pods = [self.pod_for(work_id) for work_id in work_ids]
            if all(pod is not None and not pod["spec"].get("schedulingGates") for pod in pods):
                return [pod for pod in pods if pod is not None]
            return None

        found = await self.kube.wait_until(released, timeout=timeout,
                                           message=lambda: f"the pods of {work_ids[:5]} released")
        assert found is not None
        return found

    def condition(self, type_: str, name: str = "pool") -> dict[str, Any] | None:
        obj = self.pool(name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)

    async def wait_condition(self, type_: str, status: str, reason: str | None = None, name: str = "pool",
                             timeout: float = 10.0) -> dict[str, Any]:
        def matches() -> dict[str, Any] | None:
            condition = self.condition(type_, name)
            if condition and condition["status"] == status and reason in (None, condition["reason"]):
                return condition
            return None

        found = await self.kube.wait_until(matches, timeout=timeout, message=lambda: (
            f"{type_}={status} ({reason}) on WorkerPool {name}; have {self.condition(type_, name)}"))
        assert found is not None
        return found

    def events(self, name: str = "pool") -> list[tuple[str, str, str]]:
        return object_events(self.kube, self.namespace, name)

    async def wait_event(self, reason: str, name: str = "pool", timeout: float = 10.0) -> tuple[str, str, str]:
        return await wait_for_event(self.kube, self.namespace, name, reason, timeout)

    def leaked(self) -> list[str]:
        """Where a credential turned up where it must not be.

        The environment key (in clear or base64) may be only in the user's Secret; a work item's
        secret only in its per-item Secret (base64). Neither may be in any other stored object (pods,
        Events, WorkerPools, ...) nor in any log line.
        """
        key = self.environment.key
        key_forms = (key, base64.b64encode(key.encode()).decode())
        item_secrets = [item.secret for item in self.emulator.state.work.values()]
        found = []
        for resource in {*DEFAULT_RESOURCES, WORKERPOOLS}:
            for obj in self.kube.list(resource):
                meta = obj.get("metadata") or {}
                where = f"{obj.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
                text = json.dumps(obj)
                if any(form in text for form in key_forms) and not (
                        resource == SECRETS and meta.get("name") in self.key_secrets):
                    found.append(f"environment key in {where}")
                if resource != SECRETS and any(secret in text for secret in item_secrets):
                    found.append(f"work secret in {where}")
        for record in self.operator.logs:
            line = f"{record.getMessage()} {record.exc_text or ''}"
            if any(secret in line for secret in (key, *item_secrets)):
                found.append(f"credential in log {record.levelname} {record.name}: {record.msg}")
        return found


@pytest.fixture
def workerpool_operator_environment() -> dict[str, str]:
    """Extra environment variables for the WorkerPool tests' operator (parametrize to change them)."""
    return {}


@pytest.fixture
async def workerpool_world(kube: Kube, kubelet: Kubelet, monkeypatch: pytest.MonkeyPatch,
                           workerpool_operator_environment: dict[str, str]) -> AsyncIterator[WorkerPoolWorld]:
    kube.install_crd(ENVIRONMENTS_CRD)
    kube.install_crd(WORKERPOOLS_CRD)
    emulator = EmulatorServer(api_keys=[API_KEY])
    responses = record_requests(emulator)
    async with emulator:
        environment = self_hosted_environment(emulator, "workers")
        kube.ensure_namespace(NAMESPACE)
        kube.create(SECRETS, {"metadata": {"name": ENVIRONMENT_KEY_SECRET, "namespace": NAMESPACE},
                              "data": {"key": base64.b64encode(environment.key.encode()).decode()}}, NAMESPACE)
        settings = {
            "ANTHROPIC_API_KEY": API_KEY,
            "ANTHROPIC_BASE_URL": emulator.base_url,
            "ENVIRONMENTS_OPERATOR_WORKER_IMAGE": WORKER_IMAGE,
            "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "3600",
            "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0",
            **workerpool_operator_environment,
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        # The operator's own Kubernetes client reads KUBECONFIG when it starts, as kopf's login does.
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
        async with run_operator(kube, registry=kopf.get_default_registry(), namespaces=[NAMESPACE],
                                settings_hook=apply_kopf_settings, log_level=logging.DEBUG) as operator:
            world = WorkerPoolWorld(kube, kubelet, emulator, operator, environment, responses)
            yield world
            leaked = world.leaked()
        assert not leaked, f"the environment key appeared in: {leaked[:5]}"
        kube.assert_all_storable(WORKERPOOLS_CRD, ENVIRONMENTS_CRD)


@pytest.fixture
async def process_kubelet(workerpool_world: WorkerPoolWorld, tmp_path: Path) -> AsyncIterator[ProcessKubelet]:
    """The process kubelet on the WorkerPool world: every worker pod a real local ``environments-operator worker``."""
    kubelet = ProcessKubelet(workerpool_world.kube, images={WORKER_IMAGE}, root=tmp_path / "node")
    kubelet.start()
    try:
        yield kubelet
    finally:
        await kubelet.stop()
