"""In-memory state of the emulator: environments, credentials, sessions and per-environment work queues.

This is where the semantics of the Environments API live (see ``server`` for the list of decisions):
the work-item state machine (queued -> starting -> active -> stopping -> stopped), delivery and
reclaim of un-acked items, heartbeat leases and their expiry, and the credentials the emulator issued.
Every operation validates first and mutates after, so a rejected call changes nothing.

Time comes from an injectable ``clock`` (seconds, monotonic; by default the running loop's time, so
looptime's virtual time drives leases and reclaims). Long-polls wait on one future per poller, woken
one per new item, never by sleep-polling. This module knows nothing of HTTP; it may not import aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from environments_operator.emulator import validation
from environments_operator.emulator.errors import (
    ApiError,
    conflict,
    forbidden,
    invalid_request,
    not_found,
    unauthenticated,
)
from environments_operator.emulator.sessions import Event, ScriptedAgent, Session, SessionPlayer, parse_agent

Clock = Callable[[], float]
WorkState = Literal["queued", "starting", "active", "stopping", "stopped"]

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LENGTH = 24
# Credentials the emulator issues carry a recognisable prefix, so that a stale or mistyped one is
# rejected as such instead of being mistaken for an API key.
ENVIRONMENT_KEY_PREFIX = "sk-ant-envkey-"
SESSIONS_TOKEN_PREFIX = "sk-ant-sesstok-"
NO_HEARTBEAT = "NO_HEARTBEAT"
DEFAULT_RECLAIM_MS = 5000
# The SDK assumes a 90 s lease until the first heartbeat response says otherwise.
DEFAULT_LEASE_TTL_SECONDS = 90
MIN_LEASE_TTL_SECONDS = 1
MAX_LEASE_TTL_SECONDS = 3600
WORKERS_POLLING_WINDOW_SECONDS = 30.0
DEFAULT_PAGE_LIMIT = 20
MAX_PAGE_LIMIT = 100
DEFAULT_AGENT_MODEL = "claude-sonnet-4-5"
DEFAULT_EVENTS_PAGE_LIMIT = 100
# The SDK's session runner reads a session's history with limit=1000.
MAX_EVENTS_PAGE_LIMIT = 1000
# The reference defaults a missing scope "based on organization type", and its example responses show
# "organization" on cloud and self_hosted environments alike; the emulator has one organization type.
DEFAULT_SCOPE = "organization"

T = TypeVar("T")


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_id(prefix: str) -> str:
    return f"{prefix}{random_base62(ID_LENGTH)}"


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def loop_time() -> float:
    """The running loop's clock (virtual under looptime), or the monotonic clock outside a loop."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


@dataclass
class Environment:
    id: str
    seq: int
    name: str
    description: str
    config: dict[str, Any]
    metadata: dict[str, str]
    scope: str
    created_at: str
    updated_at: str
    archived_at: str | None = None
    queue: WorkQueue = field(default_factory=lambda: WorkQueue())

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "archived_at": self.archived_at,
            "config": self.config,
            "created_at": self.created_at,
            "description": self.description,
            "metadata": dict(self.metadata),
            "name": self.name,
            "scope": self.scope,
            "type": "environment",
            "updated_at": self.updated_at,
        }


@dataclass
class WorkItem:
    id: str
    seq: int
    environment_id: str
    session_id: str
    created_at: str
    sessions_token: str
    metadata: dict[str, str] = field(default_factory=dict)
    state: WorkState = "queued"
    acknowledged_at: str | None = None
    started_at: str | None = None
    latest_heartbeat_at: str | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    # Clock time of the last delivery to a poller while un-acked; None when never delivered.
    delivered_at: float | None = None
    delivery_count: int = 0
    lease_ttl_seconds: int = 0
    lease_expires_at: float | None = None
    lease_timer: asyncio.TimerHandle | None = None
    last_beat: datetime | None = None

    @property
    def secret(self) -> str:
        """The per-item payload handed out with the poll response: base64url JSON, no padding."""
        payload = json.dumps({"sessions_token": self.sessions_token, "work_id": self.id}).encode()
        return base64.urlsafe_b64encode(payload).rstrip(b"=").decode()

    def to_api(self, *, with_secret: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "acknowledged_at": self.acknowledged_at,
            "created_at": self.created_at,
            "data": {"id": self.session_id, "type": "session"},
            "environment_id": self.environment_id,
            "latest_heartbeat_at": self.latest_heartbeat_at,
            "metadata": dict(self.metadata),
            "started_at": self.started_at,
            "state": self.state,
            "stop_requested_at": self.stop_requested_at,
            "stopped_at": self.stopped_at,
            "type": "work",
        }
        if with_secret:
            body["secret"] = self.secret
        return body

    def lease_state(self) -> dict[str, Any]:
        """The lease as the server holds it (``BetaWorkLeaseState``), for 412 responses."""
        return {
            "last_heartbeat": self.latest_heartbeat_at,
            "lease_extended": False,
            "state": self.state,
            "ttl_seconds": self.lease_ttl_seconds if self.lease_expires_at is not None else 0,
        }


class WorkQueue:
    """The queued items of one environment, in delivery order, and the pollers waiting on them."""

    def __init__(self) -> None:
        self.queued: OrderedDict[str, WorkItem] = OrderedDict()
        self.leased: set[str] = set()
        self.workers_seen: dict[str, float] = {}
        # An insertion-ordered set of futures: wake the longest waiter first, drop timed-out ones in O(1).
        self._waiters: dict[asyncio.Future[None], None] = {}

    def push(self, item: WorkItem, *, front: bool = False) -> None:
        self.queued[item.id] = item
        if front:
            self.queued.move_to_end(item.id, last=False)
        self.wake(1)

    def discard(self, item: WorkItem) -> None:
        self.queued.pop(item.id, None)

    def claimable(self, now: float, reclaim_seconds: float) -> tuple[WorkItem | None, float | None]:
        """The first item a poller may take now, else when the next pending item becomes reclaimable."""
        next_eligible: float | None = None
        for item in self.queued.values():
            if item.delivered_at is None:
                return item, None
            eligible_at = item.delivered_at + reclaim_seconds
            if now >= eligible_at:
                return item, None
            if next_eligible is None or eligible_at < next_eligible:
                next_eligible = eligible_at
        return None, next_eligible

    async def wait(self, seconds: float) -> None:
        """Wait until woken or ``seconds`` pass, whichever is first."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = None
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # A wake-up meant for this poller must not die with it: pass it on.
            if waiter.done() and not waiter.cancelled():
                self.wake(1)
            raise
        finally:
            self._waiters.pop(waiter, None)

    def wake(self, count: int) -> None:
        while count > 0 and self._waiters:
            waiter = next(iter(self._waiters))
            del self._waiters[waiter]
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def wake_all(self) -> None:
        self.wake(len(self._waiters))

    @property
    def waiting(self) -> int:
        return len(self._waiters)


@dataclass(frozen=True)
class Credential:
    """Who is calling, as classified from the credential's value."""

    kind: Literal["api_key", "environment_key", "sessions_token"]
    environment_id: str | None = None
    work_id: str | None = None

    def describe(self) -> str:
        return {
            "api_key": "an API key",
            "environment_key": "an environment key",
            "sessions_token": "a work item's sessions token",
        }[self.kind]


def encode_cursor(seq: int) -> str:
    return "page_" + base64.urlsafe_b64encode(str(seq).encode()).decode()


def decode_cursor(page: str) -> int:
    try:
        if not page.startswith("page_"):
            raise ValueError(page)
        return int(base64.urlsafe_b64decode(page[len("page_") :].encode()).decode(), 10)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise invalid_request(f"page: {page!r} is not a cursor this API returned; pass a next_page value") from None


def _within(processed_at: str, bounds: Mapping[str, datetime]) -> bool:
    """Whether an event's time passes the ``created_at[gt|gte|lt|lte]`` bounds of an events list."""
    moment = datetime.fromisoformat(processed_at)
    checks = {
        "gt": lambda bound: moment > bound,
        "gte": lambda bound: moment >= bound,
        "lt": lambda bound: moment < bound,
        "lte": lambda bound: moment <= bound,
    }
    return all(checks[operator](bound) for operator, bound in bounds.items())


def paginate(
    newest_first: Iterable[T], seq_of: Callable[[T], int], *, limit: int | None, page: str | None
) -> tuple[list[T], str | None]:
    """One page of ``newest_first`` after the cursor ``page``, and the cursor of the next page."""
    size = limit or DEFAULT_PAGE_LIMIT
    after = decode_cursor(page) if page else None
    selected: list[T] = []
    more = False
    for entry in newest_first:
        if after is not None and seq_of(entry) >= after:
            continue
        if len(selected) == size:
            more = True
            break
        selected.append(entry)
    next_page = encode_cursor(seq_of(selected[-1])) if more and selected else None
    return selected, next_page


class EmulatorState:
    """All state of one emulator instance, and the operations of the API on it."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        api_keys: Iterable[str] | None = None,
        default_lease_ttl_seconds: int = DEFAULT_LEASE_TTL_SECONDS,
        max_lease_ttl_seconds: int = MAX_LEASE_TTL_SECONDS,
        workers_polling_window_seconds: float = WORKERS_POLLING_WINDOW_SECONDS,
        events_page_cap: int = MAX_EVENTS_PAGE_LIMIT,
    ) -> None:
        self.clock: Clock = clock or loop_time
        allowed = [key for key in (api_keys or ()) if key]
        self.api_keys: frozenset[str] | None = frozenset(allowed) if allowed else None
        self.default_lease_ttl_seconds = default_lease_ttl_seconds
        self.max_lease_ttl_seconds = max_lease_ttl_seconds
        self.workers_polling_window_seconds = workers_polling_window_seconds
        # A page of session events never holds more than this, whatever ``limit`` asks, as a server
        # that caps its pages would do; tests lower it to make short histories span pages.
        self.events_page_cap = events_page_cap
        self.environments: dict[str, Environment] = {}
        self.sessions: dict[str, Session] = {}
        self.agents: dict[str, ScriptedAgent] = {}
        self.player = SessionPlayer(new_event_id=lambda: new_id("sevt_"), timestamp=self.timestamp)
        self.work: dict[str, WorkItem] = {}
        self.environment_keys: dict[str, str] = {}  # key -> environment id
        self.sessions_tokens: dict[str, str] = {}  # token -> work id
        self.closing = False
        self._seq = 0
        # Anchored at first use, so that the clock is read inside the loop that will drive it.
        self._clock_anchor: float | None = None
        self._wall_anchor = datetime.now(UTC)

    # ----- time -------------------------------------------------------------------------------------

    def wall_now(self) -> datetime:
        """Wall-clock time that advances with ``clock``, so virtual time also moves timestamps."""
        now = self.clock()
        if self._clock_anchor is None:
            self._clock_anchor = now
            self._wall_anchor = datetime.now(UTC)
        return self._wall_anchor + timedelta(seconds=now - self._clock_anchor)

    def timestamp(self) -> str:
        return rfc3339(self.wall_now())

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ----- credentials ------------------------------------------------------------------------------

    def classify(self, value: str | None) -> Credential:
        """Classify a credential by its value: the emulator issued every environment key and token."""
        if not value:
            raise unauthenticated(
                "missing credentials: send an API key in x-api-key, or a key as Authorization: Bearer <key>"
            )
        environment_id = self.environment_keys.get(value)
        if environment_id is not None:
            return Credential("environment_key", environment_id=environment_id)
        work_id = self.sessions_tokens.get(value)
        if work_id is not None:
            return Credential("sessions_token", environment_id=self.work[work_id].environment_id, work_id=work_id)
        if value.startswith(ENVIRONMENT_KEY_PREFIX):
            raise unauthenticated("invalid environment key: it is unknown or its environment was deleted")
        if value.startswith(SESSIONS_TOKEN_PREFIX):
            raise unauthenticated("invalid sessions token: it is unknown or its work item was deleted")
        if self.api_keys is not None and value not in self.api_keys:
            raise unauthenticated("invalid API key")
        return Credential("api_key")

    def issue_environment_key(self, environment_id: str) -> str:
        environment = self.get_environment(environment_id)
        if environment.config["type"] != "self_hosted":
            raise invalid_request(
                f"environment {environment_id} is a {environment.config['type']} environment; "
                "environment keys exist only for self_hosted environments"
            )
        key = ENVIRONMENT_KEY_PREFIX + random_base62(40)
        self.environment_keys[key] = environment_id
        return key

    # ----- environments -----------------------------------------------------------------------------

    def get_environment(self, environment_id: str) -> Environment:
        environment = self.environments.get(environment_id)
        if environment is None:
            raise not_found(f"environment {environment_id!r} not found")
        return environment

    def create_environment(self, body: Mapping[str, Any]) -> Environment:
        validation.reject_unknown_fields(body, ("name", "config", "description", "metadata", "scope"), "")
        if body.get("name") is None:
            raise invalid_request("name: required")
        name = validation.string_value(body["name"], "name", max_length=validation.NAME_MAX_LENGTH)
        description = validation.optional_string(body, "description", "", max_length=validation.DESCRIPTION_MAX_LENGTH)
        config = validation.environment_config(body.get("config"), "config", None)
        metadata = validation.metadata(body.get("metadata"), "metadata")
        scope = validation.scope(body.get("scope"), "scope") or DEFAULT_SCOPE
        now = self.timestamp()
        environment = Environment(
            id=new_id("env_"),
            seq=self._next_seq(),
            name=name,
            description=description or "",
            config=config,
            metadata=metadata,
            scope=scope,
            created_at=now,
            updated_at=now,
        )
        self.environments[environment.id] = environment
        return environment

    def update_environment(self, environment_id: str, body: Mapping[str, Any]) -> Environment:
        environment = self.get_environment(environment_id)
        validation.reject_unknown_fields(body, ("name", "config", "description", "metadata", "scope"), "")
        if environment.archived_at is not None:
            raise invalid_request(f"environment {environment_id} is archived; archived environments are read-only")
        name = validation.optional_string(body, "name", "", max_length=validation.NAME_MAX_LENGTH, allow_empty=False)
        description = validation.optional_string(body, "description", "", max_length=validation.DESCRIPTION_MAX_LENGTH)
        config = validation.environment_config(body.get("config"), "config", environment.config)
        metadata = environment.metadata
        if body.get("metadata") is not None:
            patch = validation.metadata_patch(body["metadata"], "metadata")
            metadata = validation.apply_metadata_patch(environment.metadata, patch, "metadata", empty_deletes=True)
        scope = validation.scope(body.get("scope"), "scope") or environment.scope
        # Everything is validated; only now change the environment.
        environment.name = name if name is not None else environment.name
        environment.description = description if description is not None else environment.description
        environment.config = config
        environment.metadata = metadata
        environment.scope = scope
        environment.updated_at = self.timestamp()
        return environment

    def archive_environment(self, environment_id: str) -> Environment:
        environment = self.get_environment(environment_id)
        if environment.archived_at is None:
            environment.archived_at = environment.updated_at = self.timestamp()
        return environment

    def delete_environment(self, environment_id: str) -> dict[str, str]:
        environment = self.get_environment(environment_id)
        del self.environments[environment_id]
        for work_id in [item.id for item in self.work.values() if item.environment_id == environment_id]:
            item = self.work.pop(work_id)
            self._cancel_lease(item)
            self.sessions_tokens.pop(item.sessions_token, None)
        for key in [key for key, owner in self.environment_keys.items() if owner == environment_id]:
            del self.environment_keys[key]
        environment.queue.wake_all()
        return {"id": environment_id, "type": "environment_deleted"}

    def list_environments(
        self, *, include_archived: bool, limit: int | None, page: str | None
    ) -> tuple[list[Environment], str | None]:
        visible = (
            environment
            for environment in reversed(self.environments.values())
            if include_archived or environment.archived_at is None
        )
        return paginate(visible, lambda environment: environment.seq, limit=limit, page=page)

    # ----- sessions ---------------------------------------------------------------------------------

    def create_session(self, body: Mapping[str, Any]) -> tuple[Session, WorkItem | None]:
        validation.reject_unknown_fields(
            body,
            ("agent", "environment_id", "metadata", "title", "budget", "initial_events", "resources", "vault_ids"),
            "",
        )
        agent = self._agent_snapshot(body.get("agent"))
        if body.get("environment_id") is None:
            raise invalid_request("environment_id: required")
        environment_id = validation.string_value(body["environment_id"], "environment_id", max_length=128)
        metadata = validation.metadata(body.get("metadata"), "metadata")
        title = validation.optional_string(body, "title", "", max_length=validation.NAME_MAX_LENGTH)
        environment = self.environments.get(environment_id)
        if environment is None:
            raise not_found(f"environment {environment_id!r} not found", error_code="environment_not_found")
        if environment.archived_at is not None:
            raise invalid_request(
                f"environment_id: environment {environment_id} is archived and cannot take new sessions"
            )
        now = self.timestamp()
        scripted = self.agents.get(agent["id"])
        session = Session(
            id=new_id("session_"),
            environment_id=environment_id,
            agent=agent,
            metadata=metadata,
            title=title,
            created_at=now,
            updated_at=now,
            script=scripted.script if scripted is not None else (),
            reply=scripted.reply if scripted is not None else "",
        )
        initial = self._initial_messages(session, body.get("initial_events"))
        self.sessions[session.id] = session
        item = self.enqueue_work(session) if environment.config["type"] == "self_hosted" else None
        for message in initial:
            self.player.emit(session, message["type"], content=message["content"])
        # The session starts on its first turn, as one created with a first message would.
        self.player.start_turn(session)
        return session, item

    def _initial_messages(self, session: Session, value: object) -> list[Event]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise invalid_request(f"initial_events: expected an array of events, got {validation.json_type(value)}")
        messages = []
        for index, entry in enumerate(value):
            where = f"initial_events[{index}]"
            if not isinstance(entry, dict) or entry.get("type") != "user.message":
                raise invalid_request(f"{where}.type: the emulator takes only user.message initial events")
            messages.append(self.player.check_sendable(session, entry, where))
        return messages

    # ----- scripted agents and session events -------------------------------------------------------

    def create_agent(self, body: Mapping[str, Any]) -> ScriptedAgent:
        name, script, reply = parse_agent(body)
        agent_id = new_id("agent_")
        agent = ScriptedAgent(id=agent_id, name=name or agent_id, script=script, reply=reply)
        self.agents[agent.id] = agent
        return agent

    def send_events(self, session: Session, body: Mapping[str, Any]) -> list[Event]:
        """Apply what a client sends (``sessions.events.send``): all of it, or none of it with a 4xx."""
        validation.reject_unknown_fields(body, ("events",), "")
        events = body.get("events")
        if not isinstance(events, list) or not events:
            raise invalid_request("events: required, a non-empty array of events")
        checked = [self.player.check_sendable(session, event, f"events[{index}]") for index, event in enumerate(events)]
        self.player.reject_several_answers(checked)
        stored = [self.player.apply_sent(session, event) for event in checked]
        environment = self.environments.get(session.environment_id)
        dormant = any(event["type"] == "user.message" for event in checked) and not self._held(session)
        if dormant and environment is not None and environment.config["type"] == "self_hosted":
            # "Work is queued when long-dormant sessions receive new messages." (A session whose
            # environment was deleted keeps its log, but nothing can serve it any more.)
            self.enqueue_work(session)
        return stored

    def _held(self, session: Session) -> bool:
        """Whether a work item of the session is still queued or held by a worker."""
        return any(item.session_id == session.id and item.state != "stopped" for item in self.work.values())

    def list_events(
        self,
        session: Session,
        *,
        limit: int | None,
        page: str | None,
        order: str | None,
        types: Sequence[str],
        bounds: Mapping[str, datetime],
    ) -> tuple[list[Event], str | None]:
        """One page of the session's events in ``order`` (``asc`` by default), filtered by type and time."""
        positions: Iterable[int] = range(len(session.events))
        if order == "desc":
            positions = reversed(range(len(session.events)))
        after = decode_cursor(page) if page else None
        size = min(limit or DEFAULT_EVENTS_PAGE_LIMIT, self.events_page_cap)
        selected: list[Event] = []
        last_position = -1
        for position in positions:
            if after is not None and (position <= after if order != "desc" else position >= after):
                continue
            event = session.events[position]
            if types and event["type"] not in types:
                continue
            if not _within(event["processed_at"], bounds):
                continue
            if len(selected) == size:
                return selected, encode_cursor(last_position)
            selected.append(event)
            last_position = position
        return selected, None

    @staticmethod
    def _agent_snapshot(value: object) -> dict[str, Any]:
        if value is None:
            raise invalid_request('agent: required; pass an agent ID or {"type": "agent", "id": ...}')
        version = 1
        if isinstance(value, str):
            agent_id = validation.string_value(value, "agent", max_length=128)
        else:
            agent = validation.expect_object(value, "agent")
            agent_type = agent.get("type")
            if agent_type not in ("agent", "agent_with_overrides"):
                raise invalid_request(
                    f"agent.type: unknown agent reference type {agent_type!r}; "
                    "expected 'agent' or 'agent_with_overrides'"
                )
            if agent.get("id") is None:
                raise invalid_request("agent.id: required")
            agent_id = validation.string_value(agent["id"], "agent.id", max_length=128)
            given_version = agent.get("version")
            if given_version is not None:
                if isinstance(given_version, bool) or not isinstance(given_version, int) or given_version < 1:
                    raise invalid_request("agent.version: expected a positive integer")
                version = given_version
        return {
            "id": agent_id,
            "type": "agent",
            "version": version,
            "name": agent_id,
            "description": None,
            "execution_identity": {"type": "service_account"},
            "mcp_servers": [],
            "model": {"id": DEFAULT_AGENT_MODEL},
            "multiagent": None,
            "skills": [],
            "system": None,
            "tools": [],
        }

    def get_session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise not_found(f"session {session_id!r} not found")
        return session

    def enqueue_work(self, session: Session) -> WorkItem:
        """Queue a work item for ``session`` (on creation, or when a dormant session gets a message)."""
        environment = self.get_environment(session.environment_id)
        item = WorkItem(
            id=new_id("work_"),
            seq=self._next_seq(),
            environment_id=environment.id,
            session_id=session.id,
            created_at=self.timestamp(),
            sessions_token=SESSIONS_TOKEN_PREFIX + random_base62(40),
        )
        self.work[item.id] = item
        self.sessions_tokens[item.sessions_token] = item.id
        environment.queue.push(item)
        return item

    # ----- work: lookup and leases ------------------------------------------------------------------

    def get_work(self, environment_id: str, work_id: str) -> WorkItem:
        environment = self.get_environment(environment_id)
        item = self.work.get(work_id)
        if item is None or item.environment_id != environment.id:
            raise not_found(f"work item {work_id!r} not found in environment {environment_id}")
        self._expire_if_due(item)
        return item

    def _expire_due(self, environment: Environment) -> None:
        for work_id in list(environment.queue.leased):
            self._expire_if_due(self.work[work_id])

    def _expire_if_due(self, item: WorkItem) -> None:
        if item.lease_expires_at is not None and self.clock() >= item.lease_expires_at:
            self._expire_lease(item)

    def _expire_lease(self, item: WorkItem) -> None:
        """A lease ran out without a heartbeat: the item goes back to the queue (or stops, if stopping)."""
        self._cancel_lease(item)
        environment = self.environments[item.environment_id]
        if item.state == "stopping":
            item.state = "stopped"
            item.stopped_at = self.timestamp()
            return
        item.state = "queued"
        item.acknowledged_at = item.started_at = item.latest_heartbeat_at = None
        item.last_beat = None
        item.delivered_at = None
        # It was ahead of everything queued since, so it goes back to the front.
        environment.queue.push(item, front=True)

    def _cancel_lease(self, item: WorkItem) -> None:
        if item.lease_timer is not None:
            item.lease_timer.cancel()
            item.lease_timer = None
        item.lease_expires_at = None
        environment = self.environments.get(item.environment_id)
        if environment is not None:
            environment.queue.leased.discard(item.id)

    def _schedule_lease(self, item: WorkItem, ttl_seconds: int) -> None:
        if item.lease_timer is not None:
            item.lease_timer.cancel()
        item.lease_ttl_seconds = ttl_seconds
        item.lease_expires_at = self.clock() + ttl_seconds
        self.environments[item.environment_id].queue.leased.add(item.id)
        item.lease_timer = asyncio.get_running_loop().call_later(ttl_seconds, self._lease_timer_fired, item.id)

    def _lease_timer_fired(self, work_id: str) -> None:
        item = self.work.get(work_id)
        if item is None or item.lease_expires_at is None:
            return
        item.lease_timer = None
        remaining = item.lease_expires_at - self.clock()
        if remaining <= 0:
            self._expire_lease(item)
        else:
            # An injected clock may run slower than the loop's; check again when it should be due.
            item.lease_timer = asyncio.get_running_loop().call_later(remaining, self._lease_timer_fired, work_id)

    def expire_lease(self, work_id: str) -> WorkItem:
        """Test helper: let the lease of ``work_id`` run out now, as if its holder had gone silent."""
        item = self.work[work_id]
        if item.state not in ("starting", "active", "stopping"):
            raise ValueError(f"work item {work_id} is {item.state}; it holds no lease")
        self._expire_lease(item)
        return item

    # ----- work: the API operations -----------------------------------------------------------------

    async def poll(
        self, environment_id: str, *, block_ms: int | None, reclaim_ms: int | None, worker_id: str | None
    ) -> WorkItem | None:
        environment = self.get_environment(environment_id)
        queue = environment.queue
        if worker_id:
            queue.workers_seen[worker_id] = self.clock()
        reclaim_seconds = (DEFAULT_RECLAIM_MS if reclaim_ms is None else reclaim_ms) / 1000
        # How long to block is measured on the loop, which an injected clock may not drive.
        loop = asyncio.get_running_loop()
        block_deadline = loop.time() + (block_ms or 0) / 1000
        while True:
            if self.environments.get(environment_id) is not environment:
                raise not_found(f"environment {environment_id!r} not found")
            self._expire_due(environment)
            now = self.clock()
            item, next_eligible = queue.claimable(now, reclaim_seconds)
            if item is not None:
                item.delivered_at = now
                item.delivery_count += 1
                return item
            remaining = block_deadline - loop.time()
            if remaining <= 0 or self.closing:
                return None
            if next_eligible is not None:
                remaining = min(remaining, max(next_eligible - now, 0.0))
            await queue.wait(remaining)

    def ack(self, environment_id: str, work_id: str) -> WorkItem:
        item = self.get_work(environment_id, work_id)
        if item.state == "starting":
            # Idempotent: a retried ack whose first response was lost must not strand the item.
            return item
        if item.state != "queued":
            raise conflict(f"work item {work_id} is {item.state}; only a queued item can be acknowledged")
        self.environments[environment_id].queue.discard(item)
        item.state = "starting"
        item.acknowledged_at = self.timestamp()
        item.delivered_at = None
        return item

    def _beat_timestamp(self, item: WorkItem) -> str:
        # Each beat must yield a distinct value, or a stale holder could pass the precondition.
        moment = self.wall_now()
        if item.last_beat is not None and moment <= item.last_beat:
            moment = item.last_beat + timedelta(microseconds=1)
        item.last_beat = moment
        return rfc3339(moment)

    def heartbeat(
        self,
        environment_id: str,
        work_id: str,
        *,
        expected_last_heartbeat: str | None,
        desired_ttl_seconds: int | None,
    ) -> dict[str, Any]:
        item = self.get_work(environment_id, work_id)
        # The reference gives no range and answers with the effective TTL: clamp what is asked, never refuse it.
        asked = self.default_lease_ttl_seconds if desired_ttl_seconds is None else desired_ttl_seconds
        ttl = max(MIN_LEASE_TTL_SECONDS, min(asked, self.max_lease_ttl_seconds))
        if item.state == "stopped":
            return {
                "last_heartbeat": item.latest_heartbeat_at or item.stopped_at or self.timestamp(),
                "lease_extended": False,
                "state": item.state,
                "ttl_seconds": 0,
                "type": "work_heartbeat",
            }
        if item.state in ("starting", "active"):
            current = item.latest_heartbeat_at or NO_HEARTBEAT
            if expected_last_heartbeat is not None and expected_last_heartbeat != current:
                raise self._precondition_failed(item, expected_last_heartbeat)
        elif item.state == "queued":
            # The lease belongs to the queue (never acked, or re-queued after it expired).
            raise self._precondition_failed(item, expected_last_heartbeat)
        # The precondition is not compared once the item is stopping, as the SDK documents.
        beat = self._beat_timestamp(item)
        item.latest_heartbeat_at = beat
        if item.state == "starting":
            item.state = "active"
            item.started_at = beat
        self._schedule_lease(item, ttl)
        return {
            "last_heartbeat": beat,
            "lease_extended": True,
            "state": item.state,
            "ttl_seconds": ttl,
            "type": "work_heartbeat",
        }

    @staticmethod
    def _precondition_failed(item: WorkItem, expected: str | None) -> ApiError:
        stored = item.latest_heartbeat_at or NO_HEARTBEAT
        if item.state == "queued":
            reason = f"work item {item.id} is queued: its lease was released to the queue"
        else:
            reason = f"expected_last_heartbeat {expected!r} does not match the stored heartbeat {stored!r}"
        return ApiError(
            412,
            f"{reason}; another worker may hold the lease",
            details={"error_code": "heartbeat_precondition_failed", "current_state": item.lease_state()},
            headers={"x-should-retry": "false"},
        )

    def stop(self, environment_id: str, work_id: str, *, force: bool) -> WorkItem:
        item = self.get_work(environment_id, work_id)
        if item.state == "stopped":
            raise conflict(f"work item {work_id} is already stopped")
        now = self.timestamp()
        if force or item.state in ("queued", "stopping"):
            # Nobody is running a queued item, and a second stop finishes a graceful one.
            self.environments[environment_id].queue.discard(item)
            self._cancel_lease(item)
            item.state = "stopped"
            item.stop_requested_at = item.stop_requested_at or now
            item.stopped_at = now
            item.delivered_at = None
        else:
            item.state = "stopping"
            item.stop_requested_at = now
        return item

    def update_work(self, environment_id: str, work_id: str, body: Mapping[str, Any]) -> WorkItem:
        item = self.get_work(environment_id, work_id)
        validation.reject_unknown_fields(body, ("metadata",), "")
        if body.get("metadata") is None:
            return item
        patch = validation.metadata_patch(body["metadata"], "metadata")
        item.metadata = validation.apply_metadata_patch(item.metadata, patch, "metadata", empty_deletes=False)
        return item

    def list_work(
        self, environment_id: str, *, limit: int | None, page: str | None
    ) -> tuple[list[WorkItem], str | None]:
        environment = self.get_environment(environment_id)
        self._expire_due(environment)
        items: Sequence[WorkItem] = [item for item in self.work.values() if item.environment_id == environment_id]
        return paginate(reversed(items), lambda item: item.seq, limit=limit, page=page)

    def stats(self, environment_id: str) -> dict[str, Any]:
        environment = self.get_environment(environment_id)
        self._expire_due(environment)
        queue = environment.queue
        queued = list(queue.queued.values())
        horizon = self.clock() - self.workers_polling_window_seconds
        for worker_id in [worker for worker, seen in queue.workers_seen.items() if seen < horizon]:
            del queue.workers_seen[worker_id]
        oldest = min(queued, key=lambda item: item.seq) if queued else None
        return {
            "depth": sum(1 for item in queued if item.delivered_at is None),
            "oldest_queued_at": oldest.created_at if oldest is not None else None,
            "pending": sum(1 for item in queued if item.delivered_at is not None),
            "type": "work_queue_stats",
            "workers_polling": len(queue.workers_seen),
        }

    # ----- authorization ----------------------------------------------------------------------------

    def authorize_environment(
        self, credential: Credential, environment_id: str, *, api_key_allowed: bool = False
    ) -> None:
        """Poll, ack, list and stats: the environment key of this environment only, or for stats an API key."""
        if api_key_allowed and credential.kind == "api_key":
            return
        if credential.kind != "environment_key":
            accepted = f"the environment key of {environment_id}" + (" or an API key" if api_key_allowed else "")
            raise forbidden(f"this endpoint takes {accepted}, not {credential.describe()}")
        if credential.environment_id != environment_id:
            raise forbidden(f"this environment key belongs to another environment, not {environment_id}")

    def authorize_item(
        self, credential: Credential, environment_id: str, work_id: str, *, api_key_allowed: bool = False
    ) -> None:
        """Heartbeat and stop: the environment key or this very work item's sessions token; stop also an API key."""
        if credential.kind == "sessions_token":
            if credential.work_id != work_id or credential.environment_id != environment_id:
                raise forbidden(f"this sessions token belongs to another work item, not {work_id}")
            return
        self.authorize_environment(credential, environment_id, api_key_allowed=api_key_allowed)

    def authorize_session(self, credential: Credential, session: Session) -> None:
        """Session retrieval and events: an API key, the environment's key, or the token of one of its items."""
        if credential.kind == "api_key":
            return
        if credential.environment_id != session.environment_id:
            raise forbidden(f"this credential does not grant access to session {session.id}")
        if credential.kind == "sessions_token" and self.work[credential.work_id or ""].session_id != session.id:
            raise forbidden(f"this sessions token does not grant access to session {session.id}")

    def close(self) -> None:
        """Stop the long-polls (they answer null) and the lease timers."""
        self.closing = True
        for environment in self.environments.values():
            environment.queue.wake_all()
        for session in self.sessions.values():
            self.player.close_streams(session)
        for item in self.work.values():
            if item.lease_timer is not None:
                item.lease_timer.cancel()
                item.lease_timer = None
