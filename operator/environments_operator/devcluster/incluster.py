"""The in-cluster front of the simulated cluster: the fake apiserver over HTTPS, as a pod reaches it.

A pod of a real cluster reaches the Kubernetes API through its in-cluster configuration: the variables
``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``, and under
``/var/run/secrets/kubernetes.io/serviceaccount/`` the bearer ``token`` of its ServiceAccount, the
``ca.crt`` that signed the apiserver's certificate and its ``namespace``. ``InClusterFront`` is that
apiserver for the process kubelet's pods (which writes those files and sets those variables):

    async with start_incluster_front(kube) as front:
        token = front.issue_token("ns", "reader")         # the user system:serviceaccount:ns:reader
        front.url, front.ca_pem, front.client_ssl_context()

- **TLS**: a server on 127.0.0.1 (a free port) whose certificate (for 127.0.0.1, localhost and the
  ``kubernetes.default.svc`` names) is signed by a CA made by ``trustme`` for this front alone (``ca_pem``).
- **Authentication**: a request must carry ``Authorization: Bearer <token>`` with a token this front issued
  (``issue_token``) and has not revoked; anything else is answered 401 Unauthorized. A token is the user
  ``system:serviceaccount:NS:SA`` in the groups ``system:serviceaccounts``, ``system:serviceaccounts:NS``
  and ``system:authenticated``. It stops working when revoked (the process kubelet revokes a pod's token
  when its process ends: a bound token dies with its pod) and when its ServiceAccount is deleted or
  re-created (another uid); ``default`` counts as existing while no object of that name is stored.
- **Authorization** (RBAC, ``authorize``), from the Roles and RoleBindings stored in the fake apiserver at
  the time of the request, so a change applies at once: a resource request is allowed only if a
  RoleBinding of the request's namespace has a subject that is this user (``ServiceAccount`` by name and
  namespace, the binding's own if omitted; ``User`` by user name; ``Group``) and a ``roleRef`` to a
  ``Role`` of that namespace with a rule matching the API group (``""`` is the core group), the resource
  (``pods/status`` for a subresource), the verb (get, list, watch, create, update, patch, delete,
  deletecollection; ``*`` matches any) and, if the rule has ``resourceNames``, the object's name. As on a
  real apiserver, a list or watch with ``fieldSelector=metadata.name=X`` is a request for the name X, so a
  Role with ``resourceNames: [X]`` and ``get``, ``watch`` can watch the one object X. Denied: 403 Forbidden
  with the apiserver's message (``secrets "X" is forbidden: User "system:serviceaccount:NS:SA" cannot get
  resource "secrets" in API group "" in the namespace "NS"``). Discovery (``/api``, ``/apis``,
  ``/version``, ``/openapi``...) is open to every authenticated user, as ``system:discovery`` makes it.
- **Forwarding**: an allowed request goes to the fake apiserver's plain HTTP endpoint as it came (method,
  path, query, body), marked with the user (``kube.IMPERSONATE_USER_HEADER``) so that it is served by the
  same rules but recorded as a pod's request (``Kube.incluster_calls``), not the operator's; the answer,
  watch streams included, comes back chunk by chunk as it is written. ``requests`` lists every request the
  front answered, with its user and code.

Not emulated, so denied: ClusterRoles and ClusterRoleBindings (nothing cluster-scoped, and no list or watch
across all namespaces, is ever allowed), RoleBindings whose ``roleRef`` is a ClusterRole, non-resource URLs
other than discovery. Also not emulated: the TokenRequest API (a token is an opaque random string, not a
JWT, with no audience and no expiry), client certificates, impersonation by the pods themselves.

What this module may not do: know about our operator's logic, or change anything in the fake apiserver's
store (it only reads ServiceAccounts, Roles and RoleBindings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp
import aiohttp.web
import trustme
import yarl

from environments_operator.devcluster.apimachinery import JSON, ApiError
from environments_operator.devcluster.kube import (
    IMPERSONATE_USER_HEADER,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    Kube,
    Route,
    parse_route,
)

HOST = "127.0.0.1"
RBAC_GROUP = "rbac.authorization.k8s.io"
# The names a pod may know the apiserver by; the certificate is valid for each.
_CERTIFICATE_NAMES = (HOST, "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                      "kubernetes.default.svc.cluster.local")
# What ``system:discovery`` (bound to system:authenticated) lets every authenticated user read.
_DISCOVERY_PATHS = ("/api", "/apis", "/version", "/openapi", "/healthz", "/livez", "/readyz")
# Request headers passed on to the fake apiserver; the rest (Authorization above all) stay here.
_FORWARDED_HEADERS = ("Accept", "Content-Type", "User-Agent")
# An open watch may last as long as its client wants; so does the forwarding of its stream.
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=None)
# How long ``stop`` lets answers in flight finish before it cuts their connections (watches never finish).
_SHUTDOWN_SECONDS = 0.5


# --- the decision: pure functions ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServiceAccountUser:
    """Who a token says it is: a ServiceAccount (``uid``: the object's when the token was issued)."""

    namespace: str
    name: str
    uid: str | None = None

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    @property
    def groups(self) -> tuple[str, ...]:
        return "system:serviceaccounts", f"system:serviceaccounts:{self.namespace}", "system:authenticated"


@dataclasses.dataclass(frozen=True)
class RequestAttributes:
    """What RBAC decides on (the apiserver's authorizer.Attributes for a resource request)."""

    verb: str
    group: str
    resource: str  # the plural; ``subresource`` apart
    subresource: str | None
    namespace: str | None
    name: str | None

    @property
    def rbac_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def request_attributes(route: Route, query: Mapping[str, str]) -> RequestAttributes:
    """A request's attributes; a list or watch with ``fieldSelector`` ``metadata.name=X`` names X."""
    name = route.name
    if name is None and route.verb in ("list", "watch"):
        name = field_selector_name(query.get("fieldSelector"))
    return RequestAttributes(route.verb, route.group, route.plural, route.subresource, route.namespace, name)


def field_selector_name(selector: str | None) -> str | None:
    """X when the field selector requires ``metadata.name=X`` (or ``==``), as RequestInfo reads it."""
    for requirement in (selector or "").split(","):
        key, operator, value = requirement.partition("==") if "==" in requirement else requirement.partition("=")
        if operator and not key.endswith("!") and key.strip() == "metadata.name":
            return value.strip()
    return None


def subject_is(subject: JSON, user: ServiceAccountUser, binding_namespace: str) -> bool:
    """Whether one RoleBinding subject names this user (a ServiceAccount, its user name or a group)."""
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "ServiceAccount":
        return (name, subject.get("namespace") or binding_namespace) == (user.name, user.namespace)
    if kind == "User":
        return name == user.username
    if kind == "Group":
        return name in user.groups
    return False


def rule_allows(rule: JSON, attributes: RequestAttributes) -> bool:
    """Whether one PolicyRule of a Role covers the request."""
    def covers(values: Any, wanted: str) -> bool:
        return isinstance(values, list) and ("*" in values or wanted in values)

    if not (covers(rule.get("apiGroups"), attributes.group) and covers(rule.get("verbs"), attributes.verb)):
        return False
    resources = rule.get("resources")
    any_of_subresource = isinstance(resources, list) and f"*/{attributes.subresource}" in resources
    if not (covers(resources, attributes.rbac_resource) or (attributes.subresource and any_of_subresource)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (attributes.name is not None and attributes.name in names)


def authorize(user: ServiceAccountUser, attributes: RequestAttributes, roles: Iterable[JSON],
              bindings: Iterable[JSON]) -> bool:
    """RBAC for a namespaced request, from Roles and RoleBindings only (ClusterRoles are not emulated)."""
    if attributes.namespace is None:
        return False  # cluster-scoped, or across all namespaces: only a ClusterRole could allow it
    by_name = {role["metadata"]["name"]: role for role in roles
               if role["metadata"].get("namespace") == attributes.namespace}
    for binding in bindings:
        if binding["metadata"].get("namespace") != attributes.namespace:
            continue
        ref = binding.get("roleRef") or {}
        if ref.get("kind") != "Role" or ref.get("apiGroup", RBAC_GROUP) != RBAC_GROUP:
            continue  # a ClusterRole: not emulated
        if not any(subject_is(subject, user, attributes.namespace) for subject in binding.get("subjects") or []):
            continue
        role = by_name.get(ref.get("name", ""))
        if role is not None and any(rule_allows(rule, attributes) for rule in role.get("rules") or []):
            return True
    return False


def forbidden(user: ServiceAccountUser, attributes: RequestAttributes) -> ApiError:
    """The 403 a real apiserver answers when RBAC denies a resource request."""
    group_resource = f"{attributes.resource}.{attributes.group}" if attributes.group else attributes.resource
    subject = f'{group_resource} "{attributes.name}"' if attributes.name else group_resource
    scope = f'in the namespace "{attributes.namespace}"' if attributes.namespace else "at the cluster scope"
    return ApiError(403, f'{subject} is forbidden: User "{user.username}" cannot {attributes.verb} resource '
                         f'"{attributes.rbac_resource}" in API group "{attributes.group}" {scope}',
                    details={"name": attributes.name or "", "group": attributes.group, "kind": attributes.resource})


def is_discovery(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in _DISCOVERY_PATHS)


# --- the server ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrontRequest:
    """One request the front answered: who sent it (None: no valid token), what, and the HTTP code."""

    user: str | None
    method: str
    path: str
    code: int


class InClusterFront:
    """The fake apiserver over HTTPS, with authentication and RBAC for pods' tokens (module docstring)."""

    def __init__(self, kube: Kube, *, host: str = HOST) -> None:
        self.kube = kube
        self.host = host
        self.requests: list[FrontRequest] = []
        self._ca = trustme.CA(organization_name="devcluster in-cluster front")
        self._certificate = self._ca.issue_cert(*_CERTIFICATE_NAMES, common_name="kube-apiserver")
        self._tokens: dict[str, ServiceAccountUser] = {}
        self._runner: aiohttp.web.BaseRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None

    # --- what a pod gets ----------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the in-cluster front is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate (PEM) that signed the front's certificate: a pod's ``ca.crt``."""
        return self._ca.cert_pem.bytes()

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this front's CA alone (for test-side clients)."""
        context = ssl.create_default_context()
        self._ca.configure_trust(context)
        return context

    def issue_token(self, namespace: str, service_account: str = "default") -> str:
        """A new bearer token of the ServiceAccount (bound to the object stored now, if any)."""
        stored = self.kube.get(SERVICEACCOUNTS, service_account, namespace)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = ServiceAccountUser(namespace, service_account,
                                                 None if stored is None else stored["metadata"]["uid"])
        return token

    def revoke_token(self, token: str) -> None:
        self._tokens.pop(token, None)

    def authenticate(self, authorization: str | None) -> ServiceAccountUser | None:
        """The user of an ``Authorization`` header, or None (no token, an unknown one, a stale one)."""
        scheme, _, token = (authorization or "").partition(" ")
        user = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            return None
        stored = self.kube.get(SERVICEACCOUNTS, user.name, user.namespace)
        if stored is None:
            return user if user.name == "default" and user.uid is None else None
        return user if stored["metadata"]["uid"] == user.uid else None

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the in-cluster front is already started")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._certificate.configure_cert(context)
        self._session = aiohttp.ClientSession(timeout=_NO_TIMEOUT, auto_decompress=False)
        server = aiohttp.web.Server(self._handle, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, self.host, 0, ssl_context=context)
        await site.start()
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and end every answer in flight (open watches included)."""
        runner, session, self._runner, self._session = self._runner, self._session, None, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    # --- serving --------------------------------------------------------------------------------------------

    async def _handle(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        user = self.authenticate(request.headers.get("Authorization"))
        response: aiohttp.web.StreamResponse
        try:
            self._check(request, user)
            assert user is not None
            response = await self._forward(request, user)
        except ApiError as error:
            response = aiohttp.web.json_response(error.status_body(), status=error.code)
        self.requests.append(FrontRequest(None if user is None else user.username, request.method,
                                          request.path, response.status))
        return response

    def _check(self, request: aiohttp.web.BaseRequest, user: ServiceAccountUser | None) -> None:
        """Authentication and authorization: raise the 401 or 403 a real apiserver would answer."""
        if user is None:
            raise ApiError(401, "Unauthorized")
        route = parse_route(request.method, request.path, request.query)
        if route is None:
            if not is_discovery(request.path):
                raise ApiError(403, f'forbidden: User "{user.username}" cannot {request.method.lower()} '
                                    f'path "{request.path}"')
            return
        attributes = request_attributes(route, request.query)
        if not authorize(user, attributes, self.kube.list(ROLES), self.kube.list(ROLEBINDINGS)):
            raise forbidden(user, attributes)

    async def _forward(self, request: aiohttp.web.BaseRequest, user: ServiceAccountUser) -> aiohttp.web.StreamResponse:
        """Pass the request on to the fake apiserver, and its answer back as it comes (watch streams too)."""
        assert self._session is not None
        headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
        headers[IMPERSONATE_USER_HEADER] = user.username
        target = yarl.URL(self.kube.url + request.raw_path, encoded=True)
        body = await request.read()
        async with contextlib.AsyncExitStack() as stack:
            try:
                upstream = await stack.enter_async_context(
                    self._session.request(request.method, target, headers=headers, data=body or None))
            except aiohttp.ClientError as error:
                raise ApiError(503, f"the fake apiserver did not answer: {error}") from None
            response = aiohttp.web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name in ("Content-Type", "Content-Encoding"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            await response.prepare(request)
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):  # either side hung up
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def start_incluster_front(kube: Kube) -> AsyncIterator[InClusterFront]:
    """Run an in-cluster front of ``kube`` for the duration of the block."""
    front = InClusterFront(kube)
    await front.start()
    try:
        yield front
    finally:
        await front.stop()

