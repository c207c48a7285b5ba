"""Environment controller under failure: crashes, API errors (injected through the emulator), bad keys."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from environments_operator.devcluster.kube import ENVIRONMENTS
from tests.e2e.conftest import SECRET_API_KEY, EnvironmentWorld
from tests.harness.emulator import API_KEY

UID_KEY = "managedagents.dev/resource-uid"
CHECK_EVERY_SECOND = {"environments.managedagents.dev/drift-interval-seconds": "1"}
CLOUD: dict[str, Any] = {"config": {"type": "cloud"}}


def ready_message(obj: dict[str, Any]) -> str:
    return str(next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")["message"])


async def test_a_crash_between_create_and_status_write_leaves_no_duplicate(environment_world: EnvironmentWorld
                                                                          ) -> None:
    world = environment_world
    # The status write that records the remote ID never lands, as if the operator died right before it.
    lost = world.kube.fail("patch", ENVIRONMENTS, subresource="status", code=500, times=None,
                           when=lambda body: "id" in (((body or {}).get("status")) or {}))
    uid = world.create("data", CLOUD, annotations=CHECK_EVERY_SECOND)["metadata"]["uid"]
    await world.kube.wait_until(lambda: any(e.metadata.get(UID_KEY) == uid
                                            for e in world.emulator.state.environments.values()),
                                message="the create request at the emulator")
    world.operator.kill()
    await asyncio.sleep(0.3)  # a write already on the wire when the operator died still meets the fault
    lost.remove()

    await world.operator.start()
    obj = await world.wait_ready("data", timeout=15)
    (remote,) = world.remote_for(obj)
    assert obj["status"]["id"] == remote["id"]
    assert len(world.calls("POST")) == 1
    assert "created by an interrupted attempt" in (await world.wait_event("data", "Adopted"))[2]


async def test_a_create_whose_answer_is_lost_is_not_sent_twice(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    # The environment is created, but the operator sees a 503: the outcome is unknown to it.
    await world.fault({"route": "environments.create", "effect": "error", "status": 503, "when": "after",
                       "retry_after_ms": 100, "times": 1})
    world.create("data", CLOUD)
    obj = await world.wait_ready("data")
    assert len(world.remote_for(obj)) == 1
    assert len(world.calls("POST")) == 1  # the retry looked the environment up instead
    assert world.calls("GET")  # the lookup


async def test_deleting_during_an_unknown_create_outcome_applies_the_policy_to_what_it_created(
        environment_world: EnvironmentWorld) -> None:
    world = environment_world
    # The environment is created, the operator sees a 503 and waits a minute before looking for it.
    await world.fault({"route": "environments.create", "effect": "error", "status": 503, "when": "after",
                       "retry_after_ms": 60_000, "times": 1})
    uid = world.create("data", CLOUD)["metadata"]["uid"]
    await world.wait_condition("data", "Ready", "False", "ApiUnavailable")

    world.delete("data")
    await world.wait_gone("data")
    (remote,) = [e for e in world.emulator.state.environments.values() if e.metadata.get(UID_KEY) == uid]
    assert remote.archived_at is not None  # deletionPolicy Archive, the default: not left behind
    assert len(world.calls("POST")) == 1


async def test_a_400_is_terminal_for_its_generation_and_a_new_generation_retries(
        environment_world: EnvironmentWorld) -> None:
    world = environment_world
    refusal = "config.packages.pip[0]: package 'pandsa' does not exist"
    await world.fault({"route": "environments.create", "effect": "error", "status": 400, "message": refusal,
                       "times": 1})
    world.create("typo", {"config": {"type": "cloud", "packages": {"pip": ["pandsa"]}}})
    obj = await world.wait_condition("typo", "Ready", "False", "InvalidSpec")
    assert ready_message(obj) == refusal  # the API's words, verbatim
    assert obj["status"]["observedGeneration"] == 1
    assert (await world.wait_event("typo", "InvalidSpec"))[0] == "Warning"

    world.create("fine", CLOUD)  # other resources keep working
    await world.wait_ready("fine")
    assert len(world.calls("POST")) == 2  # no retry of the refused generation

    world.patch("typo", {"spec": {"config": {"packages": {"pip": ["pandas"]}}}})
    obj = await world.wait_ready("typo", "Created", generation=2)
    assert world.remote(obj["status"]["id"])["config"]["packages"]["pip"] == ["pandas"]  # type: ignore[index]


async def test_a_spec_the_api_refuses_leaves_every_other_resource_working(environment_world: EnvironmentWorld
                                                                         ) -> None:
    world = environment_world
    # Valid by the CRD (up to 4096 characters), not by the emulator's API (up to 2048).
    world.create("bad", {"description": "x" * 3000, "config": {"type": "cloud"}})
    for index in range(5):
        world.create(f"good-{index}", CLOUD)
    for index in range(5):
        await world.wait_ready(f"good-{index}", "Created")
    bad = await world.wait_condition("bad", "Ready", "False", "InvalidSpec")
    assert ready_message(bad) == "description: is 3000 characters long; the limit is 2048"


async def test_a_429_is_retried_after_retry_after(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    await world.fault({"route": "environments.create", "effect": "error", "status": 429, "retry_after_ms": 500,
                       "times": 2})
    world.create("data", CLOUD)
    limited = await world.wait_condition("data", "Ready", "False", "RateLimited")
    assert "retrying in 0.5s" in ready_message(limited)
    obj = await world.wait_ready("data", "Created")
    attempts = world.calls("POST")
    assert len(attempts) == 3
    assert all(later.at - earlier.at >= 0.45 for earlier, later in itertools.pairwise(attempts))
    assert len(world.remote_for(obj)) == 1


async def test_a_5xx_is_retried_with_backoff(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("data", CLOUD)
    obj = await world.wait_ready("data", "Created")
    await world.fault({"route": "environments.update", "effect": "error", "status": 500,
                       "message": "internal trouble", "times": 1})

    world.patch("data", {"spec": {"name": "renamed"}})
    failing = await world.wait_condition("data", "Synced", "False", "ApiUnavailable")
    synced = next(c for c in failing["status"]["conditions"] if c["type"] == "Synced")
    assert "HTTP 500: internal trouble" in synced["message"]
    assert next(c for c in failing["status"]["conditions"] if c["type"] == "Ready")["status"] == "True"  # still works
    await world.wait_ready("data", "Updated", generation=2)
    updates = [r for r in world.calls("POST", obj["status"]["id"]) if r.body.get("name") == "renamed"]
    assert len(updates) == 2 and updates[1].at - updates[0].at >= 0.95  # the first backoff step: 1 s


async def test_a_missing_secret_is_reported_and_picked_up_once_created(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.create("keyed", {**CLOUD, "apiKeySecretRef": {"name": "api-key", "key": "token"}})
    obj = await world.wait_condition("keyed", "Ready", "False", "CredentialsUnavailable")
    assert ready_message(obj).startswith("Secret ns/api-key not found")
    assert world.calls("POST") == []

    world.create_secret("api-key", "token", SECRET_API_KEY)
    obj = await world.wait_ready("keyed", "Created")
    (create,) = world.calls("POST")
    assert create.credential == SECRET_API_KEY and create.credential != API_KEY  # the Secret's key won


async def test_a_key_the_api_refuses_is_reported(environment_world: EnvironmentWorld) -> None:
    world = environment_world
    world.secrets.append("sk-ant-api03-revoked")
    world.create_secret("old-key", "token", "sk-ant-api03-revoked")
    world.create("keyed", {**CLOUD, "apiKeySecretRef": {"name": "old-key", "key": "token"}})
    obj = await world.wait_condition("keyed", "Ready", "False", "Unauthorized")
    message = ready_message(obj)
    assert "HTTP 401" in message and "Secret ns/old-key key 'token'" in message
