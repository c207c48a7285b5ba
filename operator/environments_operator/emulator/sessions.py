"""Sessions of the emulator: scripted agents, each session's event log, and the turns it plays.

A scripted agent (``POST /_emulator/agents``) is a list of tool steps of the SDK's agent toolset and a
final reply. A session plays its agent's script as one turn, with the event types and shapes of the
SDK's ``BetaManagedAgents*Event`` models:

- ``session.status_running``;
- per step, an ``agent.tool_use`` and then ``session.status_idle`` with stop reason
  ``requires_action`` naming it: the session waits for the client that runs the sandbox's tools
  (a self_hosted worker) to send the matching ``user.tool_result``, then runs again;
- ``agent.message`` with the reply, and ``session.status_idle`` with stop reason ``end_turn``.

A step with ``permission: ask`` is gated: its tool_use carries ``evaluated_permission: ask`` and waits
for a ``user.tool_confirmation``; ``allow`` then waits for the result, ``deny`` resolves the step
without one. A step with ``permission: deny`` is refused by the "server" and needs nothing.
A ``user.message`` starts another turn (the script again): at once when the session is idle, after
the current turn when it is running.

This module owns the log and the turn state machine of one session, and the live subscribers of its
event stream. It knows nothing of HTTP, work items or credentials (``state`` queues work for dormant
sessions); it may not import aiohttp.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from environments_operator.emulator import validation
from environments_operator.emulator.errors import ApiError, invalid_request

# The tools of the SDK's agent toolset (``anthropic.lib.tools.agent_toolset``), which a worker runs.
TOOLSET_TOOLS = ("bash", "read", "write", "edit", "glob", "grep")
Permission = Literal["allow", "ask", "deny"]
PERMISSIONS: tuple[Permission, ...] = ("allow", "ask", "deny")
# The policy that "produced" each evaluated permission (``BetaManagedAgentsAgentToolEvaluation``).
_EVALUATION_OF: dict[Permission, str] = {"allow": "always_allow", "ask": "always_ask", "deny": "always_ask"}
MAX_SCRIPT_STEPS = 1000
MAX_REPLY_LENGTH = 100_000
# Content blocks a client may send in a user.message or user.tool_result.
USER_MESSAGE_BLOCKS = ("text", "image", "document")
TOOL_RESULT_BLOCKS = ("text", "image", "document", "search_result")
# What a client may send (``sessions.events.send``); other event types are the server's own.
SENDABLE_EVENTS = ("user.message", "user.tool_result", "user.tool_confirmation")
# Sessions end a live stream with this marker instead of an event.
STREAM_CLOSED: dict[str, Any] = {}

SessionStatus = Literal["idle", "running", "terminated"]
Event = dict[str, Any]


@dataclass(frozen=True)
class ToolStep:
    tool: str
    input: dict[str, Any]
    permission: Permission = "allow"


@dataclass(frozen=True)
class ScriptedAgent:
    id: str
    name: str
    script: tuple[ToolStep, ...]
    reply: str

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "agent",
            "name": self.name,
            "reply": self.reply,
            "script": [
                {"tool": step.tool, "input": step.input, "permission": step.permission} for step in self.script
            ],
        }


def parse_agent(body: Mapping[str, Any]) -> tuple[str | None, tuple[ToolStep, ...], str]:
    """``(name, script, reply)`` of a ``POST /_emulator/agents`` body, or a 400 naming the field."""
    validation.reject_unknown_fields(body, ("name", "script", "reply"), "")
    name = validation.optional_string(body, "name", "", max_length=validation.NAME_MAX_LENGTH, allow_empty=False)
    reply = validation.optional_string(body, "reply", "", max_length=MAX_REPLY_LENGTH)
    script_value = body.get("script")
    if script_value is None:
        script_value = []
    if not isinstance(script_value, list):
        raise invalid_request(f"script: expected an array of steps, got {validation.json_type(script_value)}")
    if len(script_value) > MAX_SCRIPT_STEPS:
        raise invalid_request(f"script: at most {MAX_SCRIPT_STEPS} steps, got {len(script_value)}")
    return name, tuple(_parse_step(step, f"script[{index}]") for index, step in enumerate(script_value)), reply or ""


def _parse_step(value: object, where: str) -> ToolStep:
    step = validation.expect_object(value, where)
    validation.reject_unknown_fields(step, ("tool", "input", "permission"), where)
    tool = step.get("tool")
    if tool not in TOOLSET_TOOLS:
        raise invalid_request(
            f"{where}.tool: expected one of {', '.join(TOOLSET_TOOLS)} (the SDK's agent toolset), got {tool!r}"
        )
    tool_input = validation.expect_object(step.get("input", {}), f"{where}.input")
    permission = step.get("permission", "allow")
    if permission not in PERMISSIONS:
        raise invalid_request(f"{where}.permission: expected one of {', '.join(PERMISSIONS)}, got {permission!r}")
    return ToolStep(tool=str(tool), input=dict(tool_input), permission=permission)


def _content_blocks(value: object, where: str, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid_request(f"{where}: expected an array of content blocks, got {validation.json_type(value)}")
    blocks: list[dict[str, Any]] = []
    for index, entry in enumerate(value):
        block = validation.expect_object(entry, f"{where}[{index}]")
        kind = block.get("type")
        if kind not in allowed:
            raise invalid_request(f"{where}[{index}].type: expected one of {', '.join(allowed)}, got {kind!r}")
        if kind == "text":
            validation.reject_unknown_fields(block, ("type", "text"), f"{where}[{index}]")
            if not isinstance(block.get("text"), str):
                raise invalid_request(f"{where}[{index}].text: required, a string")
        blocks.append(dict(block))
    return blocks


@dataclass
class Session:
    """One session: its metadata, the agent it plays, its event log and where its turn stands."""

    id: str
    environment_id: str
    agent: dict[str, Any]
    metadata: dict[str, str]
    title: str | None
    created_at: str
    updated_at: str
    script: tuple[ToolStep, ...] = ()
    reply: str = ""
    status: SessionStatus = "idle"
    events: list[Event] = field(default_factory=list)
    # Index of the script step being played; None between turns.
    step: int | None = None
    # The tool_use the turn waits on, and whether it still waits for a confirmation.
    open_tool_use: str | None = None
    awaiting_confirmation: bool = False
    turns_owed: int = 0
    subscribers: set[asyncio.Queue[Event]] = field(default_factory=set)
    # tool_use id -> what resolved it: "result" or "denial".
    resolved_tool_uses: dict[str, str] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "session",
            "agent": self.agent,
            "archived_at": None,
            "budget": None,
            "created_at": self.created_at,
            "deployment_id": None,
            "environment_id": self.environment_id,
            "metadata": dict(self.metadata),
            "outcome_evaluations": [],
            "resources": [],
            "stats": {"active_seconds": 0.0, "duration_seconds": 0.0},
            "status": self.status,
            "title": self.title,
            "updated_at": self.updated_at,
            "usage": {},
            "vault_ids": [],
        }

    @property
    def turn_in_progress(self) -> bool:
        return self.step is not None


class SessionPlayer:
    """Plays scripted turns on sessions: appends their events and answers what clients send.

    ``new_event_id`` and ``timestamp`` come from the emulator's state, so ids and times match the rest
    of the API (and follow an injected clock).
    """

    def __init__(self, *, new_event_id: Callable[[], str], timestamp: Callable[[], str]) -> None:
        self._new_event_id = new_event_id
        self._timestamp = timestamp

    # ----- the log ----------------------------------------------------------------------------------

    def emit(self, session: Session, event_type: str, **fields: Any) -> Event:
        event: Event = {"id": self._new_event_id(), "type": event_type, "processed_at": self._timestamp(), **fields}
        session.events.append(event)
        session.updated_at = event["processed_at"]
        for subscriber in session.subscribers:
            subscriber.put_nowait(event)
        return event

    @staticmethod
    def subscribe(session: Session) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        session.subscribers.add(queue)
        return queue

    @staticmethod
    def unsubscribe(session: Session, queue: asyncio.Queue[Event]) -> None:
        session.subscribers.discard(queue)

    @staticmethod
    def close_streams(session: Session) -> None:
        for subscriber in session.subscribers:
            subscriber.put_nowait(STREAM_CLOSED)

    # ----- turns ------------------------------------------------------------------------------------

    def start_turn(self, session: Session) -> None:
        session.step = 0
        session.status = "running"
        self.emit(session, "session.status_running")
        self._play(session)

    def _play(self, session: Session) -> None:
        """Play steps from ``session.step`` until one waits on the client, or the turn ends."""
        assert session.step is not None
        while session.step < len(session.script):
            step = session.script[session.step]
            tool_use = self.emit(
                session,
                "agent.tool_use",
                name=step.tool,
                input=step.input,
                evaluated_permission=step.permission,
                evaluation={"type": _EVALUATION_OF[step.permission]},
            )
            if step.permission == "deny":
                # The policy refused the call: nobody runs it, the agent carries on.
                session.resolved_tool_uses[tool_use["id"]] = "denial"
                session.step += 1
                continue
            session.open_tool_use = tool_use["id"]
            session.awaiting_confirmation = step.permission == "ask"
            session.status = "idle"
            waiting_on = {"type": "requires_action", "event_ids": [tool_use["id"]]}
            self.emit(session, "session.status_idle", stop_reason=waiting_on)
            return
        if session.reply:
            self.emit(session, "agent.message", content=[{"type": "text", "text": session.reply}])
        session.step = None
        session.status = "idle"
        self.emit(session, "session.status_idle", stop_reason={"type": "end_turn"})
        if session.turns_owed:
            session.turns_owed -= 1
            self.start_turn(session)

    def _resume(self, session: Session) -> None:
        assert session.step is not None
        session.open_tool_use = None
        session.awaiting_confirmation = False
        session.step += 1
        session.status = "running"
        self.emit(session, "session.status_running")
        self._play(session)

    # ----- what clients send ------------------------------------------------------------------------

    def check_sendable(self, session: Session, value: object, where: str) -> Event:
        """A validated copy of one event a client sends, or a 4xx naming what is wrong with it."""
        event = validation.expect_object(value, where)
        kind = event.get("type")
        if kind == "user.message":
            validation.reject_unknown_fields(event, ("type", "content"), where)
            if event.get("content") is None:
                raise invalid_request(f"{where}.content: required")
            return {"type": kind, "content": _content_blocks(event["content"], f"{where}.content", USER_MESSAGE_BLOCKS)}
        if kind == "user.tool_result":
            validation.reject_unknown_fields(event, ("type", "tool_use_id", "content", "is_error"), where)
            tool_use_id = self._open_tool_use(session, event.get("tool_use_id"), f"{where}.tool_use_id")
            if session.awaiting_confirmation:
                raise invalid_request(
                    f"{where}.tool_use_id: {tool_use_id} waits for a user.tool_confirmation; "
                    "a result is taken only once the call is allowed"
                )
            is_error = event.get("is_error")
            if is_error is not None and not isinstance(is_error, bool):
                raise invalid_request(f"{where}.is_error: expected a boolean, got {validation.json_type(is_error)}")
            content = _content_blocks(event.get("content", []), f"{where}.content", TOOL_RESULT_BLOCKS)
            return {"type": kind, "tool_use_id": tool_use_id, "content": content, "is_error": bool(is_error)}
        if kind == "user.tool_confirmation":
            validation.reject_unknown_fields(event, ("type", "tool_use_id", "result", "deny_message"), where)
            tool_use_id = self._open_tool_use(session, event.get("tool_use_id"), f"{where}.tool_use_id")
            if not session.awaiting_confirmation:
                raise invalid_request(f"{where}.tool_use_id: {tool_use_id} needs no confirmation")
            result = event.get("result")
            if result not in ("allow", "deny"):
                raise invalid_request(f"{where}.result: expected 'allow' or 'deny', got {result!r}")
            deny_message = event.get("deny_message")
            if deny_message is not None:
                if result != "deny":
                    raise invalid_request(f"{where}.deny_message: only allowed when result is 'deny'")
                validation.string_value(deny_message, f"{where}.deny_message", max_length=MAX_REPLY_LENGTH)
            checked = {"type": kind, "tool_use_id": tool_use_id, "result": result}
            if deny_message is not None:
                checked["deny_message"] = deny_message
            return checked
        raise invalid_request(
            f"{where}.type: expected one of {', '.join(SENDABLE_EVENTS)}, got {kind!r}"
            + ("" if not isinstance(kind, str) or not kind.startswith("user.") else " (not served by the emulator)")
        )

    def _open_tool_use(self, session: Session, value: object, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise invalid_request(f"{where}: required, the id of an agent.tool_use event")
        if value == session.open_tool_use:
            return value
        if value in session.resolved_tool_uses:
            # 409 would be retried by the SDK's runner for the whole lease; this cannot heal.
            resolution = session.resolved_tool_uses[value]
            raise invalid_request(f"{where}: agent.tool_use {value} already has its {resolution}")
        if any(event["id"] == value and event["type"] == "agent.tool_use" for event in session.events):
            raise invalid_request(f"{where}: agent.tool_use {value} is not waiting for the client")
        raise invalid_request(f"{where}: no agent.tool_use event {value!r} in session {session.id}")

    def apply_sent(self, session: Session, checked: Event) -> Event:
        """Record one checked client event and move the turn on; returns the stored event."""
        kind = checked["type"]
        stored = self.emit(session, kind, **{key: value for key, value in checked.items() if key != "type"})
        if kind == "user.message":
            if session.turn_in_progress:
                session.turns_owed += 1
            else:
                self.start_turn(session)
        elif kind == "user.tool_result":
            session.resolved_tool_uses[checked["tool_use_id"]] = "result"
            self._resume(session)
        elif checked["result"] == "allow":
            session.awaiting_confirmation = False
        else:
            session.resolved_tool_uses[checked["tool_use_id"]] = "denial"
            self._resume(session)
        return stored

    @staticmethod
    def reject_several_answers(checked: list[Event]) -> None:
        """One request answers at most one tool_use: a scripted turn waits on one call at a time."""
        if sum(1 for event in checked if "tool_use_id" in event) > 1:
            raise invalid_request("events: send one tool result or confirmation per request; the turn waits on one")


def stream_frame(event: Event) -> bytes:
    """One server-sent event; the SDK skips frames without an ``event:`` name."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


PING_FRAME = b"event: ping\ndata: {}\n\n"


def api_error_frame(error: ApiError) -> bytes:
    """An error on an open stream, which the SDK raises as an ``APIStatusError``."""
    return f"event: error\ndata: {json.dumps(error.body(), separators=(',', ':'))}\n\n".encode()
