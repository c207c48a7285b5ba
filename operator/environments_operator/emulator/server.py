"""The Environments API emulator: an aiohttp server for tests, local development and a first run.

It serves every endpoint of the Environments API reference (environments CRUD, archive, list; the
work queue: poll, ack, heartbeat, stop, list, retrieve, update, stats), plus ``POST /v1/sessions``
(and ``GET /v1/sessions/{id}``) to put work on the queue, the session events a worker's tool runner
reads and answers (``sessions.events`` list, stream and send), and emulator-only routes under the
reserved prefix ``/_emulator/``: ``POST /_emulator/agents``, ``POST /_emulator/environments/{id}/environment-key`` and
``GET``/``POST``/``DELETE /_emulator/faults`` (the rule format is in ``faults``). The semantics live
in ``state``; this module maps HTTP onto them, checks credentials, applies faults, and renders every
failure in the Anthropic error shape. ``EmulatorServer`` runs it inside an existing asyncio loop.
It keeps everything in memory and may not write files or log credentials, secrets or bodies.

Decisions where the reference is silent (each one is tested in ``tests/emulator``):

Credentials
  - The API key may come as ``x-api-key`` or ``Authorization: Bearer``; with both, the Bearer value
    counts. Each credential is classified by value: the emulator issued every environment key
    (``sk-ant-envkey-...``) and sessions token (``sk-ant-sesstok-...``); anything else is an API key,
    accepted if non-empty (or, with ``--api-key``, only if listed). An unknown value with an issued
    prefix is a 401, not an API key.
  - Missing or invalid credentials: 401 ``authentication_error``. A valid credential of the wrong
    kind, or an environment key of another environment: 403 ``permission_error``.
  - API key: environment CRUD, work retrieve/update/stats/stop, sessions create, ``/_emulator/`` routes.
    Environment key (of that environment only): poll, ack, list, stats, heartbeat, stop.
    The sessions token inside a work item's ``secret`` authorizes heartbeat and stop of that one work
    item and retrieval of its session, so a worker pod needs no environment key.
  - Stats and stop take an API key as well, because the SDK (2.14+) gives both a ``workspace_id``
    header, which only a credential spanning workspaces, an API key, can use; the header is accepted
    and ignored (the emulator has one workspace). Poll, ack, heartbeat and list refuse an API key
    (403). With an API key, a cloud environment's stats show its queue, which is always empty.
  - Each environment-key request issues a new key; all stay valid until the environment is deleted.
    A work item's ``secret`` is the same on every delivery (a re-created pod may still hold the first
    one), and its token stays valid while the item exists.
Environments
  - A missing ``config`` means a cloud environment with unrestricted networking and no packages.
    On update, omitted or null fields keep their value (``networking`` fields merge into an
    existing limited policy); changing ``config.type`` is a 400.
  - ``scope`` is accepted, stored and returned for cloud and self_hosted environments alike: the
    reference's example responses show it on a cloud environment, and its remark that scope is "only
    applicable for self-hosted environments" does not say it is refused. Every environment has one in
    responses; it defaults to ``organization`` (as in those examples), and an update that omits it or
    sends null keeps the stored value. An unknown value is a 400 naming ``scope``.
  - Limits: name 1..256 characters, description up to 2048, metadata up to 16 keys (key 1..64,
    value up to 512 characters). Unknown fields anywhere in a body are a 400.
  - Archive is idempotent (the first ``archived_at`` stays); an archived environment is read-only
    (update is a 400) and takes no new sessions (400), but its queued work can still be served.
  - Delete removes the environment with its work items and keys, whatever their state.
  - Lists are newest first; ``limit`` is 1..100 (default 20); ``next_page`` is null on the last page.
Work queue
  - Poll: ``block_ms`` 1..999, ``reclaim_older_than_ms`` 0..3600000 (default 5000), measured from
    the item's last delivery. The response is the item with ``secret``, or JSON ``null``.
  - Ack of a ``starting`` item is idempotent (a retried ack must not strand the item); ack of an
    active, stopping or stopped item is a 409. Any queued item may be acked, delivered or not.
  - Heartbeat: ``desired_ttl_seconds`` is clamped into 1..3600 (0 or less gives 1), not refused: the
    reference gives no range and reports the effective TTL, which ``ttl_seconds`` carries. Without
    it the TTL is 90 s (the SDK's assumption); a value that is not an integer is a 400.
    The lease exists from the first beat; an acked item that never beats stays ``starting`` (the
    operator owns the startup timeout). A queued item (never acked, or re-queued) answers 412, so the
    SDK worker treats its lease as lost and does not stop it. Omitting ``expected_last_heartbeat``
    is an unconditional beat. Each beat returns a distinct ``last_heartbeat``.
  - A stopping item's beat is not compared and extends the lease (``state: stopping``); a stopped
    item's beat answers ``lease_extended: false``. A lease that expires puts an active item back at
    the front of the queue (state ``queued``, timestamps cleared) and stops a stopping item.
  - Stop: graceful moves starting/active to stopping; a queued item, or a second stop of a stopping
    one, goes straight to stopped; force always stops. Stopping a stopped item is a 409.
  - 409 and 412 carry ``x-should-retry: false``, so the SDK does not retry a conflict that cannot heal.
  - Stats: ``depth`` counts queued items never delivered, ``pending`` those delivered but not acked;
    ``workers_polling`` is 0 (not null) when no poll carried ``Anthropic-Worker-ID`` in 30 s.
  - Work lists are newest first and include items in every state.
Sessions
  - ``POST /v1/sessions`` takes ``agent`` (an ID string or ``{"type": "agent", "id": ...}``) and
    ``environment_id``; unknown environment: 404 ``environment_not_found``. A self_hosted
    environment gets a work item ``{"type": "session", "id": ...}``; a cloud one gets none.
    ``initial_events`` may hold ``user.message`` events, logged before the first turn.
  - A session starts playing its first turn when it is created (``sessions`` has the turn's shape).
    ``POST /_emulator/agents`` (API key) creates a scripted agent; an agent ID never created there
    plays an empty script.
  - Events: ``GET .../events`` lists oldest first (``order=desc`` newest first), ``limit`` 1..1000
    (default 100; ``events_page_cap`` may cap a page lower), ``types[]`` and ``created_at[gt|gte|lt|lte]``
    filter. ``GET .../events/stream`` sends server-sent events named by their type, only those
    logged after it attached (the SDK's runner reads the history with ``list``), a ``ping`` every 15 s,
    and ends on emulator shutdown. A fault rule ``when: after`` on ``sessions.events.stream`` cuts an
    open stream right after its first event (``drop``) or ends it with an ``error`` event.
  - ``POST .../events`` takes ``user.message``, ``user.tool_result`` and ``user.tool_confirmation``;
    every event of a request is checked before any is applied. A result or confirmation must name the
    tool_use the turn waits on; one that is unknown, already answered or not waiting is a 400 (not a
    409, which the SDK's runner would retry for the whole lease), and one request answers at most
    one tool_use. A ``user.message`` during a turn is played after it; one to a session none of whose
    work items is queued or held any more also queues a new work item.
  - Session routes take an API key, the environment key of the session's environment, or the sessions
    token of one of the session's own work items.
Requests
  - Bodies over ``max_body_bytes`` (1 MiB), invalid JSON, non-object bodies, wrong types and unknown
    fields are a 400 naming the field; unknown paths 404; wrong methods 405; never a 500. Operations
    without body parameters (delete, archive, ack, heartbeat, environment-key) take an empty body or
    ``{}``. Integer query parameters are plain ASCII decimals (``5_0`` or ``1e3`` is a 400).
  - The ``anthropic-beta`` header is accepted but not required.
  - ``EmulatorServer.requests`` counts every request received, by route name (``work.poll``,
    ``environments.retrieve``, ``emulator.faults.add``, ...; ``unmatched`` for unknown paths), faulted
    ones included: what a client cost the API, for benchmarks. In-process calls to ``state`` are not
    requests and are not counted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from environments_operator.emulator.errors import ApiError, error_type_for, invalid_request, unauthenticated
from environments_operator.emulator.faults import FaultInjector, FaultRule
from environments_operator.emulator.sessions import (
    PING_FRAME,
    STREAM_CLOSED,
    Session,
    api_error_frame,
    stream_frame,
)
from environments_operator.emulator.state import (
    DEFAULT_LEASE_TTL_SECONDS,
    MAX_EVENTS_PAGE_LIMIT,
    MAX_PAGE_LIMIT,
    MIN_LEASE_TTL_SECONDS,
    Clock,
    Credential,
    EmulatorState,
    WorkItem,
)
from environments_operator.emulator.validation import expect_object, json_type, query_bool, query_int, query_time

log = logging.getLogger("environments_operator.emulator")

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_RECLAIM_MS = 3_600_000

STATE_KEY = web.AppKey("state", EmulatorState)
FAULTS_KEY = web.AppKey("faults", FaultInjector)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
REQUESTS_KEY = web.AppKey("requests", collections.Counter[str])
# The fault rule that is to cut a stream, set by the fault middleware for the streaming handler.
STREAM_CUT_KEY = web.RequestKey("stream_cut", FaultRule)
# A quiet stream sends a ping this often, as the real API's streams do, so that proxies and clients
# see a live connection.
STREAM_PING_SECONDS = 15.0
EVENT_TYPES_QUERY = ("types", "types[]")
CREATED_AT_BOUNDS = ("gt", "gte", "lt", "lte")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENV = "/v1/environments/{environment_id}"
WORK = ENV + "/work/{work_id}"
# (method, path, route name, handler name). Fault rules name routes by these names. The literal
# work/poll and work/stats paths come before work/{work_id}, which would otherwise shadow them.
API_ROUTES: tuple[tuple[str, str, str, str], ...] = (
    ("POST", "/v1/environments", "environments.create", "create_environment"),
    ("GET", "/v1/environments", "environments.list", "list_environments"),
    ("GET", ENV, "environments.retrieve", "retrieve_environment"),
    ("POST", ENV, "environments.update", "update_environment"),
    ("DELETE", ENV, "environments.delete", "delete_environment"),
    ("POST", ENV + "/archive", "environments.archive", "archive_environment"),
    ("GET", ENV + "/work/poll", "work.poll", "poll_work"),
    ("GET", ENV + "/work/stats", "work.stats", "work_stats"),
    ("GET", ENV + "/work", "work.list", "list_work"),
    ("GET", WORK, "work.retrieve", "retrieve_work"),
    ("POST", WORK, "work.update", "update_work"),
    ("POST", WORK + "/ack", "work.ack", "ack_work"),
    ("POST", WORK + "/heartbeat", "work.heartbeat", "heartbeat_work"),
    ("POST", WORK + "/stop", "work.stop", "stop_work"),
    ("POST", "/v1/sessions", "sessions.create", "create_session"),
    ("GET", "/v1/sessions/{session_id}", "sessions.retrieve", "retrieve_session"),
    ("GET", "/v1/sessions/{session_id}/events", "sessions.events.list", "list_session_events"),
    ("POST", "/v1/sessions/{session_id}/events", "sessions.events.send", "send_session_events"),
    ("GET", "/v1/sessions/{session_id}/events/stream", "sessions.events.stream", "stream_session_events"),
)
# Routes that answer with a server-sent event stream: a fault ``when: after`` cuts the stream after
# its first event, instead of replacing a response that has long been sent.
STREAMING_ROUTES = frozenset({"sessions.events.stream"})
EMULATOR_ROUTES: tuple[tuple[str, str, str, str], ...] = (
    (
        "POST",
        "/_emulator/environments/{environment_id}/environment-key",
        "emulator.environment_key",
        "issue_environment_key",
    ),
    ("POST", "/_emulator/agents", "emulator.agents.create", "create_agent"),
    ("GET", "/_emulator/faults", "emulator.faults.list", "list_faults"),
    ("POST", "/_emulator/faults", "emulator.faults.add", "add_faults"),
    ("DELETE", "/_emulator/faults", "emulator.faults.clear", "clear_faults"),
)
ROUTE_NAMES = frozenset(name for _, _, name, _ in API_ROUTES)


def _json(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error_response(error: ApiError) -> web.Response:
    return _json(error.body(), status=error.status, headers=error.headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    limit = request.app[MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise invalid_request(f"request body is {request.content_length} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > limit:
            raise invalid_request(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if allow_empty:
            return {}
        raise invalid_request("request body: expected a JSON object, got an empty body")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise invalid_request("request body: not UTF-8 encoded") from None
    except (ValueError, RecursionError) as error:
        raise invalid_request(f"request body: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise invalid_request(f"request body: expected a JSON object, got {json_type(value)}")
    return value


async def read_no_parameters(request: web.Request, operation: str) -> None:
    """An empty body (or ``{}``) for an operation without parameters; any field is a 400 naming it."""
    body = await read_body(request, allow_empty=True)
    if body:
        raise invalid_request(f"{sorted(body)[0]}: unknown field; {operation} takes no parameters")


def credential_value(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("Authorization header: expected 'Bearer <key>'")
        return token.strip()
    return request.headers.get("x-api-key")


def _api_key(state: EmulatorState, request: web.Request) -> Credential:
    credential = state.classify(credential_value(request))
    if credential.kind != "api_key":
        raise ApiError(403, f"this endpoint takes an API key, not {credential.describe()}")
    return credential


def _page_params(request: web.Request) -> tuple[int | None, str | None]:
    limit = query_int(request.query, "limit", minimum=1, maximum=MAX_PAGE_LIMIT)
    page = request.query.get("page") or None
    return limit, page


def _page(items: Iterable[dict[str, Any]], next_page: str | None) -> web.Response:
    return _json({"data": list(items), "next_page": next_page})


class Handlers:
    """The route handlers, bound to one emulator's state and faults."""

    def __init__(self, state: EmulatorState, faults: FaultInjector) -> None:
        self.state = state
        self.faults = faults

    # ----- environments -----------------------------------------------------------------------------

    async def create_environment(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        body = await read_body(request)
        return _json(self.state.create_environment(body).to_api())

    async def list_environments(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        limit, page = _page_params(request)
        include_archived = bool(query_bool(request.query, "include_archived"))
        environments, next_page = self.state.list_environments(
            include_archived=include_archived, limit=limit, page=page
        )
        return _page((environment.to_api() for environment in environments), next_page)

    async def retrieve_environment(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        return _json(self.state.get_environment(request.match_info["environment_id"]).to_api())

    async def update_environment(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        body = await read_body(request)
        environment = self.state.update_environment(request.match_info["environment_id"], body)
        return _json(environment.to_api())

    async def delete_environment(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        await read_no_parameters(request, "delete")
        return _json(self.state.delete_environment(request.match_info["environment_id"]))

    async def archive_environment(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        await read_no_parameters(request, "archive")
        return _json(self.state.archive_environment(request.match_info["environment_id"]).to_api())

    # ----- work -------------------------------------------------------------------------------------

    def _environment_caller(self, request: web.Request, *, api_key_allowed: bool = False) -> str:
        environment_id = request.match_info["environment_id"]
        credential = self.state.classify(credential_value(request))
        self.state.authorize_environment(credential, environment_id, api_key_allowed=api_key_allowed)
        return environment_id

    def _item_caller(self, request: web.Request, *, api_key_allowed: bool = False) -> tuple[str, str]:
        environment_id = request.match_info["environment_id"]
        work_id = request.match_info["work_id"]
        credential = self.state.classify(credential_value(request))
        self.state.authorize_item(credential, environment_id, work_id, api_key_allowed=api_key_allowed)
        return environment_id, work_id

    async def poll_work(self, request: web.Request) -> web.Response:
        environment_id = self._environment_caller(request)
        block_ms = query_int(request.query, "block_ms", minimum=1, maximum=999)
        reclaim_ms = query_int(request.query, "reclaim_older_than_ms", minimum=0, maximum=MAX_RECLAIM_MS)
        item: WorkItem | None = await self.state.poll(
            environment_id,
            block_ms=block_ms,
            reclaim_ms=reclaim_ms,
            worker_id=request.headers.get("Anthropic-Worker-ID") or None,
        )
        return _json(item.to_api(with_secret=True) if item is not None else None)

    async def work_stats(self, request: web.Request) -> web.Response:
        # The SDK gives stats a workspace_id header, which only a credential spanning workspaces (an API key) uses.
        return _json(self.state.stats(self._environment_caller(request, api_key_allowed=True)))

    async def list_work(self, request: web.Request) -> web.Response:
        environment_id = self._environment_caller(request)
        limit, page = _page_params(request)
        items, next_page = self.state.list_work(environment_id, limit=limit, page=page)
        return _page((item.to_api() for item in items), next_page)

    async def retrieve_work(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        item = self.state.get_work(request.match_info["environment_id"], request.match_info["work_id"])
        return _json(item.to_api())

    async def update_work(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        body = await read_body(request)
        item = self.state.update_work(request.match_info["environment_id"], request.match_info["work_id"], body)
        return _json(item.to_api())

    async def ack_work(self, request: web.Request) -> web.Response:
        environment_id = self._environment_caller(request)
        await read_no_parameters(request, "ack")
        return _json(self.state.ack(environment_id, request.match_info["work_id"]).to_api())

    async def heartbeat_work(self, request: web.Request) -> web.Response:
        environment_id, work_id = self._item_caller(request)
        await read_no_parameters(request, "heartbeat")
        # Clamped here already, so that an integer of any length is taken; the state clamps the same way.
        desired_ttl = query_int(
            request.query,
            "desired_ttl_seconds",
            minimum=MIN_LEASE_TTL_SECONDS,
            maximum=self.state.max_lease_ttl_seconds,
            clamp=True,
        )
        expected = request.query.get("expected_last_heartbeat")
        result = self.state.heartbeat(
            environment_id, work_id, expected_last_heartbeat=expected, desired_ttl_seconds=desired_ttl
        )
        return _json(result)

    async def stop_work(self, request: web.Request) -> web.Response:
        # As for stats: the SDK's workspace_id header on stop means an API key may call it too.
        environment_id, work_id = self._item_caller(request, api_key_allowed=True)
        body = await read_body(request, allow_empty=True)
        unknown = sorted(set(body) - {"force"})
        if unknown:
            raise invalid_request(f"{unknown[0]}: unknown field; expected one of: force")
        force = body.get("force")
        if force is not None and not isinstance(force, bool):
            raise invalid_request(f"force: expected a boolean, got {json_type(force)}")
        return _json(self.state.stop(environment_id, work_id, force=bool(force)).to_api())

    # ----- sessions ---------------------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        body = await read_body(request)
        session, _ = self.state.create_session(body)
        return _json(session.to_api())

    def _session_caller(self, request: web.Request) -> Session:
        credential = self.state.classify(credential_value(request))
        session = self.state.get_session(request.match_info["session_id"])
        self.state.authorize_session(credential, session)
        return session

    async def retrieve_session(self, request: web.Request) -> web.Response:
        return _json(self._session_caller(request).to_api())

    async def list_session_events(self, request: web.Request) -> web.Response:
        session = self._session_caller(request)
        limit = query_int(request.query, "limit", minimum=1, maximum=MAX_EVENTS_PAGE_LIMIT)
        order = request.query.get("order")
        if order not in (None, "asc", "desc"):
            raise invalid_request(f"order: expected 'asc' or 'desc', got {order!r}")
        # The SDK sends a list as ``types[]=a&types[]=b``; plain ``types=a,b`` is taken too.
        given = [value for key in EVENT_TYPES_QUERY for value in request.query.getall(key, [])]
        types = [kind for value in given for kind in value.split(",") if kind]
        bounds = {bound: query_time(request.query, f"created_at[{bound}]") for bound in CREATED_AT_BOUNDS}
        events, next_page = self.state.list_events(
            session,
            limit=limit,
            page=request.query.get("page") or None,
            order=order,
            types=types,
            bounds={bound: moment for bound, moment in bounds.items() if moment is not None},
        )
        return _page(events, next_page)

    async def send_session_events(self, request: web.Request) -> web.Response:
        session = self._session_caller(request)
        return _json({"data": self.state.send_events(session, await read_body(request))})

    async def stream_session_events(self, request: web.Request) -> web.StreamResponse:
        """Live events of the session from the moment of attaching; the history is ``events.list``'s."""
        session = self._session_caller(request)
        cut: FaultRule | None = request.get(STREAM_CUT_KEY)
        player = self.state.player
        subscription = player.subscribe(session)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            while not self.state.closing:
                try:
                    event = await asyncio.wait_for(subscription.get(), STREAM_PING_SECONDS)
                except TimeoutError:
                    await response.write(PING_FRAME)
                    continue
                if event is STREAM_CLOSED:
                    break
                await response.write(stream_frame(event))
                if cut is not None:
                    log.info("injecting fault %s (%s) on an open event stream", cut.id, cut.effect)
                    if cut.effect == "drop":
                        _drop_connection(request)
                        return response
                    await response.write(api_error_frame(cut.api_error("sessions.events.stream")))
                    break
                if event["type"] in ("session.status_terminated", "session.deleted"):
                    break
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the stream has nobody to end for
        finally:
            player.unsubscribe(session, subscription)
        return response

    # ----- emulator-only ----------------------------------------------------------------------------

    async def issue_environment_key(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        await read_no_parameters(request, "environment-key")
        key = self.state.issue_environment_key(request.match_info["environment_id"])
        return _json({"environment_key": key})

    async def create_agent(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        return _json(self.state.create_agent(await read_body(request)).to_api())

    async def list_faults(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        return _json({"faults": [rule.to_api() for rule in self.faults.rules]})

    async def add_faults(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        added = self.faults.add(await read_body(request))
        return _json({"faults": [rule.to_api() for rule in added]})

    async def clear_faults(self, request: web.Request) -> web.Response:
        _api_key(self.state, request)
        self.faults.clear()
        return _json({"faults": []})


def _drop_connection(request: web.Request) -> web.Response:
    """Close the connection without an answer, as a crashed proxy or a network cut would."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp cannot write this to the aborted transport; the client sees a dropped connection.
    return web.Response(status=500)


async def _apply_fault(request: web.Request, rule: FaultRule, route: str) -> web.Response:
    log.info("injecting fault %s (%s) on %s", rule.id, rule.effect, route)
    if rule.effect == "drop":
        return _drop_connection(request)
    return _error_response(rule.api_error(route))


@web.middleware
async def count_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request.app[REQUESTS_KEY][request.match_info.route.name or "unmatched"] += 1
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return _error_response(error)
    except web.HTTPException as error:
        if error.status == 404:
            message = f"not found: no route for {request.method} {request.path}"
        elif error.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        else:
            message = error.reason
        return _error_response(ApiError(error.status, message, error_type=error_type_for(error.status)))
    except Exception:
        log.exception("unexpected error in the emulator handling %s %s", request.method, request.path)
        return _error_response(ApiError(500, "internal error in the emulator; see its log"))


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name
    if route is None or route not in ROUTE_NAMES:
        return await handler(request)
    plan = request.app[FAULTS_KEY].plan(route)
    if plan.latency_ms:
        await asyncio.sleep(plan.latency_ms / 1000)
    if plan.rule is not None and plan.rule.when == "before":
        return await _apply_fault(request, plan.rule, route)
    if plan.rule is not None and route in STREAMING_ROUTES:
        request[STREAM_CUT_KEY] = plan.rule
        return await handler(request)
    try:
        response = await handler(request)
    except ApiError as error:
        response = _error_response(error)
    if plan.rule is not None:
        return await _apply_fault(request, plan.rule, route)
    return response


def build_app(
    state: EmulatorState, faults: FaultInjector, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> web.Application:
    app = web.Application(middlewares=[count_middleware, error_middleware, fault_middleware])
    app[REQUESTS_KEY] = collections.Counter()
    app[STATE_KEY] = state
    app[FAULTS_KEY] = faults
    app[MAX_BODY_KEY] = max_body_bytes
    handlers = Handlers(state, faults)
    for method, path, name, handler_name in (*API_ROUTES, *EMULATOR_ROUTES):
        app.router.add_route(method, path, getattr(handlers, handler_name), name=name)
    return app


def load_faults(document: object) -> FaultInjector:
    """A fault injector for the API routes, primed with ``document`` (a ``{"faults": [...]}`` object)."""
    injector = FaultInjector(routes=ROUTE_NAMES)
    if document is not None:
        if isinstance(document, list):
            document = {"faults": document}
        injector.add(expect_object(document, "faults document"))
    return injector


class EmulatorServer:
    """The emulator served on ``host:port`` (port 0 picks a free one) inside the running loop.

    ```py
    async with EmulatorServer(api_keys=["sk-test"]) as emulator:
        client = AsyncAnthropic(base_url=emulator.base_url, api_key="sk-test")
    ```

    ``state`` gives tests direct access (issue keys, enqueue sessions, expire leases) and ``faults``
    the active fault rules. ``clock`` (monotonic seconds) defaults to the loop's time.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] | None = None,
        faults: object = None,
        clock: Clock | None = None,
        default_lease_ttl_seconds: int = DEFAULT_LEASE_TTL_SECONDS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        access_log: bool = False,
        events_page_cap: int = MAX_EVENTS_PAGE_LIMIT,
    ) -> None:
        self.host = host
        self.port = port
        self.state = EmulatorState(
            clock=clock,
            api_keys=api_keys,
            default_lease_ttl_seconds=default_lease_ttl_seconds,
            events_page_cap=events_page_cap,
        )
        self.faults = load_faults(faults)
        self.app = build_app(self.state, self.faults, max_body_bytes=max_body_bytes)
        self._access_log = access_log
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests received so far, by route name (``unmatched``: no route); live, copy it to snapshot."""
        return self.app[REQUESTS_KEY]

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        """Start serving; returns the base URL (with the real port when port 0 was asked)."""
        runner = web.AppRunner(
            self.app,
            access_log=log.getChild("access") if self._access_log else None,
            shutdown_timeout=5.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        return self.base_url

    async def stop(self) -> None:
        """Answer pending long-polls with null, then close the listener and connections."""
        self.state.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
