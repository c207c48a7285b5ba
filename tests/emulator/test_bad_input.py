"""Malformed and invalid requests across the routes: a clear 4xx naming the problem, and no state change.

Raw HTTP on purpose: the SDK would refuse to send most of these.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import API_KEY, enqueue_sessions, running_emulator, self_hosted_environment, snapshot

API = "api"  # send the API key
ENV = "env"  # send the pool's environment key
NONE = "none"  # send no credential


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: object = None  # bytes are sent as-is; anything else but None as JSON
    credential: str = API
    status: int = 400
    message: str = ""


def limited(**networking: object) -> dict[str, object]:
    return {"name": "x", "config": {"type": "cloud", "networking": {"type": "limited", **networking}}}


CASES = [
    # environments: body syntax
    Case("truncated json", "POST", "/v1/environments", b'{"name": ', message="not valid JSON"),
    Case("array body", "POST", "/v1/environments", b"[]", message="expected a JSON object, got array"),
    Case("empty body", "POST", "/v1/environments", b"", message="empty body"),
    Case("NaN literal", "POST", "/v1/environments", b'{"name": NaN}', message="not valid JSON"),
    Case("invalid utf-8", "POST", "/v1/environments", b'{"name": "\xff\xfe"}', message="not UTF-8"),
    Case("oversized body", "POST", "/v1/environments", b'{"name": "' + b"x" * (1024 * 1024) + b'"}', message="limit"),
    # environments: fields
    Case("missing name", "POST", "/v1/environments", {}, message="name: required"),
    Case("name wrong type", "POST", "/v1/environments", {"name": 5}, message="name: expected a string, got integer"),
    Case("empty name", "POST", "/v1/environments", {"name": ""}, message="name: must not be empty"),
    Case("long name", "POST", "/v1/environments", {"name": "x" * 300}, message="the limit is 256"),
    Case(
        "unknown config type",
        "POST",
        "/v1/environments",
        {"name": "x", "config": {"type": "kubernetes"}},
        message="config.type: unknown environment type 'kubernetes'",
    ),
    Case(
        "config not object",
        "POST",
        "/v1/environments",
        {"name": "x", "config": "cloud"},
        message="config: expected an object, got string",
    ),
    Case(
        "unknown network type",
        "POST",
        "/v1/environments",
        {"name": "x", "config": {"type": "cloud", "networking": {"type": "open"}}},
        message="config.networking.type: unknown network policy type 'open'",
    ),
    Case(
        "hosts not array",
        "POST",
        "/v1/environments",
        limited(allowed_hosts="a.example.com"),
        message="config.networking.allowed_hosts: expected an array of strings, got string",
    ),
    Case(
        "host not string",
        "POST",
        "/v1/environments",
        limited(allowed_hosts=[1]),
        message="config.networking.allowed_hosts[0]: expected a string, got integer",
    ),
    Case(
        "flag not bool",
        "POST",
        "/v1/environments",
        limited(allow_mcp_servers="yes"),
        message="config.networking.allow_mcp_servers: expected a boolean, got string",
    ),
    Case(
        "packages not array",
        "POST",
        "/v1/environments",
        {"name": "x", "config": {"type": "cloud", "packages": {"pip": "numpy"}}},
        message="config.packages.pip: expected an array of strings",
    ),
    Case(
        "self_hosted with networking",
        "POST",
        "/v1/environments",
        {"name": "x", "config": {"type": "self_hosted", "networking": {"type": "unrestricted"}}},
        message="config.networking: unknown field",
    ),
    Case(
        "metadata value type",
        "POST",
        "/v1/environments",
        {"name": "x", "metadata": {"k": 1}},
        message="metadata.k: expected a string, got integer",
    ),
    Case(
        "too much metadata",
        "POST",
        "/v1/environments",
        {"name": "x", "metadata": {f"k{index}": "v" for index in range(17)}},
        message="metadata: has 17 keys",
    ),
    Case(
        "unknown top-level field",
        "POST",
        "/v1/environments",
        {"name": "x", "colour": "red"},
        message="colour: unknown field",
    ),
    Case(
        "unknown scope",
        "POST",
        "/v1/environments",
        {"name": "x", "config": {"type": "self_hosted"}, "scope": "galaxy"},
        message="scope: unknown scope",
    ),
    Case(
        "unknown scope on cloud",
        "POST",
        "/v1/environments",
        {"name": "x", "config": {"type": "cloud"}, "scope": "galaxy"},
        message="scope: unknown scope 'galaxy'",
    ),
    Case(
        "scope wrong type",
        "POST",
        "/v1/environments",
        {"name": "x", "scope": 1},
        message="scope: expected 'organization' or 'account', got integer",
    ),
    Case(
        "update unknown scope on cloud",
        "POST",
        "/v1/environments/{cloud}",
        {"scope": "galaxy"},
        message="scope: unknown scope 'galaxy'",
    ),
    Case(
        "change config type",
        "POST",
        "/v1/environments/{cloud}",
        {"config": {"type": "self_hosted"}},
        message="cannot change an environment's type",
    ),
    Case(
        "valid name with an invalid config",
        "POST",
        "/v1/environments/{cloud}",
        {"name": "renamed", "metadata": {"new": "v"}, "config": {"type": "cloud", "networking": {"type": "x"}}},
        message="config.networking.type",
    ),
    Case(
        "update metadata not object",
        "POST",
        "/v1/environments/{cloud}",
        {"metadata": "x"},
        message="metadata: expected an object, got string",
    ),
    Case("update empty name", "POST", "/v1/environments/{cloud}", {"name": ""}, message="name: must not be empty"),
    Case(
        "archive with parameters",
        "POST",
        "/v1/environments/{cloud}/archive",
        {"force": True},
        message="force: unknown field",
    ),
    # environments: query
    Case("limit zero", "GET", "/v1/environments?limit=0", message="limit: must be between 1 and 100"),
    Case("limit not integer", "GET", "/v1/environments?limit=abc", message="limit: expected an integer"),
    Case(
        "include_archived not bool",
        "GET",
        "/v1/environments?include_archived=yes",
        message="include_archived: expected 'true' or 'false'",
    ),
    Case("forged cursor", "GET", "/v1/environments?page=garbage", message="page:"),
    # work queue
    Case(
        "block_ms zero",
        "GET",
        "/v1/environments/{pool}/work/poll?block_ms=0",
        credential=ENV,
        message="block_ms: must be between 1 and 999, got 0",
    ),
    Case(
        "block_ms too long",
        "GET",
        "/v1/environments/{pool}/work/poll?block_ms=1000",
        credential=ENV,
        message="block_ms: must be between 1 and 999",
    ),
    Case(
        "block_ms fraction",
        "GET",
        "/v1/environments/{pool}/work/poll?block_ms=1.5",
        credential=ENV,
        message="block_ms: expected an integer",
    ),
    Case(
        "negative reclaim",
        "GET",
        "/v1/environments/{pool}/work/poll?reclaim_older_than_ms=-5",
        credential=ENV,
        message="reclaim_older_than_ms: must be between 0",
    ),
    Case(
        "ttl fraction",
        "POST",
        "/v1/environments/{pool}/work/{work}/heartbeat?desired_ttl_seconds=1.5",
        credential=ENV,
        message="desired_ttl_seconds: expected an integer",
    ),
    Case(
        "ttl not integer",
        "POST",
        "/v1/environments/{pool}/work/{work}/heartbeat?desired_ttl_seconds=ten",
        credential=ENV,
        message="desired_ttl_seconds: expected an integer",
    ),
    Case(
        "force not bool",
        "POST",
        "/v1/environments/{pool}/work/{work}/stop",
        {"force": "yes"},
        credential=ENV,
        message="force: expected a boolean, got string",
    ),
    Case(
        "stop unknown field",
        "POST",
        "/v1/environments/{pool}/work/{work}/stop",
        {"graceful": True},
        credential=ENV,
        message="graceful: unknown field",
    ),
    Case(
        "ack with parameters",
        "POST",
        "/v1/environments/{pool}/work/{work}/ack",
        {"x": 1},
        credential=ENV,
        message="x: unknown field",
    ),
    Case(
        "work metadata value type",
        "POST",
        "/v1/environments/{pool}/work/{work}",
        {"metadata": {"k": 5}},
        message="metadata.k: expected a string, got integer",
    ),
    Case(
        "work metadata: one good key, one bad",
        "POST",
        "/v1/environments/{pool}/work/{work}",
        {"metadata": {"ok": "v", "bad": 5}},
        message="metadata.bad: expected a string, got integer",
    ),
    Case(
        "work metadata not object",
        "POST",
        "/v1/environments/{pool}/work/{work}",
        {"metadata": []},
        message="metadata: expected an object, got array",
    ),
    Case(
        "work list limit",
        "GET",
        "/v1/environments/{pool}/work?limit=101",
        credential=ENV,
        message="limit: must be between 1 and 100",
    ),
    # sessions
    Case("session without agent", "POST", "/v1/sessions", {"environment_id": "{pool}"}, message="agent: required"),
    Case(
        "agent wrong type",
        "POST",
        "/v1/sessions",
        {"agent": 5, "environment_id": "{pool}"},
        message="agent: expected an object, got integer",
    ),
    Case(
        "unknown agent type",
        "POST",
        "/v1/sessions",
        {"agent": {"type": "robot", "id": "a"}, "environment_id": "{pool}"},
        message="agent.type",
    ),
    Case(
        "session without environment", "POST", "/v1/sessions", {"agent": "agent_1"}, message="environment_id: required"
    ),
    # emulator extensions
    Case(
        "key for cloud environment",
        "POST",
        "/_emulator/environments/{cloud}/environment-key",
        message="only for self_hosted",
    ),
    Case(
        "unknown fault effect",
        "POST",
        "/_emulator/faults",
        {"faults": [{"route": "work.poll", "effect": "explode"}]},
        message="faults[0].effect: unknown effect",
    ),
    Case(
        "fault rate above 1",
        "POST",
        "/_emulator/faults",
        {"faults": [{"route": "work.poll", "effect": "error", "rate": 2}]},
        message="faults[0].rate",
    ),
    Case(
        "fault route unknown",
        "POST",
        "/_emulator/faults",
        {"faults": [{"route": "nope", "effect": "drop"}]},
        message="faults[0].route: unknown route",
    ),
    Case("faults not array", "POST", "/_emulator/faults", {"faults": "all"}, message="faults: expected an array"),
    Case(
        "second fault bad: all or nothing",
        "POST",
        "/_emulator/faults",
        {"faults": [{"route": "*", "effect": "drop"}, {"route": "*", "effect": "latency"}]},
        message="faults[1].latency_ms: required",
    ),
    # routing, credentials and state conflicts
    Case("unknown path", "GET", "/v1/nowhere", status=404, message="no route for GET /v1/nowhere"),
    Case("wrong method", "PUT", "/v1/environments", {}, status=405, message="not allowed"),
    Case("no credential", "GET", "/v1/environments", credential=NONE, status=401, message="missing credentials"),
    Case("environment key on CRUD", "GET", "/v1/environments", credential=ENV, status=403, message="takes an API key"),
    Case(
        "API key on poll", "GET", "/v1/environments/{pool}/work/poll", status=403, message="takes the environment key"
    ),
    Case(
        "stop a stopped item",
        "POST",
        "/v1/environments/{pool}/work/{stopped}/stop",
        {},
        credential=ENV,
        status=409,
        message="already stopped",
    ),
    Case(
        "block_ms with digit separator",
        "GET",
        "/v1/environments/{pool}/work/poll?block_ms=5_0",
        credential=ENV,
        message="block_ms: expected an integer, got '5_0'",
    ),
    Case("limit in non-ASCII digits", "GET", "/v1/environments?limit=\u0665", message="limit: expected an integer"),
    Case(
        "delete with parameters",
        "DELETE",
        "/v1/environments/{cloud}",
        {"force": True},
        message="force: unknown field; delete takes no parameters",
    ),
    Case(
        "heartbeat with a body",
        "POST",
        "/v1/environments/{pool}/work/{work}/heartbeat",
        {"desired_ttl_seconds": 30},
        credential=ENV,
        message="desired_ttl_seconds: unknown field; heartbeat takes no parameters",
    ),
    Case(
        "environment key with parameters",
        "POST",
        "/_emulator/environments/{pool}/environment-key",
        {"scope": "x"},
        message="scope: unknown field; environment-key takes no parameters",
    ),
    Case(
        "unknown work item",
        "GET",
        "/v1/environments/{pool}/work/work_000000000000000000000000",
        status=404,
        message="not found",
    ),
    # scripted agents
    Case("agent unknown field", "POST", "/_emulator/agents", {"steps": []}, message="steps: unknown field"),
    Case("agent script not array", "POST", "/_emulator/agents", {"script": {}}, message="script: expected an array"),
    Case(
        "agent step not object", "POST", "/_emulator/agents", {"script": ["bash"]},
        message="script[0]: expected an object",
    ),
    Case(
        "agent unknown tool", "POST", "/_emulator/agents", {"script": [{"tool": "browser", "input": {}}]},
        message="script[0].tool: expected one of bash, read, write, edit, glob, grep",
    ),
    Case(
        "agent step unknown field", "POST", "/_emulator/agents",
        {"script": [{"tool": "bash", "input": {}, "timeout": 5}]}, message="script[0].timeout: unknown field",
    ),
    Case(
        "agent input not object", "POST", "/_emulator/agents", {"script": [{"tool": "bash", "input": "ls"}]},
        message="script[0].input: expected an object",
    ),
    Case(
        "agent unknown permission", "POST", "/_emulator/agents",
        {"script": [{"tool": "bash", "input": {}, "permission": "maybe"}]}, message="script[0].permission",
    ),
    Case("agent reply not string", "POST", "/_emulator/agents", {"reply": 3}, message="reply: expected a string"),
    Case("agent with environment key", "POST", "/_emulator/agents", {}, credential=ENV, status=403),
    # session events: send
    Case(
        "events of unknown session", "POST", "/v1/sessions/session_000000000000000000000000/events",
        {"events": [{"type": "user.message", "content": []}]}, status=404, message="not found",
    ),
    Case("events missing", "POST", "/v1/sessions/{session}/events", {}, message="events: required"),
    Case("events empty", "POST", "/v1/sessions/{session}/events", {"events": []}, message="events: required"),
    Case(
        "events unknown field", "POST", "/v1/sessions/{session}/events", {"events": [], "stream": True},
        message="stream: unknown field",
    ),
    Case(
        "event of the server's kind", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "agent.message", "content": []}]}, message="events[0].type: expected one of",
    ),
    Case(
        "message without content", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.message"}]}, message="events[0].content: required",
    ),
    Case(
        "message block of unknown type", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.message", "content": [{"type": "video"}]}]},
        message="events[0].content[0].type",
    ),
    Case(
        "message then bad event", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.message", "content": []}, {"type": "user.interrupt"}]},
        message="events[1].type",
    ),
    Case(
        "result for unknown tool_use", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_result", "tool_use_id": "sevt_000000000000000000000000"}]},
        message="no agent.tool_use event",
    ),
    Case(
        "second result for a tool_use", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_result", "tool_use_id": "{answered}"}]}, message="already has its result",
    ),
    Case(
        "result before confirmation", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_result", "tool_use_id": "{asking}"}]},
        message="waits for a user.tool_confirmation",
    ),
    Case(
        "result unknown field", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_result", "tool_use_id": "{asking}", "output": "x"}]},
        message="events[0].output: unknown field",
    ),
    Case(
        "confirmation of an answered call", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_confirmation", "tool_use_id": "{answered}", "result": "allow"}]},
        message="already has its result",
    ),
    Case(
        "confirmation with unknown verdict", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_confirmation", "tool_use_id": "{asking}", "result": "maybe"}]},
        message="events[0].result",
    ),
    Case(
        "deny message on allow", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_confirmation", "tool_use_id": "{asking}", "result": "allow",
                     "deny_message": "no"}]},
        message="deny_message: only allowed when result is 'deny'",
    ),
    Case(
        "two answers in one request", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.tool_confirmation", "tool_use_id": "{asking}", "result": "allow"},
                    {"type": "user.tool_confirmation", "tool_use_id": "{asking}", "result": "allow"}]},
        message="send one tool result or confirmation per request",
    ),
    Case(
        "events without credential", "POST", "/v1/sessions/{session}/events",
        {"events": [{"type": "user.message", "content": []}]}, credential=NONE, status=401,
    ),
    Case(
        "events with another environment's key", "POST", "/v1/sessions/{cloud_session}/events",
        {"events": [{"type": "user.message", "content": []}]}, credential=ENV, status=403,
    ),
    # session events: list and stream
    Case("events limit 0", "GET", "/v1/sessions/{session}/events?limit=0", message="limit: must be between 1"),
    Case("events limit too large", "GET", "/v1/sessions/{session}/events?limit=1001", message="limit"),
    Case("events order", "GET", "/v1/sessions/{session}/events?order=sideways", message="order: expected"),
    Case(
        "events time bound", "GET", "/v1/sessions/{session}/events?created_at[gt]=yesterday",
        message="created_at[gt]: expected an RFC 3339 timestamp",
    ),
    Case("events foreign cursor", "GET", "/v1/sessions/{session}/events?page=abc", message="page:"),
    Case(
        "stream of unknown session", "GET", "/v1/sessions/session_000000000000000000000000/events/stream",
        status=404, message="not found",
    ),
]


@dataclass
class World:
    emulator: EmulatorServer
    http: aiohttp.ClientSession
    ids: dict[str, str]
    environment_key: str


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with running_emulator() as emulator:
        pool = self_hosted_environment(emulator)
        cloud = emulator.state.create_environment({"name": "cloud"})
        queued, stopped = enqueue_sessions(emulator, pool.id, count=2)
        emulator.state.stop(pool.id, stopped.id, force=True)
        # A scripted session whose first call is answered and whose second waits for a confirmation.
        agent = emulator.state.create_agent(
            {"script": [{"tool": "bash", "input": {"command": "true"}}, {"tool": "bash", "permission": "ask"}]}
        )
        session, _ = emulator.state.create_session({"agent": agent.id, "environment_id": pool.id})
        answered = session.open_tool_use
        assert answered is not None
        emulator.state.send_events(session, {"events": [{"type": "user.tool_result", "tool_use_id": answered}]})
        cloud_session, _ = emulator.state.create_session({"agent": agent.id, "environment_id": cloud.id})
        ids = {
            "pool": pool.id, "cloud": cloud.id, "work": queued.id, "stopped": stopped.id, "session": session.id,
            "answered": answered, "asking": session.open_tool_use or "", "cloud_session": cloud_session.id,
        }
        async with aiohttp.ClientSession(base_url=emulator.base_url) as http:
            yield World(emulator, http, ids, pool.key)


def fill(template: object, ids: dict[str, str]) -> object:
    if isinstance(template, str):
        return template.format(**ids)
    if isinstance(template, dict):
        return {key: fill(value, ids) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, ids) for value in template]
    return template


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_request_gets_a_clear_error_and_changes_nothing(world: World, case: Case) -> None:
    before = snapshot(world.emulator)
    headers = {"anthropic-beta": "managed-agents-2026-04-01"}
    if case.credential == API:
        headers["x-api-key"] = API_KEY
    elif case.credential == ENV:
        headers["Authorization"] = f"Bearer {world.environment_key}"
    if isinstance(case.body, bytes):
        data: bytes | None = case.body
    elif case.body is not None:
        data = json.dumps(fill(case.body, world.ids)).encode()
    else:
        data = None
    path = case.path.format(**world.ids)
    async with world.http.request(case.method, path, data=data, headers=headers) as response:
        body = await response.json()
        assert response.status == case.status, body
        assert response.content_type == "application/json"
    assert body["type"] == "error"
    assert set(body["error"]) >= {"type", "message"}
    expected_type = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        409: "conflict_error",
    }[case.status]
    assert body["error"]["type"] == expected_type
    assert case.message in body["error"]["message"]
    assert snapshot(world.emulator) == before
