"""A fake kube-apiserver for end-to-end tests: kmock's KubernetesEmulator with the gaps of kmock 0.8 filled.

The real operator (kopf, and the ``kubernetes`` client in our adapters) talks plain HTTP to it. Tests talk
to it through ``Kube``, the object the ``kube`` fixture yields; test-side calls go straight to the store
and are never recorded as operator requests.

    kube.ensure_namespace("ns")
    kube.create(ENVIRONMENTS, {"metadata": {"name": "e1"}, "spec": {...}}, namespace="ns")
    obj = await kube.wait_for(ENVIRONMENTS, "e1", lambda o: o and o.get("status"), namespace="ns")
    kube.fail("create", PODS, code=403, message="exceeded quota", times=2)     # the next 2 pod creations
    hold = kube.hold("create", PODS)                                            # stall the next creation
    kube.delay("patch", ENVIRONMENTS, 0.5, subresource="status")                # slow status writes
    kube.break_watches(PODS); kube.compact(PODS)    # end pod watches; resumed ones then get 410 Gone
    assert RbacUse("", "pods", "create") in kube.rbac_uses()

What is filled in over kmock 0.8 (each rule lives in ``FakeApiServer`` below or in ``apimachinery``):
- routing: ``/api/v1/namespaces[/name]`` (crashes kmock) and the core group's discovery ``groupVersion``
  (kmock says ``"/v1"``);
- metadata: uid, creationTimestamp, generation 1 on create (+1 when anything but metadata/status changes,
  and when deletion starts), a cluster-wide resourceVersion on every write; ``generateName``;
- writes: PUT, JSON merge / JSON / strategic merge patches (strategic is 415 for custom resources, as on
  a real apiserver), resourceVersion preconditions (409 Conflict), a failed JSON-patch ``test`` (422), no-op
  writes that change nothing (no new resourceVersion, no event);
- the status subresource: the main endpoint ignores ``status``, ``/status`` ignores everything else,
  ``status`` is dropped on create; new pods get ``status.phase=Pending``, namespaces ``Active``;
- deletion: finalizers hold an object with ``deletionTimestamp`` until the last one is removed; no new
  finalizers once deleting; ``deletecollection``; DeleteOptions preconditions; on request
  (``Kube.graceful_pod_deletion``), graceful pod deletion: a pod stays Terminating until a delete with
  ``gracePeriodSeconds: 0`` (its kubelet's, or a force delete);
- reading: label and field selectors on list and watch (a watch turns a MODIFIED that leaves/enters the
  selection into DELETED/ADDED), watch from a resourceVersion replays what was missed, ``timeoutSeconds``,
  ``sendInitialEvents`` with the initial-events-end bookmark;
- validation: DNS-1123 names, label keys and values, base64 secret ``data`` (``stringData`` folded in),
  pod spec immutability (scheduling gates may only be removed); CRD schemas once installed with
  ``install_crd`` (defaults, pruning, 422 on type errors and on ``x-kubernetes-validations`` CEL rules,
  through ``crd_validation``);
- printing: the ``Table`` that ``kubectl get`` asks for, with a CRD's printer columns (``tables``);
- errors: standard Status bodies and reasons (NotFound, AlreadyExists, Conflict, Forbidden, Invalid, ...);
- watch faults, on request only: ``Kube.compact`` (a watch from a compacted resourceVersion gets one ERROR
  event with a 410 Expired Status, then the stream ends) and ``Kube.break_watches`` (open streams end now);
- slow calls, on request only: ``Kube.delay`` answers (and applies) matching requests only after a while;
- ServiceAccount admission: creating a pod whose ``spec.serviceAccountName`` names a ServiceAccount other
  than ``default`` that its namespace lacks is refused with 403 Forbidden, as the admission plugin does
  (``default`` always counts as existing); serviceaccounts, roles and rolebindings are served and stored;
- pods' requests: what the in-cluster front (``incluster``) forwards, marked with ``IMPERSONATE_USER_HEADER``,
  is served by the same rules but recorded apart (``Kube.incluster_calls``), and faults, holds and delays
  (which are for the operator's requests) leave it alone. Authentication and RBAC (Roles and RoleBindings)
  are enforced by that front, for pods' tokens; this plain HTTP endpoint, the operator's, allows everything.
Not emulated: garbage collection (ownerReferences), admission (but for ``delay`` and the ServiceAccount
check above: no defaulting of ``serviceAccountName``, no token volume added to a pod's spec, no token
Secrets for ServiceAccounts), RBAC on this endpoint, ClusterRoles and ClusterRoleBindings, server-side apply,
graceful pod termination by default (a deleted pod without finalizers is gone at once; in graceful mode,
the immediate deletion of unscheduled pods, as the fake's kubelets never set ``spec.nodeName``),
``limit``/``continue``,
compaction on its own (only ``compact()`` expires resourceVersions; lists never answer 410), watch bookmarks
other than the initial-events-end one.

What this module may not do: know about our operator's logic; everything here is generic Kubernetes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import random
import string
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import kmock
import yaml

from environments_operator.devcluster import apimachinery, crd_validation, pruning, tables
from environments_operator.devcluster.apimachinery import JSON, ApiError
from environments_operator.devcluster.recorder import ApiCall, RbacUse, record_call, save_to_env_record

T = TypeVar("T")

# Generous for a loaded 2-core CI machine; a passing test normally waits milliseconds.
DEFAULT_TIMEOUT = 10.0
# How often an idle watch stream checks that its client is still there (a killed operator says nothing).
_WATCH_LIVENESS_CHECK = 0.2

_BUILTIN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling"})
# A pod's grace period when neither DeleteOptions nor spec.terminationGracePeriodSeconds give one.
DEFAULT_POD_GRACE_SECONDS = 30
STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclasses.dataclass(frozen=True)
class Resource:
    """A resource the fake apiserver serves, with the discovery fields kopf needs to start watching it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    shortnames: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = STANDARD_VERBS

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def builtin(self) -> bool:
        """Served by the apiserver itself rather than from a CRD (strategic merge patch works only then)."""
        return self.group in _BUILTIN_GROUPS or self.group.endswith(".k8s.io")

    @property
    def key(self) -> tuple[str, str, str]:
        return self.group, self.version, self.plural

    @property
    def kmock_resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL path of a collection, an object or its subresource."""
        parts = ["/api", self.version] if not self.group else ["/apis", self.group, self.version]
        if namespace is not None and self.namespaced:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        parts += [part for part in (name, subresource) if part]
        return "/".join(parts)

    @classmethod
    def from_crd(cls, crd: JSON, version: str | None = None) -> Resource:
        """Declare what a CustomResourceDefinition dict declares (default: its storage version)."""
        spec, names = crd["spec"], crd["spec"]["names"]
        versions = spec["versions"]
        chosen = next(v for v in versions if v["name"] == version) if version else \
            next((v for v in versions if v.get("storage")), versions[0])
        return cls(
            group=spec["group"], version=chosen["name"], plural=names["plural"], kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            subresources=tuple(sorted(chosen.get("subresources") or {})),
            shortnames=tuple(names.get("shortNames") or ()), categories=tuple(names.get("categories") or ()),
        )


CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                namespaced=False, subresources=("status",), shortnames=("crd", "crds"), categories=("api-extensions",))
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False, subresources=("finalize", "status"),
                      shortnames=("ns",), verbs=("create", "delete", "get", "list", "patch", "update", "watch"))
EVENTS = Resource("", "v1", "events", "Event", shortnames=("ev",))
PODS = Resource("", "v1", "pods", "Pod", subresources=("status",), shortnames=("po",), categories=("all",))
SECRETS = Resource("", "v1", "secrets", "Secret")
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount", shortnames=("sa",))
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
ENVIRONMENTS = Resource("managedagents.dev", "v1alpha1", "environments", "Environment", subresources=("status",),
                        shortnames=("menv",), categories=("managedagents",))
WORKERPOOLS = Resource("managedagents.dev", "v1alpha1", "workerpools", "WorkerPool", subresources=("status",),
                       shortnames=("wp", "mawp"), categories=("managedagents",))
KOPF_PEERINGS = Resource("kopf.dev", "v1", "kopfpeerings", "KopfPeering")
CLUSTER_KOPF_PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False)

DEFAULT_RESOURCES = (CRDS, NAMESPACES, EVENTS, PODS, SECRETS, SERVICEACCOUNTS, ROLES, ROLEBINDINGS,
                     ENVIRONMENTS, WORKERPOOLS, KOPF_PEERINGS, CLUSTER_KOPF_PEERINGS)
# The header with which the in-cluster front (``incluster``) forwards a pod's request, naming the user it
# authenticated (as a real apiserver's impersonation header does). Such a request is served by the same
# rules, but it is not an operator request: it is recorded in ``incluster_calls``, not in ``calls`` (nor in
# the RBAC record), and the faults, holds and delays that tests set for the operator do not touch it.
IMPERSONATE_USER_HEADER = "Impersonate-User"


@dataclasses.dataclass(frozen=True)
class Change:
    """One committed write, as watch streams and ``Kube.changes`` see it."""

    revision: int
    type: str  # ADDED, MODIFIED or DELETED
    object: JSON  # the new state; for DELETED, the last state
    previous: JSON | None


@dataclasses.dataclass(frozen=True)
class PrunedField:
    """A field that ``install_crd``'s pruning dropped from a write, as a real apiserver would."""

    resource: Resource
    namespace: str | None
    name: str
    path: str


@dataclasses.dataclass
class _Matcher:
    verb: str
    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None  # None: the main resource only; "*": any
    times: int | None  # None: every matching request
    hits: int = 0

    def matches(self, call: ApiCall) -> bool:
        return (
            (self.times is None or self.hits < self.times)
            and self.verb == call.verb
            and (self.resource.group, self.resource.plural) == (call.group, call.resource)
            and (self.subresource == "*" or self.subresource == call.subresource)
            and self.namespace in (None, call.namespace)
            and self.name in (None, call.name)
        )


@dataclasses.dataclass
class Fault(_Matcher):
    """An injected error answer; see ``Kube.fail``."""

    code: int = 500
    message: str = ""
    reason: str | None = None
    when: Callable[[JSON | None], bool] | None = None

    def remove(self) -> None:
        self.times = 0


@dataclasses.dataclass
class Delay(_Matcher):
    """Slows matching requests down; see ``Kube.delay``."""

    seconds: float = 0.0

    def remove(self) -> None:
        self.times = 0


@dataclasses.dataclass
class Hold(_Matcher):
    """Stalls matching requests until released; see ``Kube.hold``."""

    apply_first: bool = True
    arrived: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def wait_arrived(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {self.verb} {self.resource.plural} request arrived within {timeout}s") \
                from None

    def release(self) -> None:
        self.released.set()


@dataclasses.dataclass(eq=False)
class _WatchStream:
    """One watch stream being served; ``Kube.break_watches`` marks it broken and it ends at once."""

    resource: tuple[str, str, str]
    broken: bool = False


@dataclasses.dataclass(frozen=True)
class Route:
    """A resource request's attributes, as the apiserver's RequestInfo has them (verb in RBAC terms)."""

    verb: str
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_route(method: str, path: str, query: Mapping[str, str]) -> Route | None:
    """Split a resource URL; ``None`` for discovery and anything else that is not a resource request."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    # /api/v1/namespaces/NAME/status is the namespace NAME's subresource, not a resource in namespace NAME.
    namespace_subresource = group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")
    if rest[0] == "namespaces" and len(rest) >= 3 and not namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    plural, name, subresource = rest[0], rest[1] if len(rest) > 1 else None, "/".join(rest[2:]) or None
    method = method.upper()
    if method == "GET":
        # Go's strconv.ParseBool, as the apiserver reads the parameter.
        verb = "watch" if query.get("watch") in ("1", "t", "T", "true", "True", "TRUE") else "get" if name else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
    return Route(verb, group, version, plural, namespace, name, subresource)


def _now(seconds_later: float = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_later)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _content(obj: JSON) -> JSON:
    # What metadata.generation tracks: everything except metadata and status.
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


def _labels(obj: JSON) -> Mapping[str, str]:
    labels = obj.get("metadata", {}).get("labels")
    return labels if isinstance(labels, dict) else {}


@attrs.define(kw_only=True)
class FakeApiServer(kmock.KubernetesEmulator):
    """kmock's emulator, serving the declared resources with real apiserver rules (see the module docstring).

    Requests for declared resources are served here; everything else (discovery, and any kmock DSL
    reactions a test adds with ``server[...] << ...``) goes to kmock unchanged. Objects live in kmock's
    own store, so kmock assertions such as ``server.objects[PODS.kmock_resource, "ns", "p"] >= {...}``
    and the per-object ``history`` keep working.
    """

    calls: list[ApiCall] = attrs.field(factory=list, init=False)
    # Pods' requests through the in-cluster front: (the user it authenticated, the request).
    incluster_calls: list[tuple[str, ApiCall]] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    holds: list[Hold] = attrs.field(factory=list, init=False)
    delays: list[Delay] = attrs.field(factory=list, init=False)
    pruned: list[PrunedField] = attrs.field(factory=list, init=False)
    harness_errors: list[Exception] = attrs.field(factory=list, init=False)
    _declared: dict[tuple[str, str, str], Resource] = attrs.field(factory=dict, init=False)
    _schemas: dict[tuple[str, str, str], JSON] = attrs.field(factory=dict, init=False)
    _changes: dict[tuple[str, str, str], list[Change]] = attrs.field(
        factory=lambda: collections.defaultdict(list), init=False)
    _revision: int = attrs.field(default=1, init=False)
    _pulse: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _closed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)  # ends delays at shutdown
    open_watches: int = attrs.field(default=0, init=False)  # streams being served now (a dead client's end)
    _streams: set[_WatchStream] = attrs.field(factory=set, init=False)
    # Pods deleted with a grace period stay Terminating until a grace-0 delete (see ``delete_object``).
    graceful_pod_deletion: bool = False
    # Per resource: watches from this resourceVersion or older are answered 410 Gone (see ``compact``).
    _compacted: dict[tuple[str, str, str], int] = attrs.field(factory=dict, init=False)

    # --- declarations -------------------------------------------------------------------------------------

    def declare(self, resource: Resource) -> None:
        self._declared[resource.key] = resource
        self.resources[resource.kmock_resource] = kmock.ResourceInfo(
            kind=resource.kind, namespaced=resource.namespaced, singular=resource.kind.lower(),
            verbs=set(resource.verbs), shortnames=set(resource.shortnames),
            categories=set(resource.categories), subresources=set(resource.subresources),
        )

    def declared(self, key: tuple[str, str, str]) -> Resource | None:
        return self._declared.get(key)

    def enforce_schema(self, resource: Resource, schema: JSON) -> None:
        self._schemas[resource.key] = schema

    async def _serve_version(self, request: kmock.Request) -> Any:
        # kmock reports the core group's groupVersion as "/v1"; clients expect "v1".
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and request.resource is not None and request.resource.group == "":
            payload["groupVersion"] = request.resource.version
        return payload

    # --- notification -------------------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake everyone waiting for a change (watch streams, ``Kube.wait_*``)."""
        pulse, self._pulse = self._pulse, asyncio.Event()
        pulse.set()

    @property
    def pulse(self) -> asyncio.Event:
        """Set at the next change; take it BEFORE checking a condition, then wait on it."""
        return self._pulse

    def close(self) -> None:
        """End every watch stream and hold, so that the HTTP server can shut down at once."""
        self._closing = True
        self._closed.set()
        for hold in self.holds:
            hold.release()
        self.notify()

    # --- HTTP entry point ---------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        route = parse_route(raw_request.method, raw_request.path, raw_request.query)
        if route is None:
            return await super().__call__(raw_request)
        body = await raw_request.read()
        call = ApiCall(route.verb, route.group, route.plural, route.subresource, route.namespace, route.name)
        impersonated = IMPERSONATE_USER_HEADER in raw_request.headers
        if impersonated:  # a pod's request through the in-cluster front, not the operator's
            self.incluster_calls.append((raw_request.headers[IMPERSONATE_USER_HEADER], call))
        else:
            record_call(self.calls, call)
        self.notify()
        response: aiohttp.web.StreamResponse
        try:
            response = await self._serve(raw_request, route, call, body, injected=not impersonated)
        except ApiError as error:
            response = aiohttp.web.json_response(error.status_body(), status=error.code)
        except Exception as error:  # a bug in this harness: answer like an apiserver would, fail at teardown
            self.harness_errors.append(error)
            response = aiohttp.web.json_response(ApiError(500, repr(error)).status_body(), status=500)
        call.status = response.status
        return response

    async def _serve(self, raw: aiohttp.web.BaseRequest, route: Route, call: ApiCall,
                     body: bytes, *, injected: bool = True) -> aiohttp.web.StreamResponse:
        resource = self._declared.get((route.group, route.version, route.plural))
        if resource is None or (route.namespace is not None and not resource.namespaced):
            raise ApiError(404, "the server could not find the requested resource")
        if route.subresource is not None and route.subresource not in resource.subresources:
            raise ApiError(404, "the server could not find the requested resource")
        if resource.namespaced and route.namespace is None and route.verb not in ("list", "watch"):
            raise ApiError(404, f"the server could not find the requested resource "
                                f"({resource.plural} is namespaced; the URL names no namespace)")
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None

        # Faults, holds and delays act on the operator's requests only (``injected``), not on pods'.
        delay = next((d for d in self.delays if injected and d.matches(call)), None)
        if delay is not None:  # before anything else, as a slow admission webhook or a slow etcd would be
            delay.hits += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay.seconds)
        fault = next((f for f in self.faults if injected and f.matches(call)
                      and (f.when is None or f.when(payload))), None)
        if fault is not None:
            fault.hits += 1
            raise ApiError(fault.code, fault.message or self._fault_message(fault, route, payload),
                           reason=fault.reason, details={"name": route.name or "", "group": route.group,
                                                         "kind": route.plural})
        hold = next((h for h in self.holds if injected and h.matches(call)), None)
        if hold is not None:
            hold.hits += 1
            if not hold.apply_first or route.verb == "watch":  # a watch has nothing to apply first
                await self._stall(hold)

        if route.verb == "watch":
            return await self._stream_watch(raw, resource, route)
        code, result = self._dispatch(resource, route, payload, raw.content_type, raw.query)
        if hold is not None and hold.apply_first:
            await self._stall(hold)
        if code == 200 and route.verb in ("get", "list") and route.subresource is None \
                and tables.wants_table(raw.headers.get("Accept")):
            result = self._table(resource, route, result)
        return aiohttp.web.json_response(result, status=code)

    def _table(self, resource: Resource, route: Route, result: JSON) -> JSON:
        """``result`` as the Table ``kubectl get`` asks for, with the CRD's printer columns."""
        crd = None if resource.builtin else self.get_object(CRDS, None, f"{resource.plural}.{resource.group}")
        objects = result.get("items", []) if route.verb == "list" else [result]
        return tables.as_table(resource.kind, objects, crd=crd, version=resource.version,
                               resource_version=(result.get("metadata") or {}).get("resourceVersion"))

    async def _stall(self, hold: Hold) -> None:
        hold.arrived.set()
        await hold.released.wait()

    @staticmethod
    def _fault_message(fault: Fault, route: Route, payload: JSON | None) -> str:
        name = route.name or ((payload or {}).get("metadata") or {}).get("name") or ""
        return {
            403: f'{route.plural} "{name}" is forbidden: injected by the test harness',
            404: f'{route.plural} "{name}" not found',
            409: f'Operation cannot be fulfilled on {route.plural} "{name}": injected by the test harness',
            422: f'{fault.resource.kind} "{name}" is invalid: injected by the test harness',
        }.get(fault.code, f"injected by the test harness (HTTP {fault.code})")

    def _dispatch(self, resource: Resource, route: Route, payload: Any, content_type: str,
                  query: Mapping[str, str]) -> tuple[int, JSON]:
        namespace, name, verb = route.namespace, route.name, route.verb
        if verb == "list":
            items = self.list_objects(resource, namespace, query.get("labelSelector"), query.get("fieldSelector"))
            return 200, {"apiVersion": resource.api_version, "kind": f"{resource.kind}List",
                         "metadata": {"resourceVersion": str(self._revision)}, "items": items}
        if verb == "create" and name is None:
            return 201, self.create_object(resource, namespace, self._body(payload))
        if verb in ("delete", "deletecollection"):
            options = payload if isinstance(payload, dict) else {}
            grace = options.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
            try:
                grace = None if grace is None else int(grace)
            except (TypeError, ValueError):
                raise ApiError(400, f"invalid gracePeriodSeconds {grace!r}") from None
        if verb == "deletecollection":
            for item in self.list_objects(resource, namespace, query.get("labelSelector"),
                                          query.get("fieldSelector")):
                self.delete_object(resource, item["metadata"].get("namespace"), item["metadata"]["name"],
                                   grace_period_seconds=grace)
            return 200, {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"}
        assert name is not None
        if verb == "get":
            found = self.get_object(resource, namespace, name)
            if found is None:
                raise self._not_found(resource, name)
            return 200, found
        if verb == "update":
            return 200, self.replace_object(resource, namespace, name, self._body(payload), route.subresource)
        if verb == "patch":
            return 200, self.patch_object(resource, namespace, name, payload, content_type, route.subresource)
        if verb == "delete":
            return 200, self.delete_object(resource, namespace, name, options.get("preconditions"), grace)
        raise ApiError(405, f"the server does not allow this method on the requested resource ({verb})")

    @staticmethod
    def _body(payload: Any) -> JSON:
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return payload

    @staticmethod
    def _not_found(resource: Resource, name: str) -> ApiError:
        return ApiError(404, f'{resource.plural}{"." + resource.group if resource.group else ""} "{name}" not found',
                        details={"name": name, "group": resource.group, "kind": resource.plural})

    # --- the store ----------------------------------------------------------------------------------------

    def _key(self, resource: Resource, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return resource.kmock_resource, namespace if resource.namespaced else None, name

    def get_object(self, resource: Resource, namespace: str | None, name: str) -> JSON | None:
        key = self._key(resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def list_objects(self, resource: Resource, namespace: str | None = None, label_selector: str | None = None,
                     field_selector: str | None = None) -> list[JSON]:
        labels_match = apimachinery.label_selector(label_selector)
        fields_match = apimachinery.field_selector(field_selector)
        found = []
        wanted = resource.kmock_resource  # built once: each one costs a Protocol isinstance check in kmock
        for (kmock_resource, object_namespace, _), stored in self.objects.items():
            if kmock_resource != wanted or stored.deleted:
                continue
            if namespace is not None and resource.namespaced and object_namespace != namespace:
                continue
            obj = stored.raw
            if labels_match(_labels(obj)) and fields_match(obj):
                found.append(copy.deepcopy(obj))
        return sorted(found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def _commit(self, resource: Resource, change_type: str, new: JSON, previous: JSON | None) -> JSON:
        self._revision += 1
        new["metadata"]["resourceVersion"] = str(self._revision)
        key = self._key(resource, new["metadata"].get("namespace"), new["metadata"]["name"])
        if key not in self.objects:
            self.objects[key] = copy.deepcopy(new)
        else:
            self.objects[key].history.append(copy.deepcopy(new))
        if change_type == "DELETED":
            self.objects[key].delete()
        self._changes[resource.key].append(Change(self._revision, change_type, copy.deepcopy(new), previous))
        self.notify()
        return new

    def create_object(self, resource: Resource, namespace: str | None, body: JSON) -> JSON:
        new = copy.deepcopy(body)
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, f"{resource.kind}.{resource.group or 'core'} is invalid: metadata.name: "
                                    f"Required value: name or generateName is required")
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        name = meta["name"]
        if resource.namespaced:
            if namespace is not None and meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent "
                                    "on the request")
            meta["namespace"] = namespace = namespace or meta.get("namespace")
            if not namespace:
                raise ApiError(422, f'{resource.kind} "{name}" is invalid: metadata.namespace: Required value')
        else:
            meta.pop("namespace", None)
        errors = apimachinery.name_errors(name, dns_label=resource.key == NAMESPACES.key)
        if errors:
            raise ApiError(422, f'{resource.kind} "{name}" is invalid: ' + "; ".join(errors))
        if resource.key == PODS.key:
            self._admit_service_account(name, namespace, new.get("spec"))
        if self.get_object(resource, namespace, name) is not None:
            raise ApiError(409, f'{resource.plural}{"." + resource.group if resource.group else ""} '
                                f'"{name}" already exists', reason="AlreadyExists",
                           details={"name": name, "group": resource.group, "kind": resource.plural})
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        for system_field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(system_field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if "status" in resource.subresources:
            new.pop("status", None)  # the status subresource ignores status on create
        if resource.key == PODS.key:
            new["status"] = {"phase": "Pending"}
        elif resource.key == NAMESPACES.key:
            new["status"] = {"phase": "Active"}
        self._admit(resource, new, None)
        return self._commit(resource, "ADDED", new, None)

    def replace_object(self, resource: Resource, namespace: str | None, name: str, body: JSON,
                       subresource: str | None = None) -> JSON:
        old = self._existing(resource, namespace, name)
        self._check_resource_version(resource, name, old, (body.get("metadata") or {}).get("resourceVersion"))
        return self._update(resource, old, copy.deepcopy(body), subresource)

    def patch_object(self, resource: Resource, namespace: str | None, name: str, patch: Any, content_type: str,
                     subresource: str | None = None) -> JSON:
        old = self._existing(resource, namespace, name)
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "a JSON patch must be a list of operations")
            return self._update(resource, old, apimachinery.json_patch(old, patch), subresource)
        if not isinstance(patch, dict):
            raise ApiError(400, "a merge patch must be a JSON object")
        self._check_resource_version(resource, name, old, (patch.get("metadata") or {}).get("resourceVersion"))
        if content_type == "application/merge-patch+json":
            return self._update(resource, old, apimachinery.merge_patch(old, patch), subresource)
        if content_type == "application/strategic-merge-patch+json":
            if not resource.builtin:
                raise ApiError(415, "the body of the request was in an unknown format - accepted media types "
                                    "include: application/json-patch+json, application/merge-patch+json, "
                                    "application/apply-patch+yaml")
            return self._update(resource, old, apimachinery.strategic_merge_patch(old, patch), subresource)
        raise ApiError(415, f"the fake apiserver does not emulate the patch type {content_type!r}")

    def delete_object(self, resource: Resource, namespace: str | None, name: str,
                      preconditions: JSON | None = None, grace_period_seconds: int | None = None) -> JSON:
        """Delete, or start deleting: finalizers hold the object (``deletionTimestamp`` set) until they are
        gone. With ``graceful_pod_deletion``, a pod deleted with a grace period other than 0 stays too
        (Terminating, ``deletionTimestamp`` = now + grace) until a delete with grace 0 (its kubelet's, or a
        force delete); a finished (Succeeded/Failed) pod is deleted at once, as on a real apiserver."""
        old = self._existing(resource, namespace, name)
        preconditions = preconditions or {}
        if preconditions.get("uid") not in (None, old["metadata"]["uid"]):
            raise ApiError(409, f'Operation cannot be fulfilled on {resource.plural} "{name}": Precondition '
                                f'failed: UID in precondition: {preconditions["uid"]}, UID in object meta: '
                                f'{old["metadata"]["uid"]}')
        self._check_resource_version(resource, name, old, preconditions.get("resourceVersion"))
        meta = old["metadata"]
        grace = self._grace_seconds(resource, old, grace_period_seconds)
        if meta.get("deletionTimestamp"):
            if grace == 0 and meta.get("deletionGracePeriodSeconds"):  # a force delete of a Terminating pod
                if not meta.get("finalizers"):
                    return self._commit(resource, "DELETED", copy.deepcopy(old), old)
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                return self._commit(resource, "MODIFIED", new, old)
            return old  # deletion already started; waiting for finalizers (or for the pod's kubelet)
        if grace == 0 and not meta.get("finalizers"):
            return self._commit(resource, "DELETED", copy.deepcopy(old), old)
        new = copy.deepcopy(old)
        new["metadata"].update(deletionTimestamp=_now(grace), deletionGracePeriodSeconds=grace,
                               generation=meta["generation"] + 1)
        return self._commit(resource, "MODIFIED", new, old)

    def _grace_seconds(self, resource: Resource, old: JSON, requested: int | None) -> int:
        """How long a deletion waits for its kubelet: 0 (at once) but for pods in graceful mode."""
        if not self.graceful_pod_deletion or resource.key != PODS.key:
            return 0
        if (old.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return 0  # nothing runs any more: a real apiserver deletes finished pods at once
        if requested is not None:
            return max(requested, 0)
        spec_grace = (old.get("spec") or {}).get("terminationGracePeriodSeconds")
        return DEFAULT_POD_GRACE_SECONDS if spec_grace is None else int(spec_grace)

    def _existing(self, resource: Resource, namespace: str | None, name: str) -> JSON:
        old = self.get_object(resource, namespace, name)
        if old is None:
            raise self._not_found(resource, name)
        return old

    @staticmethod
    def _check_resource_version(resource: Resource, name: str, old: JSON, expected: Any) -> None:
        if expected not in (None, "") and str(expected) != old["metadata"]["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has '
                                f'been modified; please apply your changes to the latest version and try again',
                           details={"name": name, "group": resource.group, "kind": resource.plural})

    def _update(self, resource: Resource, old: JSON, candidate: JSON, subresource: str | None) -> JSON:
        if subresource == "status":
            new = copy.deepcopy(old)
            new.pop("status", None)
            if candidate.get("status") is not None:
                new["status"] = candidate["status"]
        else:
            new = candidate
            status = new.pop("status", None)
            if "status" not in resource.subresources:
                if status is not None:
                    new["status"] = status
            elif "status" in old:
                new["status"] = copy.deepcopy(old["status"])  # the main endpoint ignores status
        old_meta, meta = old["metadata"], new.setdefault("metadata", {})
        for system_field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                             "deletionGracePeriodSeconds", "generation", "resourceVersion"):
            meta.pop(system_field, None)
            if system_field in old_meta:
                meta[system_field] = old_meta[system_field]
        new["apiVersion"], new["kind"] = resource.api_version, resource.kind
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise ApiError(422, f'{resource.kind} "{old_meta["name"]}" is invalid: metadata.finalizers: '
                                    f'Forbidden: no new finalizers can be added if the object is being deleted, '
                                    f'found new finalizers {sorted(added)}')
        self._admit(resource, new, old)
        if _content(new) != _content(old):
            meta["generation"] = old_meta.get("generation", 1) + 1
        if new == old:
            return old  # a no-op write: no new resourceVersion, no watch event
        # The last finalizer is gone; a Terminating pod still waits for the grace-0 delete of its kubelet.
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get("deletionGracePeriodSeconds"):
            return self._commit(resource, "DELETED", new, old)
        return self._commit(resource, "MODIFIED", new, old)

    def _admit_service_account(self, name: str, namespace: str | None, spec: Any) -> None:
        """The ServiceAccount admission plugin's refusal: a new pod may only name a ServiceAccount that
        exists in its namespace (``default`` counts as existing: a real cluster makes it per namespace)."""
        spec = spec if isinstance(spec, dict) else {}
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if account != "default" and self.get_object(SERVICEACCOUNTS, namespace, account) is None:
            raise ApiError(403, f'pods "{name}" is forbidden: error looking up service account '
                                f'{namespace}/{account}: serviceaccount "{account}" not found',
                           details={"name": name, "kind": "pods"})

    def _admit(self, resource: Resource, new: JSON, old: JSON | None) -> None:
        """The per-kind rules every create and update passes: labels, pod spec immutability, secrets'
        data, and installed CRD schemas (defaults, pruning, types, CEL rules)."""
        name = new["metadata"]["name"]
        errors = apimachinery.label_errors(new["metadata"].get("labels"))
        if resource.key == PODS.key and old is not None and \
                apimachinery.mutable_pod_spec(new.get("spec")) != apimachinery.mutable_pod_spec(old.get("spec")):
            errors.append("spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                          "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, "
                          "`spec.tolerations` (only additions to existing tolerations)")
        if resource.key == PODS.key and old is not None:
            errors += apimachinery.scheduling_gate_errors(new.get("spec"), old.get("spec"))
        if resource.key == SECRETS.key:
            string_data = new.pop("stringData", None) or {}
            new["type"] = new.get("type") or "Opaque"
            data = new["data"] = new.get("data") or {}
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            for key, value in data.items():
                try:
                    base64.b64decode(value, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise ApiError(400, f"Secret in version \"v1\" cannot be handled as a Secret: illegal base64 "
                                        f"data in data.{key}") from None
        schema = self._schemas.get(resource.key)
        if schema is not None:
            pruning.apply_defaults(new, schema)
            for path in pruning.prune(new, schema):
                self.pruned.append(PrunedField(resource, new["metadata"].get("namespace"), name, path))
            errors += pruning.schema_errors(new, schema)
            if old is None:
                errors += [str(error) for error in crd_validation.cel_errors(new, schema)]
            else:
                errors += [str(error) for error in crd_validation.cel_errors(new, schema, old)]
        if errors:
            raise ApiError(422, f'{resource.kind}.{resource.group or "core"} "{name}" is invalid: '
                                + "; ".join(errors))

    # --- watching -----------------------------------------------------------------------------------------

    async def _stream_watch(self, raw: aiohttp.web.BaseRequest, resource: Resource,
                            route: Route) -> aiohttp.web.StreamResponse:
        query = raw.query
        labels_match = apimachinery.label_selector(query.get("labelSelector"))
        fields_match = apimachinery.field_selector(query.get("fieldSelector"))
        namespace = route.namespace if resource.namespaced else None

        def selected(obj: JSON | None) -> bool:
            return obj is not None and (namespace is None or obj["metadata"].get("namespace") == namespace) \
                and (route.name is None or obj["metadata"]["name"] == route.name) \
                and labels_match(_labels(obj)) and fields_match(obj)

        since = query.get("resourceVersion", "")
        if not since.isdigit() and since != "":
            raise ApiError(400, f"invalid resourceVersion {since!r}")
        initial = since in ("", "0") or query.get("sendInitialEvents") == "true"
        compacted = self._compacted.get(resource.key, 0)
        if not initial and int(since) <= compacted:
            return await self._expired_watch(raw, since, compacted)
        changes = self._changes[resource.key]
        position = len(changes) if initial else \
            next((i for i, change in enumerate(changes) if change.revision > int(since)), len(changes))
        timeout = float(query.get("timeoutSeconds") or 0) or None
        deadline = None if timeout is None else time.monotonic() + timeout

        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
        except ConnectionError:
            return response  # the client hung up (or was killed) before the stream began
        self.open_watches += 1
        stream = _WatchStream(resource.key)
        self._streams.add(stream)
        events: list[JSON] = []
        if initial:
            events += [{"type": "ADDED", "object": obj} for obj in self.list_objects(resource, namespace)
                       if selected(obj)]
            if query.get("sendInitialEvents") == "true":
                events.append({"type": "BOOKMARK", "object": {
                    "apiVersion": resource.api_version, "kind": resource.kind,
                    "metadata": {"resourceVersion": str(self._revision),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}})
        try:
            while True:
                pulse = self._pulse
                fresh, position = changes[position:], len(changes)
                for change in fresh:
                    now, before = selected(change.object), selected(change.previous)
                    if change.type == "MODIFIED" and now != before:
                        event_type = "ADDED" if now else "DELETED"  # entered or left the selection
                    else:
                        event_type = change.type if (now or (change.type == "DELETED" and before)) else ""
                    if event_type:
                        events.append({"type": event_type, "object": change.object})
                for event in events:
                    if stream.broken:
                        break
                    await response.write(json.dumps(event).encode() + b"\n")
                events = []
                transport = raw.transport
                if stream.broken or self._closing or transport is None or transport.is_closing():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                # Wake now and then to notice a client that went away without a word.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pulse.wait(), min(remaining or _WATCH_LIVENESS_CHECK, _WATCH_LIVENESS_CHECK))
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up (or was killed): nothing to tell it
        finally:
            self.open_watches -= 1
            self._streams.discard(stream)
            self.notify()
        return response

    async def _expired_watch(self, raw: aiohttp.web.BaseRequest, since: str,
                             compacted: int) -> aiohttp.web.StreamResponse:
        """What a real apiserver answers a watch from a compacted resourceVersion: HTTP 200 and one
        ERROR event carrying a 410 Expired Status, then the end of the stream."""
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410,
                  "reason": "Expired", "message": f"too old resource version: {since} ({compacted + 1})"}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.prepare(raw)
            await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
            await response.write_eof()
        return response

    def compact(self, resource: Resource) -> int:
        """Forget the history of ``resource`` up to now: watches from the current resourceVersion or
        older get 410 Gone. The revision then moves on by one, so that a fresh list's resourceVersion
        can be watched (as on a real apiserver). Returns the compacted revision."""
        compacted = self._compacted[resource.key] = self._revision
        self._revision += 1
        return compacted

    def break_watches(self, resource: Resource) -> int:
        """End every open watch stream of ``resource`` now; returns how many there were."""
        broken = [stream for stream in self._streams if stream.resource == resource.key and not stream.broken]
        for stream in broken:
            stream.broken = True
        self.notify()
        return len(broken)

    async def changes(self, resource: Resource) -> AsyncIterator[Change]:
        """Every change of ``resource`` from now on, until the server closes (for test-side watchers)."""
        changes = self._changes[resource.key]
        position = len(changes)
        while not self._closing:
            pulse = self._pulse
            fresh, position = changes[position:], len(changes)
            for change in fresh:
                yield change
            if not fresh:
                await pulse.wait()


class WaitTimeout(AssertionError):
    """A ``Kube.wait_*`` condition did not come true in time; the message shows the last state seen."""


def _describe(value: Any, limit: int = 1500) -> str:
    text = json.dumps(value, indent=1, default=str) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= limit else text[:limit] + " ...(truncated)"


def write_kubeconfig(url: str, path: str | Path, namespace: str = "default") -> Path:
    """Write a kubeconfig whose current context points at ``url`` (no TLS, a dummy bearer token)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "harness", "user": {"token": "harness-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "harness", "namespace": namespace}}],
        "current-context": "kmock",
    }
    target = Path(path)
    target.write_text(yaml.safe_dump(config))
    return target


class Kube:
    """What the ``kube`` fixture yields: the fake apiserver's URL, its store, waits, faults and the record.

    Object helpers act on the store directly (no HTTP, not recorded) but follow the same rules as the
    operator's requests (resourceVersion, generation, status subresource, finalizers, watch events).
    """

    def __init__(self, server: FakeApiServer, workdir: Path):
        self.server = server
        self._workdir = workdir
        self._kubeconfig: Path | None = None

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    @property
    def graceful_pod_deletion(self) -> bool:
        """Off by default: a deleted pod without finalizers is gone at once.

        Set it to True, and a pod deleted with a grace period other than 0 (DeleteOptions
        ``gracePeriodSeconds`` in the body, else the query; else ``spec.terminationGracePeriodSeconds``,
        else 30) becomes Terminating: ``deletionTimestamp`` = now + grace, ``deletionGracePeriodSeconds``,
        a MODIFIED event, and the pod stays. A delete with grace 0 removes it (a force delete, or what its
        kubelet sends once the containers stopped: ``Kubelet.finish_termination``, the automatic kubelet
        and the process kubelet do it). Deleting a Terminating pod again with a grace changes nothing;
        Succeeded and Failed pods are deleted at once. Other resources are unaffected."""
        return self.server.graceful_pod_deletion

    @graceful_pod_deletion.setter
    def graceful_pod_deletion(self, enabled: bool) -> None:
        self.server.graceful_pod_deletion = enabled

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig file pointing at this server (written on first use)."""
        if self._kubeconfig is None:
            self._kubeconfig = write_kubeconfig(self.url, self._workdir / "kubeconfig.yaml")
        return self._kubeconfig

    # --- declarations -------------------------------------------------------------------------------------

    def declare(self, resource: Resource) -> None:
        """Serve one more resource (the defaults are ``DEFAULT_RESOURCES``)."""
        self.server.declare(resource)

    def install_crd(self, crd: JSON) -> Resource:
        """Store the CRD, serve its resource, and apply its schema on every write as the apiserver does:
        defaults filled in, unknown fields pruned (and listed in ``kube.pruned``), type errors and failed
        ``x-kubernetes-validations`` rules (transition rules on updates) answered 422."""
        resource = Resource.from_crd(crd)
        self.server.declare(resource)
        self.server.enforce_schema(resource, pruning.crd_schema(crd))
        if self.get(CRDS, crd["metadata"]["name"]) is None:
            self.create(CRDS, crd)
        return resource

    # --- objects ------------------------------------------------------------------------------------------

    def ensure_namespace(self, name: str) -> JSON:
        return self.get(NAMESPACES, name) or self.create(NAMESPACES, {"metadata": {"name": name}})

    def create(self, resource: Resource, body: JSON, namespace: str | None = None) -> JSON:
        """Create like ``POST`` does; ``namespace`` defaults to ``body.metadata.namespace``."""
        return self.server.create_object(resource, namespace, body)

    def get(self, resource: Resource, name: str, namespace: str | None = None) -> JSON | None:
        """The stored object, or None if absent."""
        return self.server.get_object(resource, namespace, name)

    def list(self, resource: Resource, namespace: str | None = None,
             labels: Mapping[str, str] | str | None = None, fields: str | None = None) -> builtins.list[JSON]:
        """Objects of ``resource`` (all namespaces if None), filtered by a label selector string or dict."""
        return self.server.list_objects(resource, namespace, apimachinery.selector_from_labels(labels), fields)

    def patch(self, resource: Resource, name: str, patch: JSON, namespace: str | None = None,
              subresource: str | None = None) -> JSON:
        """A JSON merge patch, like ``PATCH`` with ``application/merge-patch+json``."""
        return self.server.patch_object(resource, namespace, name, patch, "application/merge-patch+json",
                                        subresource)

    def patch_status(self, resource: Resource, name: str, status: JSON, namespace: str | None = None) -> JSON:
        """Merge-patch ``status`` through the status subresource (as a kubelet or another controller would)."""
        return self.patch(resource, name, {"status": status}, namespace, subresource="status")

    def delete(self, resource: Resource, name: str, namespace: str | None = None, *,
               grace_period_seconds: int | None = None) -> JSON:
        """Delete like ``DELETE``: with finalizers, only ``deletionTimestamp`` is set until they are gone.
        ``grace_period_seconds`` matters only with ``graceful_pod_deletion`` (0: a force delete)."""
        return self.server.delete_object(resource, namespace, name, grace_period_seconds=grace_period_seconds)

    def remove_finalizers(self, resource: Resource, name: str, namespace: str | None = None) -> JSON:
        return self.patch(resource, name, {"metadata": {"finalizers": None}}, namespace)

    # --- waiting ------------------------------------------------------------------------------------------

    async def wait_until(self, condition: Callable[[], T | Awaitable[T]], *, timeout: float = DEFAULT_TIMEOUT,
                         message: str | Callable[[], str] = "condition") -> T:
        """Re-check ``condition`` at every change of this server (and every 50 ms, for outside state)
        until it returns something truthy; return that. ``WaitTimeout`` names ``message`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            pulse = self.server.pulse
            result = condition()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                text = message() if callable(message) else message
                raise WaitTimeout(f"timed out after {timeout}s waiting for {text}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pulse.wait(), min(remaining, 0.05))

    async def wait_for(self, resource: Resource, name: str, predicate: Callable[[JSON | None], Any],
                       namespace: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> JSON | None:
        """Wait until ``predicate(obj)`` is truthy, where ``obj`` is the stored object or None when absent
        (so ``lambda o: o is None`` waits for a deletion); return that object."""
        seen: builtins.list[JSON | None] = [None]

        def check() -> tuple[JSON | None] | None:
            seen[0] = obj = self.get(resource, name, namespace)
            return (obj,) if predicate(obj) else None

        found = await self.wait_until(check, timeout=timeout, message=lambda: (
            f"{resource.plural} {namespace or ''}/{name}; last seen:\n{_describe(seen[0])}"))
        assert found is not None
        return found[0]

    async def wait_for_calls(self, verb: str, resource: Resource, *, count: int = 1,
                             subresource: str | None = None, namespace: str | None = None,
                             timeout: float = DEFAULT_TIMEOUT) -> builtins.list[ApiCall]:
        """Wait until the operator has sent ``count`` matching requests in total; return them."""
        def matching() -> builtins.list[ApiCall]:
            return [c for c in self.server.calls if c.verb == verb and c.resource == resource.plural
                    and c.group == resource.group and c.subresource == subresource
                    and namespace in (None, c.namespace)]

        def enough() -> builtins.list[ApiCall] | None:
            calls = matching()
            return calls if len(calls) >= count else None

        found = await self.wait_until(enough, timeout=timeout,
                                      message=lambda: f"{count} x {verb} {resource.plural} (seen {len(matching())})")
        assert found is not None
        return found

    def changes(self, resource: Resource) -> AsyncIterator[Change]:
        """Every change of ``resource`` from now on (``async for change in kube.changes(PODS)``)."""
        return self.server.changes(resource)

    # --- faults -------------------------------------------------------------------------------------------

    def fail(self, verb: str, resource: Resource, *, code: int = 403, message: str = "", reason: str | None = None,
             times: int | None = 1, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None, when: Callable[[JSON | None], bool] | None = None) -> Fault:
        """Answer the next ``times`` matching operator requests (every one if None) with an error Status.

        ``verb`` is the RBAC verb (create, patch, ...). ``subresource=None`` matches the main resource only,
        ``"*"`` any. ``when`` sees the request body (e.g. the pod being created). The store is untouched.
        The reason defaults to the standard one for ``code`` (Forbidden, Invalid, Conflict, ...).
        """
        fault = Fault(verb, resource, namespace, name, subresource, times, code=code, message=message,
                      reason=reason, when=when)
        self.server.faults.append(fault)
        return fault

    def hold(self, verb: str, resource: Resource, *, apply_first: bool = True, times: int | None = 1,
             namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> Hold:
        """Stall the next ``times`` matching requests until ``hold.release()``.

        With ``apply_first`` the write is committed and only the answer waits: the operator crashes (see
        ``OperatorRunner.kill``) after the apiserver did the work but before it heard back.
        """
        hold = Hold(verb, resource, namespace, name, subresource, times, apply_first=apply_first)
        self.server.holds.append(hold)
        return hold

    # --- watch faults -------------------------------------------------------------------------------------

    def compact(self, resource: Resource) -> int:
        """Compact ``resource``'s history, as etcd does every few minutes: from now on a watch from any
        resourceVersion up to the current one is answered HTTP 200 with a single ``ERROR`` event (a 410
        ``Expired`` Status), and ends. A watch without resourceVersion (or ``0``, or ``sendInitialEvents``)
        and one from a newer resourceVersion are served as usual; so is a list. kopf answers the 410 by
        listing again, and sees no DELETED event for what vanished meanwhile. Returns the compacted
        resourceVersion (a fresh list's resourceVersion is newer)."""
        return self.server.compact(resource)

    def break_watches(self, resource: Resource) -> int:
        """End every open watch stream of ``resource`` now, as a dropped connection or a server-side
        timeout would (nothing more is written to them; clients reconnect from their last
        resourceVersion). Returns how many streams were ended.

        With ``hold("watch", ..., times=None)`` first, the reconnections wait; delete objects, then
        ``compact()``, then release the hold: the resumed watches get 410 and must re-list."""
        return self.server.break_watches(resource)

    def delay(self, verb: str, resource: Resource, seconds: float, *, times: int | None = None,
              namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> Delay:
        """Answer the next ``times`` matching operator requests (every one if None) only after ``seconds``,
        as a slow admission webhook would: a write is applied only then, and a fault or hold that also
        matches acts after the delay. Matching as in ``fail``; ``delay.remove()`` ends it."""
        delay = Delay(verb, resource, namespace, name, subresource, times, seconds=seconds)
        self.server.delays.append(delay)
        return delay

    def clear_faults(self) -> None:
        """Remove every fault, hold and delay (holds are released)."""
        for hold in self.server.holds:
            hold.release()
        self.server.faults.clear()
        self.server.holds.clear()
        self.server.delays.clear()

    # --- the record ---------------------------------------------------------------------------------------

    @property
    def calls(self) -> builtins.list[ApiCall]:
        """Every operator request so far, in order (verbs in RBAC terms)."""
        return self.server.calls

    @property
    def incluster_calls(self) -> builtins.list[tuple[str, ApiCall]]:
        """Every request that pods sent through the in-cluster front and it let through: (user, request)."""
        return self.server.incluster_calls

    def rbac_uses(self) -> set[RbacUse]:
        return {call.rbac for call in self.server.calls}

    @property
    def pruned(self) -> builtins.list[PrunedField]:
        """Fields that ``install_crd`` schemas pruned from writes (a real apiserver drops them silently)."""
        return self.server.pruned

    def assert_all_storable(self, *crds: JSON) -> int:
        """Check every stored object of these CRDs as a real apiserver would store it (pruning, schema),
        and that no write was pruned meanwhile; return how many objects were checked."""
        problems, checked = [f"pruned on write: {p.resource.plural} {p.namespace}/{p.name}: {p.path}"
                             for p in self.pruned], 0
        for crd in crds:
            for obj in self.list(Resource.from_crd(crd)):
                checked += 1
                problems += [f"{obj['kind']} {obj['metadata'].get('namespace')}/{obj['metadata']['name']}: {p}"
                             for p in pruning.storage_problems(obj, crd)]
        if problems:
            raise AssertionError("stored objects a real apiserver would prune or reject:\n  "
                                 + "\n  ".join(problems))
        return checked


@contextlib.asynccontextmanager
async def start_kube(workdir: Path, resources: Iterable[Resource] = DEFAULT_RESOURCES) -> AsyncIterator[Kube]:
    """Run a fake apiserver on a free loopback port for the duration of the block."""
    server = FakeApiServer()
    async with server, kmock.Server(server):
        for resource in resources:
            server.declare(resource)
        kube = Kube(server, workdir)
        try:
            yield kube
        finally:
            server.close()
            save_to_env_record(kube.rbac_uses())
            await asyncio.sleep(0)  # let the watch streams see the close before the HTTP server stops
    if server.harness_errors:
        raise ExceptionGroup("the fake apiserver itself failed (a harness bug)", server.harness_errors)
