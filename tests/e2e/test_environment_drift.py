"""Drift: changes made outside the operator are found by the periodic check (or "sync now") and handled."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import EnvironmentWorld

SYNC_NOW = "environments.managedagents.dev/sync-now"
CHECK_EVERY_SECOND = {"environments.managedagents.dev/drift-interval-seconds": "1"}
SPEC: dict[str, Any] = {
    "name": "Data", "metadata": {"team": "a"},
    "config": {"type": "cloud", "networking": {"type": "limited", "allowedHosts": ["a.example.com"]}},
}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


# The interval from the operator's settings (the annotation is tested below).
@pytest.mark.parametrize("operator_environment", [{"ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "1"}])
async def test_field_drift_is_reported_and_corrected(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", SPEC)
    obj = await world.wait_ready("data", "Created")
    environment_id = obj["status"]["id"]
    await world.wait_condition("data", "DriftDetected", "False", "NoDrift")  # a check that found nothing

    async with world.api() as client:
        await client.beta.environments.update(
            environment_id, name="Renamed by hand", metadata={"team": "b", "foreign": "x"},
            config={"type": "cloud", "networking": {"type": "unrestricted"}})
    obj = await world.wait_condition("data", "DriftDetected", "True", "DriftCorrected")

    assert "config.networking, metadata.team, name" in condition(obj, "DriftDetected")["message"].replace(
        "name, config.networking, metadata.team", "config.networking, metadata.team, name")
    assert sorted(obj["status"]["driftedFields"]) == ["config.networking", "metadata.team", "name"]
    remote = world.remote(environment_id)
    assert remote is not None
    assert remote["name"] == "Data"
    assert remote["metadata"]["team"] == "a" and remote["metadata"]["foreign"] == "x"
    assert remote["config"]["networking"]["allowed_hosts"] == ["a.example.com"]
    event = await world.wait_event("data", "DriftDetected")
    assert event[0] == "Warning" and "name" in event[2]
    assert condition(obj, "Ready")["status"] == "True"


async def test_an_environment_deleted_outside_is_recreated(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", SPEC, annotations=CHECK_EVERY_SECOND)
    old_id = (await world.wait_ready("data", "Created"))["status"]["id"]
    async with world.api() as client:
        await client.beta.environments.delete(old_id)

    obj = await world.wait_ready("data", "Recreated")
    new_id = obj["status"]["id"]
    assert new_id != old_id
    (remote,) = world.remote_for(obj)
    assert remote["id"] == new_id and remote["name"] == "Data"
    assert condition(obj, "DriftDetected")["reason"] == "Recreated"
    assert old_id in (await world.wait_event("data", "Recreated"))[2]


async def test_an_environment_archived_outside_is_reported_not_fought(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", SPEC)  # the default interval (an hour): only "sync now" checks it in this test
    environment_id = (await world.wait_ready("data", "Created"))["status"]["id"]
    async with world.api() as client:
        await client.beta.environments.archive(environment_id)

    world.patch("data", {"metadata": {"annotations": {SYNC_NOW: "2026-05-01T12:00:00Z"}}})
    obj = await world.wait_condition("data", "Ready", "False", "Archived")
    assert obj["status"]["archivedAt"] is not None
    assert obj["status"]["lastHandledSyncNow"] == "2026-05-01T12:00:00Z"
    assert condition(obj, "Synced")["reason"] == "Archived"
    assert (await world.wait_event("data", "Archived"))[0] == "Warning"

    updates_before = len(world.calls("POST", environment_id))
    world.patch("data", {"spec": {"name": "New name"}})  # a spec change does not fight the archive either
    obj = await world.wait_condition("data", "Ready", "False", "Archived", generation=2)
    assert len(world.calls("POST", environment_id)) == updates_before
    assert world.remote(environment_id)["name"] == "Data"  # type: ignore[index]


# ----- an environment deleted or archived between the operator's read and its update ------------------------

async def start_a_slowed_update(world: EnvironmentWorld) -> str:
    """An Environment in sync, then a spec change whose update request is held at the emulator for a while:
    returns the environment's ID once that update has arrived (read done, update not yet handled)."""
    world.create("data", SPEC)
    environment_id = str((await world.wait_ready("data", "Created"))["status"]["id"])
    await world.fault({"route": "environments.update", "effect": "latency", "latency_ms": 1000, "times": 1})
    world.patch("data", {"spec": {"name": "Renamed"}})
    await world.kube.wait_until(lambda: world.calls("POST", environment_id), message="the update at the emulator")
    assert world.calls("GET", environment_id)  # the operator read the environment before updating it
    return environment_id


async def test_an_environment_archived_during_an_update_is_reported_archived(environment_world: EnvironmentWorld
                                                                            ) -> None:
    world = environment_world
    environment_id = await start_a_slowed_update(world)
    async with world.api() as client:
        await client.beta.environments.archive(environment_id)

    obj = await world.wait_condition("data", "Ready", "False", "Archived", generation=2)
    assert condition(obj, "Synced")["reason"] == "Archived"
    assert obj["status"]["archivedAt"] is not None and obj["status"]["id"] == environment_id
    assert (await world.wait_event("data", "Archived"))[0] == "Warning"
    assert "InvalidSpec" not in [event[1] for event in world.events("data")]
    (update,) = world.calls("POST", environment_id)
    assert update.status == 400  # the API did refuse the update: the re-read explained why
    assert world.remote(environment_id)["name"] == "Data"  # type: ignore[index]


async def test_an_environment_deleted_during_an_update_is_recreated(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    old_id = await start_a_slowed_update(world)
    async with world.api() as client:
        await client.beta.environments.delete(old_id)

    obj = await world.wait_ready("data", "Recreated", generation=2)
    new_id = obj["status"]["id"]
    assert new_id != old_id
    (remote,) = world.remote_for(obj)
    assert remote["id"] == new_id and remote["name"] == "Renamed"
    assert condition(obj, "DriftDetected")["reason"] == "Recreated"
    assert old_id in (await world.wait_event("data", "Recreated"))[2]
    assert "NotFound" not in [event[1] for event in world.events("data")]
    (update,) = world.calls("POST", old_id)
    assert update.status == 404


async def test_an_update_refused_while_the_environment_stands_keeps_the_api_s_words(
        environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", SPEC)
    environment_id = (await world.wait_ready("data", "Created"))["status"]["id"]
    refusal = "name: must be at most 64 characters"
    await world.fault({"route": "environments.update", "effect": "error", "status": 400, "message": refusal,
                       "times": 1})

    world.patch("data", {"spec": {"name": "Renamed"}})
    obj = await world.wait_condition("data", "Ready", "False", "InvalidSpec", generation=2)
    assert condition(obj, "Ready")["message"] == refusal  # verbatim, after a re-read found it standing
    (update,) = world.calls("POST", environment_id)
    assert any(read.at > update.at for read in world.calls("GET", environment_id))  # the re-read
    assert world.remote(environment_id)["archived_at"] is None  # type: ignore[index]
