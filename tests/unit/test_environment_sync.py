"""The Environment controller's pure decisions: mapping, update plans, lookups, failures, schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from environments_operator.domain import environment_sync as sync
from environments_operator.domain.api_failure import ApiFailure, parse_retry_after
from environments_operator.domain.environment import EnvironmentSpec
from environments_operator.domain.environment_sync import (
    UID_METADATA_KEY,
    RemoteEnvironment,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
EMPTY_PACKAGES = {m: [] for m in sync.PACKAGE_MANAGERS} | {"type": "packages"}


def spec(**fields: Any) -> EnvironmentSpec:
    fields.setdefault("config", {"type": "cloud"})
    return EnvironmentSpec.model_validate(fields)


def remote(**fields: Any) -> RemoteEnvironment:
    """An environment as the API returns it for a bare cloud create named "res"."""
    data: dict[str, Any] = {
        "id": "env_1", "name": "res", "description": "", "metadata": {}, "type": "environment",
        "config": {"type": "cloud", "networking": {"type": "unrestricted"}, "packages": dict(EMPTY_PACKAGES)},
        "created_at": "2026-05-01T10:00:00Z", "updated_at": "2026-05-01T10:00:00Z", "archived_at": None,
    }
    data.update(fields)
    return RemoteEnvironment.from_api(data)


def limited(**fields: Any) -> dict[str, Any]:
    return {"type": "limited", "allowed_hosts": [], "allow_package_managers": False,
            "allow_mcp_servers": False, **fields}


# ----- create params ---------------------------------------------------------------------------------

CREATE_CASES = [
    pytest.param(
        {"config": {"type": "cloud"}},
        {"name": "res", "config": {"type": "cloud"}, "metadata": {UID_METADATA_KEY: "uid-1"}},
        id="bare-cloud-name-defaults-to-resource-name",
    ),
    pytest.param(
        {"name": "Data", "description": "d", "metadata": {"team": "a"},
         "config": {"type": "cloud",
                    "networking": {"type": "limited", "allowedHosts": ["x.io"], "allowPackageManagers": True,
                                   "allowMcpServers": False},
                    "packages": {"pip": ["pandas==2.2.3"], "apt": ["ripgrep"]}}},
        {"name": "Data", "description": "d", "metadata": {"team": "a", UID_METADATA_KEY: "uid-1"},
         "config": {"type": "cloud",
                    "networking": {"type": "limited", "allowed_hosts": ["x.io"], "allow_package_managers": True,
                                   "allow_mcp_servers": False},
                    "packages": {"apt": ["ripgrep"], "pip": ["pandas==2.2.3"], "type": "packages"}}},
        id="cloud-limited-camel-to-snake",
    ),
    pytest.param(
        {"config": {"type": "cloud", "networking": {"type": "limited"}}},
        {"name": "res", "config": {"type": "cloud", "networking": {"type": "limited"}},
         "metadata": {UID_METADATA_KEY: "uid-1"}},
        id="unset-limited-fields-are-omitted",
    ),
    pytest.param(
        {"scope": "account", "config": {"type": "self_hosted"}},
        {"name": "res", "scope": "account", "config": {"type": "self_hosted"},
         "metadata": {UID_METADATA_KEY: "uid-1"}},
        id="self-hosted-with-scope",
    ),
]


@pytest.mark.parametrize(("fields", "expected"), CREATE_CASES)
def test_create_params(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sync.create_params(spec(**fields), resource_name="res", uid="uid-1") == expected


def test_the_reserved_uid_key_is_refused_in_spec_metadata() -> None:
    problem = sync.spec_problem(spec(metadata={UID_METADATA_KEY: "x"}))
    assert problem is not None and f"spec.metadata.{UID_METADATA_KEY}" in problem
    assert sync.spec_problem(spec(metadata={"team": "a"})) is None


def test_validation_message_names_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        EnvironmentSpec.model_validate({"config": {"type": "cloud", "networking": {"type": "wide"}}})
    assert sync.validation_message(caught.value).startswith("spec.config.networking.type: ")


# ----- update plans ----------------------------------------------------------------------------------

PLAN_CASES = [
    pytest.param({}, {}, [], {}, (), id="in-sync-bare-cloud"),
    pytest.param({"name": "New"}, {}, [], {"name": "New"}, ("name",), id="name-changed"),
    pytest.param({}, {"name": "Old"}, [], {"name": "res"}, ("name",), id="name-removed-back-to-resource-name"),
    pytest.param({"description": "d"}, {}, [], {"description": "d"}, ("description",), id="description-set"),
    pytest.param({}, {"description": "old"}, [], {"description": ""}, ("description",),
                 id="description-removed-is-cleared"),
    pytest.param({}, {"description": None}, [], {}, (), id="null-description-equals-none"),
    pytest.param({"metadata": {"team": "a"}}, {"metadata": {"team": "b", "foreign": "x"}}, ["team"],
                 {"metadata": {"team": "a"}}, ("metadata.team",), id="metadata-value-changed-foreign-kept"),
    pytest.param({"metadata": {}}, {"metadata": {"team": "a", "foreign": "x"}}, ["team"],
                 {"metadata": {"team": None}}, ("metadata.team",), id="owned-key-removed-sends-null"),
    pytest.param({}, {"metadata": {"foreign": "x"}}, [], {}, (), id="foreign-key-never-removed"),
    pytest.param({}, {"metadata": {"gone": "x"}}, ["gone", "absent"], {"metadata": {"gone": None}},
                 ("metadata.gone",), id="only-owned-keys-still-present-are-removed"),
    pytest.param({}, {"metadata": {UID_METADATA_KEY: "u"}}, [UID_METADATA_KEY], {}, (),
                 id="uid-key-never-removed"),
    pytest.param({"metadata": {"empty": ""}}, {}, [], {}, (), id="empty-value-equals-absent-key"),
    pytest.param({"scope": "account", "config": {"type": "self_hosted"}},
                 {"scope": "organization", "config": {"type": "self_hosted"}}, [],
                 {"scope": "account"}, ("scope",), id="scope-changed"),
    pytest.param({"config": {"type": "self_hosted"}}, {"scope": "organization", "config": {"type": "self_hosted"}},
                 [], {}, (), id="scope-unset-is-left-alone"),
    pytest.param({"config": {"type": "cloud", "networking": {"type": "limited", "allowedHosts": ["a.io"]}}}, {}, [],
                 {"config": {"type": "cloud", "networking": limited(allowed_hosts=["a.io"])}},
                 ("config.networking",), id="networking-to-limited-sends-explicit-defaults"),
    pytest.param({}, {"config": {"type": "cloud", "networking": limited(allowed_hosts=["a.io"]),
                                 "packages": dict(EMPTY_PACKAGES)}}, [],
                 {"config": {"type": "cloud", "networking": {"type": "unrestricted"}}},
                 ("config.networking",), id="networking-removed-is-unrestricted"),
    pytest.param({"config": {"type": "cloud", "networking": {"type": "limited", "allowedHosts": ["b", "a"]}}},
                 {"config": {"type": "cloud", "networking": limited(allowed_hosts=["a", "b"]),
                             "packages": dict(EMPTY_PACKAGES)}}, [],
                 {}, (), id="host-order-is-not-drift"),
    pytest.param({"config": {"type": "cloud", "networking": {"type": "limited", "allowedHosts": ["a"]}}},
                 {"config": {"type": "cloud", "networking": limited(allowed_hosts=["a"], allow_mcp_servers=True),
                             "packages": dict(EMPTY_PACKAGES)}}, [],
                 {"config": {"type": "cloud", "networking": limited(allowed_hosts=["a"])}},
                 ("config.networking",), id="limited-flag-removed-is-cleared-to-false"),
    pytest.param({"config": {"type": "cloud", "packages": {"pip": ["x"]}}}, {}, [],
                 {"config": {"type": "cloud", "packages": {"pip": ["x"], "type": "packages"}}},
                 ("config.packages.pip",), id="only-changed-package-lists-are-sent"),
    pytest.param({}, {"config": {"type": "cloud", "networking": {"type": "unrestricted"},
                                 "packages": EMPTY_PACKAGES | {"npm": ["left-pad"], "pip": ["x"]}}}, [],
                 {"config": {"type": "cloud", "packages": {"npm": [], "pip": [], "type": "packages"}}},
                 ("config.packages.npm", "config.packages.pip"), id="packages-removed-are-sent-empty"),
    pytest.param({"config": {"type": "self_hosted"}}, {"config": {"type": "self_hosted"}}, [], {}, (),
                 id="self-hosted-config-has-nothing-to-compare"),
]


@pytest.mark.parametrize(("spec_fields", "remote_fields", "owned", "params", "fields"), PLAN_CASES)
def test_plan_update(spec_fields: dict[str, Any], remote_fields: dict[str, Any], owned: list[str],
                     params: dict[str, Any], fields: tuple[str, ...]) -> None:
    plan = sync.plan_update(spec(**spec_fields), remote(**remote_fields), resource_name="res",
                            owned_metadata_keys=owned)
    assert plan.params == params
    assert plan.fields == fields
    assert plan.in_sync == (not params)


def test_owned_keys_become_the_spec_keys() -> None:
    plan = sync.plan_update(spec(metadata={"b": "1", "a": "2"}), remote(metadata={"old": "x"}), resource_name="res",
                            owned_metadata_keys=["old"])
    assert plan.owned_metadata_keys == ("a", "b")
    assert plan.params["metadata"] == {"a": "2", "b": "1", "old": None}


def test_a_created_environment_is_in_sync_with_its_spec() -> None:
    """What create sends, read back the way the emulator stores it, needs no update."""
    given = spec(description="d", metadata={"t": "1"},
                 config={"type": "cloud", "networking": {"type": "limited", "allowedHosts": ["h"]},
                         "packages": {"pip": ["x"]}})
    stored = remote(description="d", metadata={"t": "1", UID_METADATA_KEY: "u"},
                    config={"type": "cloud", "networking": limited(allowed_hosts=["h"]),
                            "packages": EMPTY_PACKAGES | {"pip": ["x"]}})
    assert sync.plan_update(given, stored, resource_name="res", owned_metadata_keys=["t"]).in_sync


@pytest.mark.parametrize(("spec_type", "remote_type", "problem"), [
    ("cloud", "cloud", None),
    ("self_hosted", "cloud", sync.TYPE_MISMATCH),
    ("cloud", "self_hosted", sync.TYPE_MISMATCH),
])
def test_adoption_requires_the_same_type(spec_type: str, remote_type: str, problem: str | None) -> None:
    found = sync.adoption_problem(spec(config={"type": spec_type}), remote(config={"type": remote_type}))
    assert (found[0] if found else None) == problem


# ----- creating without duplicates -------------------------------------------------------------------

@pytest.mark.parametrize(("status", "spec_fields", "expected"), [
    ({}, {}, True),
    ({"createRequestedBy": "other"}, {}, True),
    ({"createRequestedBy": "me"}, {}, False),
    ({"id": "env_1"}, {}, False),
    ({}, {"externalId": "env_1"}, False),
])
def test_needs_create_claim(status: dict[str, Any], spec_fields: dict[str, Any], expected: bool) -> None:
    assert sync.needs_create_claim(status, spec_fields, "me") is expected


@pytest.mark.parametrize(("claimed_by", "foreign", "unknown", "recreating", "expected"), [
    ("me", False, False, False, False),  # our own fresh claim: nobody can have created it yet
    ("other", False, False, False, True),  # another instance may have sent it and died
    (None, False, False, False, True),
    ("me", True, False, False, True),  # we replaced someone else's claim
    ("me", False, True, False, True),  # our last request timed out or got a 5xx
    ("me", False, False, True, True),
])
def test_must_look_up_before_create(claimed_by: str | None, foreign: bool, unknown: bool, recreating: bool,
                                    expected: bool) -> None:
    assert sync.must_look_up_before_create(
        claimed_by=claimed_by, instance_id="me", foreign_claim_seen=foreign, outcome_unknown=unknown,
        recreating=recreating,
    ) is expected


def test_find_own_prefers_live_environments_and_needs_the_uid() -> None:
    archived = remote(id="env_a", metadata={UID_METADATA_KEY: "u"}, archived_at="2026-05-01T11:00:00Z")
    live = remote(id="env_l", metadata={UID_METADATA_KEY: "u"})
    other = remote(id="env_o", metadata={UID_METADATA_KEY: "v"})
    assert sync.find_own([other, archived, live], "u") == live
    assert sync.find_own([other, archived], "u") == archived
    assert sync.find_own([other], "u") is None


def test_lookup_stops_at_the_first_page_older_than_the_window() -> None:
    start = sync.lookup_window_start(NOW, None)
    assert start == NOW - sync.LOOKUP_CLOCK_SKEW
    newer = remote(created_at="2026-05-01T12:30:00Z")
    older = remote(created_at="2026-05-01T11:00:00Z")
    assert not sync.page_ends_lookup([newer], start)
    assert sync.page_ends_lookup([newer, older], start)
    assert not sync.page_ends_lookup([newer, older], None)
    assert sync.lookup_window_start(NOW, NOW + timedelta(days=1)) == NOW + timedelta(days=1) - sync.LOOKUP_CLOCK_SKEW


# ----- failures --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "retry_after", "retry", "terminal", "reason", "delay"), [
    (400, None, 0, True, sync.INVALID_SPEC, 0.0),
    (422, None, 3, True, sync.INVALID_SPEC, 0.0),
    (404, None, 0, True, sync.NOT_FOUND, 0.0),
    (413, None, 0, True, sync.REJECTED, 0.0),
    (401, None, 0, False, sync.UNAUTHORIZED, 15.0),
    (403, None, 2, False, sync.UNAUTHORIZED, 60.0),
    (429, 7.0, 0, False, sync.RATE_LIMITED, 7.0),  # retry-after wins over backoff
    (429, None, 3, False, sync.RATE_LIMITED, 8.0),
    (503, 2.5, 5, False, sync.API_UNAVAILABLE, 2.5),
    (500, None, 0, False, sync.API_UNAVAILABLE, 1.0),
    (None, None, 20, False, sync.API_UNAVAILABLE, sync.BACKOFF_CAP_SECONDS),
    (409, None, 1, False, sync.API_UNAVAILABLE, 2.0),
])
def test_decide_failure(status: int | None, retry_after: float | None, retry: int, terminal: bool, reason: str,
                        delay: float) -> None:
    decision = sync.decide_failure(ApiFailure(status, "the API's words", retry_after), retry=retry, action="create")
    assert (decision.terminal, decision.reason, decision.delay) == (terminal, reason, delay)
    if terminal:
        assert decision.message == "the API's words"  # verbatim
    else:
        assert "the API's words" in decision.message


ARCHIVED_NOW = remote(archived_at="2026-05-01T11:30:00Z")


@pytest.mark.parametrize(("update_status", "reread", "verdict"), [
    (404, ApiFailure(404, "not found"), "gone"),  # deleted between read and update
    (400, ApiFailure(404, "not found"), "gone"),
    (400, ARCHIVED_NOW, "archived"),  # archived between read and update: read-only
    (404, ARCHIVED_NOW, "archived"),
    (400, remote(), "refused"),  # still standing: the API refused the update itself
    (404, remote(), "refused"),
    (400, ApiFailure(500, "boom"), "undecided"),  # cannot tell: retry rather than give up
    (404, ApiFailure(None, "connection reset"), "undecided"),
    (400, ApiFailure(429, "slow down"), "undecided"),
    (400, ApiFailure(403, "forbidden"), "undecided"),
    (400, ApiFailure(422, "odd"), "refused"),  # a definite answer that explains nothing
    (422, ARCHIVED_NOW, "refused"),  # only 400 and 404 can come from a change underneath
    (500, ApiFailure(404, "not found"), "refused"),
    (409, ARCHIVED_NOW, "refused"),
])
def test_refused_update_verdict(update_status: int, reread: RemoteEnvironment | ApiFailure, verdict: str) -> None:
    failure = ApiFailure(update_status, "the API's words")
    assert sync.refused_update_verdict(failure, reread) == verdict
    assert sync.rereads_after_refused_update(failure) is (update_status in (400, 404))


@pytest.mark.parametrize(("status", "unknown"), [(None, True), (500, True), (503, True), (429, False), (400, False)])
def test_outcome_unknown_only_without_a_definite_answer(status: int | None, unknown: bool) -> None:
    assert ApiFailure(status, "m").outcome_unknown is unknown


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, None),
    ({"retry-after": "3"}, 3.0),
    ({"Retry-After": "1.5"}, 1.5),
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
    ({"retry-after": "-1"}, None),
    ({"retry-after": "soon"}, None),
    ({"retry-after": "Fri, 01 May 2026 12:00:30 GMT"}, 30.0),
])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


def test_retry_after_is_capped() -> None:
    assert sync.retry_delay(0, 10**9) == sync.RETRY_AFTER_CAP_SECONDS


# ----- drift schedule --------------------------------------------------------------------------------

@pytest.mark.parametrize(("annotations", "interval", "complains"), [
    ({}, 300.0, False),
    ({sync.DRIFT_INTERVAL_ANNOTATION: "60"}, 60.0, False),
    ({sync.DRIFT_INTERVAL_ANNOTATION: "0.5"}, 300.0, True),
    ({sync.DRIFT_INTERVAL_ANNOTATION: "often"}, 300.0, True),
    ({sync.DRIFT_INTERVAL_ANNOTATION: "inf"}, 300.0, True),
])
def test_drift_interval(annotations: dict[str, str], interval: float, complains: bool) -> None:
    value, complaint = sync.drift_interval(annotations, 300.0)
    assert value == interval
    assert (complaint is not None) is complains
    if complaint:
        assert sync.DRIFT_INTERVAL_ANNOTATION in complaint


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 90.0), (0.5, 100.0), (0.999999, 110.0)])
def test_jitter_spreads_by_ten_percent(fraction: float, expected: float) -> None:
    assert sync.jittered(100.0, fraction) == pytest.approx(expected, abs=1e-3)


def test_schedule_counts_from_the_later_of_status_and_memory() -> None:
    schedule = sync.DriftSchedule(fraction=0.5, first_seen=NOW - timedelta(hours=1))
    assert schedule.seconds_until_due(now=NOW, last_sync=NOW - timedelta(seconds=40), interval=100) == 60.0
    schedule.checked(now=NOW, fraction=0.5)
    assert schedule.seconds_until_due(now=NOW, last_sync=NOW - timedelta(seconds=40), interval=100) == 100.0
    schedule.failed(now=NOW, retry_in=5)
    assert schedule.seconds_until_due(now=NOW, last_sync=NOW, interval=100) == 5.0
    assert schedule.failures == 1
    schedule.checked(now=NOW, fraction=0.0)
    assert (schedule.failures, schedule.seconds_until_due(now=NOW, last_sync=None, interval=100)) == (0, 90.0)


def test_a_new_object_is_first_checked_one_interval_after_it_was_seen() -> None:
    schedule = sync.DriftSchedule(fraction=0.5, first_seen=NOW)
    assert schedule.seconds_until_due(now=NOW, last_sync=None, interval=100) == 100.0


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0.0), (0.5, 50.0), (0.9, 90.0)])
def test_overdue_checks_after_a_restart_are_spread(fraction: float, expected: float) -> None:
    schedule = sync.DriftSchedule(fraction=fraction, first_seen=NOW)
    assert schedule.seconds_until_due(now=NOW, last_sync=NOW - timedelta(days=1), interval=1000) == expected


def _body(status: dict[str, Any], generation: int = 1, **metadata: Any) -> dict[str, Any]:
    return {"metadata": {"generation": generation, **metadata}, "status": status}


@pytest.mark.parametrize(("body", "blocked"), [
    (_body({"id": "env_1", "observedGeneration": 1}), False),
    (_body({}), True),
    (_body({"createRequestedBy": "me"}), False),  # status lost after a create: the check recovers the ID
    ({**_body({}), "spec": {"externalId": "env_1"}}, False),
    (_body({"id": "env_1"}), False),
    (_body({"id": "env_1", "observedGeneration": 1, "archivedAt": "2026-05-01T00:00:00Z"}), True),
    (_body({"id": "env_1", "observedGeneration": 1}, generation=2), True),
    (_body({"id": "env_1", "observedGeneration": 1}, deletionTimestamp="2026-05-01T00:00:00Z"), True),
    (_body({"id": "env_1", "observedGeneration": 1,
            "conditions": [{"type": "Synced", "status": "False", "reason": "InvalidSpec"}]}), True),
    (_body({"id": "env_1", "observedGeneration": 1,
            "conditions": [{"type": "Synced", "status": "False", "reason": "RateLimited"}]}), False),
    (_body({"createRequestedBy": "me", "observedGeneration": 1,
            "conditions": [{"type": "Synced", "status": "False", "reason": "NotFound"}]}), True),
])
def test_drift_check_blocker(body: dict[str, Any], blocked: bool) -> None:
    assert (sync.drift_check_blocker(body) is not None) is blocked


# ----- conditions, status and deletion ---------------------------------------------------------------

def test_status_for_describes_the_remote_and_releases_the_claim() -> None:
    status = sync.status_for(remote(archived_at="2026-05-01T11:00:00Z"), generation=3, now=NOW,
                             owned_metadata_keys=["a"])
    assert status == {
        "id": "env_1", "type": "cloud", "createdAt": "2026-05-01T10:00:00Z", "updatedAt": "2026-05-01T10:00:00Z",
        "archivedAt": "2026-05-01T11:00:00Z", "observedGeneration": 3, "lastSyncTime": "2026-05-01T12:00:00Z",
        "ownedMetadataKeys": ["a"], "createRequestedBy": None,
    }


def test_failed_conditions_keep_ready_while_the_environment_works() -> None:
    kept = sync.failed_conditions(sync.RATE_LIMITED, "m", ready=True)
    assert [c.type for c in kept] == [sync.SYNCED]
    assert [c.type for c in sync.failed_conditions(sync.INVALID_SPEC, "m", ready=False)] == [sync.READY, sync.SYNCED]


def test_events_follow_news_only() -> None:
    conditions = sync.apply_conditions(None, sync.synced_conditions(sync.CREATED, "m"), generation=1, now=NOW)
    assert not sync.is_new_reason(conditions, sync.ConditionChange(sync.READY, "True", sync.CREATED))
    assert sync.is_new_reason(conditions, sync.ConditionChange(sync.READY, "False", sync.ARCHIVED))
    assert sync.is_new_reason(conditions, sync.ConditionChange(sync.DRIFT_DETECTED, "False", sync.NO_DRIFT))


@pytest.mark.parametrize(("fields", "recreated", "status", "reason"), [
    ((), False, "False", sync.NO_DRIFT),
    (("name",), False, "True", sync.DRIFT_CORRECTED),
    ((), True, "True", sync.RECREATED),
])
def test_drift_conditions(fields: tuple[str, ...], recreated: bool, status: str, reason: str) -> None:
    (change,) = sync.drift_conditions(fields, recreated=recreated)
    assert (change.type, change.status, change.reason) == (sync.DRIFT_DETECTED, status, reason)
    assert all(f in change.message for f in fields)


@pytest.mark.parametrize(("spec_fields", "status", "action"), [
    ({}, {}, "release"),
    ({"deletionPolicy": "Delete"}, {}, "release"),
    # A claimed create without an ID: the environment may exist, carrying the resource UID.
    ({}, {"createRequestedBy": "op-1"}, "archive"),
    ({"deletionPolicy": "Delete"}, {"createRequestedBy": "op-1"}, "delete"),
    ({"deletionPolicy": "Orphan"}, {"createRequestedBy": "op-1"}, "release"),
    ({}, {"id": "env_1"}, "archive"),
    ({"deletionPolicy": "Archive"}, {"id": "env_1"}, "archive"),
    ({"deletionPolicy": "Delete"}, {"id": "env_1"}, "delete"),
    ({"deletionPolicy": "Orphan"}, {"id": "env_1"}, "orphan"),
])
def test_deletion_action(spec_fields: dict[str, Any], status: dict[str, Any], action: str) -> None:
    assert sync.deletion_action(spec_fields, status) == action


@pytest.mark.parametrize(("case", "fields", "trigger", "reason", "event", "drift", "drifted"), [
    ("recreating", (), "check", sync.RECREATED, ("Warning", sync.RECREATED), sync.RECREATED, None),
    ("created", (), "spec", sync.CREATED, ("Normal", sync.CREATED), None, None),
    ("recovered", (), "spec", sync.CREATED, ("Normal", sync.ADOPTED), None, None),
    ("adopting", ("name",), "spec", sync.ADOPTED, ("Normal", sync.ADOPTED), None, None),
    ("", ("name",), "check", sync.DRIFT_CORRECTED, ("Warning", sync.DRIFT_DETECTED), sync.DRIFT_CORRECTED,
     ("name",)),
    ("", (), "check", sync.IN_SYNC, None, sync.NO_DRIFT, ()),
    ("", ("name",), "spec", sync.UPDATED, ("Normal", sync.UPDATED), None, None),
    ("", (), "spec", sync.IN_SYNC, None, None, None),
])
def test_success_report(case: str, fields: tuple[str, ...], trigger: sync.Trigger, reason: str,
                        event: tuple[str, str] | None, drift: str | None, drifted: tuple[str, ...] | None) -> None:
    flags = {flag: flag == case for flag in ("adopting", "created", "recovered", "recreating")}
    report = sync.success_report("env_2", fields, trigger, previous_id="env_1", **flags)
    assert report.reason == reason
    assert (report.event[:2] if report.event else None) == event
    assert [change.reason for change in report.drift] == ([drift] if drift else [])
    assert report.drifted_fields == drifted
    assert all(field in report.message for field in fields)
    if case == "recreating":
        assert "env_1" in report.message and "env_2" in report.message


# ----- the Ready condition as the metric counts it -------------------------------------------------------

@pytest.mark.parametrize(("status", "summary"), [
    (None, ("Unknown", "Unknown")),
    ({}, ("Unknown", "Unknown")),
    ({"conditions": [{"type": "Synced", "status": "True", "reason": "InSync"}]}, ("Unknown", "Unknown")),
    ({"conditions": [{"type": "Ready", "status": "True", "reason": "Adopted"}]}, ("True", "Adopted")),
    ({"conditions": [{"type": "Ready", "status": "False", "reason": "NotFound"}]}, ("False", "NotFound")),
    # Written by hand, or by a future version: counted, without a series of its own.
    ({"conditions": [{"type": "Ready", "status": "False", "reason": "SomethingNew"}]}, ("False", "Other")),
    ({"conditions": [{"type": "Ready", "status": "Maybe", "reason": "InSync"}]}, ("Unknown", "InSync")),
    ({"conditions": "not a list"}, ("Unknown", "Unknown")),
])
def test_ready_summary(status: dict[str, Any] | None, summary: tuple[str, str]) -> None:
    assert sync.ready_summary(status) == summary


def test_every_ready_reason_a_sync_or_failure_reports_is_in_the_vocabulary() -> None:
    assert {sync.CREATED, sync.RECREATED, sync.ADOPTED, sync.UPDATED, sync.IN_SYNC, sync.DRIFT_CORRECTED,
            *sync.TERMINAL_REASONS, sync.UNAUTHORIZED, sync.RATE_LIMITED, sync.API_UNAVAILABLE,
            sync.CREDENTIALS_UNAVAILABLE, sync.ARCHIVED, sync.DELETION_BLOCKED} == sync.READY_REASONS
