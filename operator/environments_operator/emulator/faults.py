"""Fault injection for the emulator: rules that make chosen API routes slow, fail or drop connections.

A rule names a route (``work.poll``, ``environments.create``, ... or ``*`` for every ``/v1/`` route)
and one effect:

- ``latency``: wait ``latency_ms`` before handling the request (latencies of all matching rules add up);
- ``error``: answer with ``status`` (400-599) in the Anthropic error shape; 429 carries ``retry-after``
  and ``retry-after-ms`` (``retry_after_ms``, default 1000);
- ``drop``: close the connection without any response.

An error or drop rule fires with probability ``rate`` (default 1), at most ``times`` times (default:
without limit), and ``when`` says whether it replaces the request (``before``, the default: nothing
changes) or only its response (``after``: the request takes effect, then the client sees the failure
— the case that tests exactly-once handling). The first matching error/drop rule that fires wins.

This module parses rules and decides which effects apply; it may not touch emulator state or HTTP.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from environments_operator.emulator.errors import ApiError, invalid_request
from environments_operator.emulator.validation import expect_object, json_type, reject_unknown_fields

Effect = Literal["latency", "error", "drop"]
When = Literal["before", "after"]
EFFECTS: tuple[Effect, ...] = ("latency", "error", "drop")
WHENS: tuple[When, ...] = ("before", "after")
RULE_FIELDS = ("route", "effect", "rate", "times", "status", "retry_after_ms", "latency_ms", "when", "message")
MAX_LATENCY_MS = 600_000
DEFAULT_RETRY_AFTER_MS = 1000


@dataclass
class FaultRule:
    """One fault: which route, what effect, how often."""

    id: str
    route: str
    effect: Effect
    rate: float = 1.0
    times: int | None = None
    status: int = 503
    retry_after_ms: int | None = None
    latency_ms: int = 0
    when: When = "before"
    message: str | None = None
    fired: int = 0

    def matches(self, route: str) -> bool:
        return self.route in ("*", route)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def to_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "route": self.route,
            "effect": self.effect,
            "rate": self.rate,
            "times": self.times,
            "when": self.when,
            "fired": self.fired,
        }
        if self.effect == "latency":
            body["latency_ms"] = self.latency_ms
        if self.effect == "error":
            body["status"] = self.status
            body["retry_after_ms"] = self.retry_after_ms
        return body

    def api_error(self, route: str) -> ApiError:
        message = self.message or f"injected fault on {route}: status {self.status}"
        headers: dict[str, str] = {}
        retry_after_ms = self.retry_after_ms
        if retry_after_ms is None and self.status == 429:
            retry_after_ms = DEFAULT_RETRY_AFTER_MS
        if retry_after_ms is not None:
            # retry-after is whole seconds by RFC 9110; the SDK prefers the precise retry-after-ms.
            headers["retry-after"] = str(max(1, -(-retry_after_ms // 1000)))
            headers["retry-after-ms"] = str(retry_after_ms)
        return ApiError(self.status, message, headers=headers)


@dataclass
class FaultPlan:
    """What the faults decided for one request."""

    latency_ms: int = 0
    rule: FaultRule | None = None


def _number(rule: Mapping[str, Any], key: str, path: str, *, minimum: float, maximum: float) -> float | None:
    value = rule.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_request(f"{path}.{key}: expected a number, got {json_type(value)}")
    if not minimum <= value <= maximum:
        raise invalid_request(f"{path}.{key}: must be between {minimum:g} and {maximum:g}, got {value}")
    return float(value)


def _integer(rule: Mapping[str, Any], key: str, path: str, *, minimum: int, maximum: int) -> int | None:
    value = rule.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_request(f"{path}.{key}: expected an integer, got {json_type(value)}")
    if not minimum <= value <= maximum:
        raise invalid_request(f"{path}.{key}: must be between {minimum} and {maximum}, got {value}")
    return value


def parse_rule(value: object, path: str, *, rule_id: str, routes: Iterable[str]) -> FaultRule:
    """One rule from its JSON form; unknown routes, effects and fields are rejected by name."""
    rule = expect_object(value, path)
    reject_unknown_fields(rule, RULE_FIELDS, path)
    route = rule.get("route")
    known_routes = sorted(routes)
    if not isinstance(route, str) or (route != "*" and route not in known_routes):
        raise invalid_request(
            f"{path}.route: unknown route {route!r}; expected '*' or one of: {', '.join(known_routes)}"
        )
    effect = rule.get("effect")
    if effect not in EFFECTS:
        raise invalid_request(f"{path}.effect: unknown effect {effect!r}; expected one of: {', '.join(EFFECTS)}")
    when = rule.get("when", "before")
    if when not in WHENS:
        raise invalid_request(f"{path}.when: expected 'before' or 'after', got {when!r}")
    if effect == "latency" and rule.get("latency_ms") is None:
        raise invalid_request(f"{path}.latency_ms: required for a latency rule")
    message = rule.get("message")
    if message is not None and not isinstance(message, str):
        raise invalid_request(f"{path}.message: expected a string, got {json_type(message)}")
    rate = _number(rule, "rate", path, minimum=0.0, maximum=1.0)
    return FaultRule(
        id=rule_id,
        route=route,
        effect=effect,
        rate=1.0 if rate is None else rate,
        times=_integer(rule, "times", path, minimum=1, maximum=10**9),
        status=_integer(rule, "status", path, minimum=400, maximum=599) or 503,
        retry_after_ms=_integer(rule, "retry_after_ms", path, minimum=0, maximum=3_600_000),
        latency_ms=_integer(rule, "latency_ms", path, minimum=0, maximum=MAX_LATENCY_MS) or 0,
        when=when,
        message=message,
    )


@dataclass
class FaultInjector:
    """The active fault rules and the random source that decides when they fire."""

    routes: frozenset[str]
    rules: list[FaultRule] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, document: object) -> list[FaultRule]:
        """Add the rules of a ``{"faults": [...], "seed": n}`` document; all or nothing."""
        body = expect_object(document, "body")
        reject_unknown_fields(body, ("faults", "seed"), "")
        raw_rules = body.get("faults")
        if not isinstance(raw_rules, list):
            raise invalid_request(f"faults: expected an array of rules, got {json_type(raw_rules)}")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise invalid_request(f"seed: expected an integer, got {json_type(seed)}")
        parsed = [
            parse_rule(raw, f"faults[{index}]", rule_id=f"fault_{next(self._ids)}", routes=self.routes)
            for index, raw in enumerate(raw_rules)
        ]
        if seed is not None:
            self.rng.seed(seed)
        self.rules.extend(parsed)
        return parsed

    def clear(self) -> None:
        self.rules.clear()

    def plan(self, route: str) -> FaultPlan:
        """Decide the effects for one request on ``route``, and count the rules that fire."""
        plan = FaultPlan()
        for rule in self.rules:
            if not rule.matches(route) or rule.exhausted:
                continue
            if rule.effect == "latency":
                if self.rng.random() < rule.rate:
                    rule.fired += 1
                    plan.latency_ms += rule.latency_ms
                continue
            if plan.rule is None and self.rng.random() < rule.rate:
                rule.fired += 1
                plan.rule = rule
        self.rules = [rule for rule in self.rules if not rule.exhausted]
        return plan
