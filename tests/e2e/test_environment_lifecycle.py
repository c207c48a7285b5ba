"""Environment lifecycle end to end: create, update, adopt and delete, on kmock and the emulator."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.e2e.conftest import EnvironmentWorld

UID_KEY = "managedagents.dev/resource-uid"

LIMITED_CLOUD: dict[str, Any] = {
    "name": "Data science",
    "description": "Python data stack",
    "metadata": {"team": "analytics", "cost-center": "4711"},
    "config": {
        "type": "cloud",
        "networking": {"type": "limited", "allowedHosts": ["api.example.com"], "allowPackageManagers": True},
        "packages": {"pip": ["pandas==2.2.3", "numpy"], "apt": ["ripgrep"]},
    },
}


async def test_creates_a_cloud_environment_with_limited_networking(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", LIMITED_CLOUD)
    obj = await world.wait_ready("data", "Created")

    status = obj["status"]
    (remote,) = world.remote_for(obj)
    assert status["id"] == remote["id"] and status["id"].startswith("env_")
    assert status["type"] == "cloud"
    assert status["createdAt"] == remote["created_at"] and status["updatedAt"] == remote["updated_at"]
    assert status.get("archivedAt") is None  # null in a merge patch: absent
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert status["lastSyncTime"]
    assert status["ownedMetadataKeys"] == ["cost-center", "team"]
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Ready": ("True", "Created"), "Synced": ("True", "Created")}

    assert remote["name"] == "Data science" and remote["description"] == "Python data stack"
    assert remote["metadata"] == {"team": "analytics", "cost-center": "4711", UID_KEY: obj["metadata"]["uid"]}
    assert remote["config"]["networking"] == {
        "type": "limited", "allowed_hosts": ["api.example.com"], "allow_package_managers": True,
        "allow_mcp_servers": False}
    assert remote["config"]["packages"]["pip"] == ["pandas==2.2.3", "numpy"]
    assert remote["config"]["packages"]["apt"] == ["ripgrep"]
    # One request: the create (camelCase mapped to snake_case), nothing read back, nothing updated.
    assert [(r.method, r.path) for r in world.requests] == [("POST", "/v1/environments")]
    assert world.requests[0].body["config"]["networking"] == {
        "type": "limited", "allowed_hosts": ["api.example.com"], "allow_package_managers": True}
    assert await world.wait_event("data", "Created") == ("Normal", "Created", f"created environment {status['id']}")


async def test_creates_a_self_hosted_environment(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("pool", {"scope": "account", "config": {"type": "self_hosted"}})
    obj = await world.wait_ready("pool", "Created")

    (remote,) = world.remote_for(obj)
    assert remote["config"] == {"type": "self_hosted"}
    assert remote["scope"] == "account"
    assert remote["name"] == "pool"  # spec.name defaults to the resource name
    assert obj["status"]["type"] == "self_hosted"


async def test_update_sends_only_what_changed_and_keeps_foreign_metadata(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", {**LIMITED_CLOUD, "metadata": {"a": "1", "b": "1"},
                          "config": {**LIMITED_CLOUD["config"], "packages": {"pip": ["numpy"], "npm": ["left-pad"]}}})
    obj = await world.wait_ready("data", "Created")
    environment_id = obj["status"]["id"]
    async with world.api() as client:  # somebody else's key, written out of band
        await client.beta.environments.update(environment_id, metadata={"foreign": "keep me"})

    world.patch("data", {"spec": {
        "name": "Renamed",
        "description": None,  # removed: cleared remotely
        "metadata": {"a": None, "b": "2", "c": "3"},  # a removed, b changed, c added
        "config": {"networking": {"allowedHosts": ["b.example.com", "a.example.com"], "allowPackageManagers": None},
                   "packages": {"pip": ["numpy", "scipy"], "npm": None}},
    }})
    obj = await world.wait_ready("data", "Updated", generation=2)

    remote = world.remote(environment_id)
    assert remote is not None
    assert remote["name"] == "Renamed" and remote["description"] == ""
    assert remote["metadata"] == {"b": "2", "c": "3", "foreign": "keep me", UID_KEY: obj["metadata"]["uid"]}
    assert remote["config"]["networking"] == {
        "type": "limited", "allowed_hosts": ["b.example.com", "a.example.com"], "allow_package_managers": False,
        "allow_mcp_servers": False}
    assert remote["config"]["packages"]["pip"] == ["numpy", "scipy"]
    assert remote["config"]["packages"]["npm"] == []
    assert obj["status"]["ownedMetadataKeys"] == ["b", "c"]
    assert obj["status"]["observedGeneration"] == 2

    (update,) = [r for r in world.calls("POST", environment_id) if r.body.get("name") == "Renamed"]
    assert update.body == {
        "name": "Renamed",
        "description": "",
        "metadata": {"a": None, "b": "2", "c": "3"},
        "config": {"type": "cloud",
                   "networking": {"type": "limited", "allowed_hosts": ["b.example.com", "a.example.com"],
                                  "allow_package_managers": False, "allow_mcp_servers": False},
                   "packages": {"npm": [], "pip": ["numpy", "scipy"], "type": "packages"}},
    }
    assert "metadata.a" in (await world.wait_event("data", "Updated"))[2]

    world.patch("data", {"spec": {"config": {"networking": None}}})  # back to the default: unrestricted
    await world.wait_ready("data", "Updated", generation=3)
    assert world.remote(environment_id)["config"]["networking"] == {"type": "unrestricted"}  # type: ignore[index]


async def test_adopts_an_existing_environment(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    async with world.api() as client:
        existing = await client.beta.environments.create(
            name="legacy", config={"type": "cloud"}, metadata={"owner": "someone-else"})
        self_hosted = await client.beta.environments.create(name="other", config={"type": "self_hosted"})
    creates_before = len(world.calls("POST"))

    world.create("legacy", {"externalId": existing.id, "name": "adopted", "metadata": {"team": "a"},
                            "config": {"type": "cloud"}})
    world.create("missing", {"externalId": "env_doesNotExist1", "config": {"type": "cloud"}})
    world.create("mismatch", {"externalId": self_hosted.id, "config": {"type": "cloud"}})

    obj = await world.wait_ready("legacy", "Adopted")
    assert obj["status"]["id"] == existing.id
    remote = world.remote(existing.id)
    assert remote is not None
    assert remote["name"] == "adopted"
    assert remote["metadata"] == {"owner": "someone-else", "team": "a"}  # foreign key kept, no UID stamped
    assert obj["status"]["ownedMetadataKeys"] == ["team"]
    assert (await world.wait_event("legacy", "Adopted"))[0] == "Normal"

    missing = await world.wait_condition("missing", "Ready", "False", "NotFound")
    ready = next(c for c in missing["status"]["conditions"] if c["type"] == "Ready")
    assert "env_doesNotExist1" in ready["message"] and "spec.externalId" in ready["message"]
    mismatch = await world.wait_condition("mismatch", "Ready", "False", "TypeMismatch")
    assert "self_hosted" in next(c for c in mismatch["status"]["conditions"] if c["type"] == "Ready")["message"]

    assert len(world.calls("POST")) == creates_before  # adopting never creates
    await asyncio.sleep(1.2)  # longer than the first retry delay of a temporary failure
    assert len(world.calls("GET", "env_doesNotExist1")) == 1  # terminal for this generation: no crash loop


@pytest.mark.parametrize(("policy", "remote_after"), [
    ("Archive", "archived"), ("Delete", "gone"), ("Orphan", "untouched"),
])
async def test_deletion_policy(environment_world: EnvironmentWorld, policy: str, remote_after: str) -> None:
    world = environment_world
    spec: dict[str, Any] = {"config": {"type": "cloud"}}
    if policy != "Archive":
        spec["deletionPolicy"] = policy  # Archive is the default
    world.create("doomed", spec)
    environment_id = (await world.wait_ready("doomed"))["status"]["id"]

    world.delete("doomed")
    await world.wait_gone("doomed")

    remote = world.remote(environment_id)
    if remote_after == "archived":
        assert remote is not None and remote["archived_at"] is not None
        await world.wait_event("doomed", "Archived")
    elif remote_after == "gone":
        assert remote is None
        await world.wait_event("doomed", "Deleted")
    else:
        assert remote is not None and remote["archived_at"] is None
        await world.wait_event("doomed", "Orphaned")


async def test_deleting_counts_an_environment_already_gone_as_deleted(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("doomed", {"config": {"type": "cloud"}, "deletionPolicy": "Delete"})
    environment_id = (await world.wait_ready("doomed"))["status"]["id"]
    async with world.api() as client:
        await client.beta.environments.delete(environment_id)
    world.delete("doomed")
    await world.wait_gone("doomed")


async def test_a_stuck_deletion_says_why_and_finishes_when_it_can(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("doomed", {"config": {"type": "cloud"}})
    environment_id = (await world.wait_ready("doomed"))["status"]["id"]
    await world.fault({"route": "environments.archive", "effect": "error", "status": 503,
                       "message": "this key may not archive environments", "times": 1})

    world.delete("doomed")
    blocked = await world.wait_condition("doomed", "Ready", "False", "DeletionBlocked")
    message = next(c for c in blocked["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert f"cannot archive environment {environment_id}: HTTP 503: this key may not archive environments" in message
    await world.wait_gone("doomed", timeout=30)  # the retry after backoff succeeds
    assert world.remote(environment_id)["archived_at"] is not None  # type: ignore[index]


async def test_a_resource_never_synced_is_released_at_once(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("unsynced", {"config": {"type": "cloud"}, "apiKeySecretRef": {"name": "absent", "key": "k"}})
    await world.wait_condition("unsynced", "Ready", "False", "CredentialsUnavailable")
    world.delete("unsynced")
    await world.wait_gone("unsynced")
    assert world.calls("POST") == []
