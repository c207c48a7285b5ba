"""Environment CRUD, archive and list, driven through the official SDK."""

from __future__ import annotations

import re
from datetime import datetime

import anthropic
import pytest
from anthropic import AsyncAnthropic
from anthropic.types.beta import BetaCloudConfigParams, BetaSelfHostedConfigParams

from environments_operator.emulator.server import EmulatorServer

ENVIRONMENT_KEYS = {
    "id",
    "archived_at",
    "config",
    "created_at",
    "description",
    "metadata",
    "name",
    "scope",
    "type",
    "updated_at",
}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

LIMITED: BetaCloudConfigParams = {
    "type": "cloud",
    "networking": {"type": "limited", "allowed_hosts": ["api.example.com"], "allow_package_managers": True},
    "packages": {"pip": ["pandas", "numpy"]},
}


async def raw_environment(api: AsyncAnthropic, environment_id: str) -> dict[str, object]:
    response = await api.beta.environments.with_raw_response.retrieve(environment_id)
    body = response.http_response.json()
    assert isinstance(body, dict)
    return body


async def test_create_returns_the_documented_shape(api: AsyncAnthropic) -> None:
    environment = await api.beta.environments.create(
        name="python-data-analysis", description="Data analysis", config=LIMITED, metadata={"team": "ml"}
    )
    assert re.fullmatch(r"env_[0-9A-Za-z]{24}", environment.id)
    assert environment.type == "environment"
    assert environment.archived_at is None
    assert environment.config.model_dump() == {
        "networking": {
            "allow_mcp_servers": False,
            "allow_package_managers": True,
            "allowed_hosts": ["api.example.com"],
            "type": "limited",
        },
        "packages": {
            "apt": [],
            "cargo": [],
            "gem": [],
            "go": [],
            "npm": [],
            "pip": ["pandas", "numpy"],
            "type": "packages",
        },
        "type": "cloud",
    }
    body = await raw_environment(api, environment.id)
    # The documented required keys plus scope, as the reference's example of a cloud environment shows.
    assert set(body) == ENVIRONMENT_KEYS
    assert body["scope"] == "organization"
    for field in ("created_at", "updated_at"):
        assert RFC3339.match(str(body[field]))
        datetime.fromisoformat(str(body[field]))


async def test_defaults_cloud_unrestricted_without_config(api: AsyncAnthropic) -> None:
    environment = await api.beta.environments.create(name="bare")
    assert environment.config.model_dump() == {
        "networking": {"type": "unrestricted"},
        "packages": {"apt": [], "cargo": [], "gem": [], "go": [], "npm": [], "pip": [], "type": "packages"},
        "type": "cloud",
    }
    assert environment.description == ""
    assert environment.metadata == {}


@pytest.mark.parametrize("environment_type", ["cloud", "self_hosted"])
async def test_every_environment_has_a_default_scope(api: AsyncAnthropic, environment_type: str) -> None:
    config: BetaCloudConfigParams | BetaSelfHostedConfigParams = (
        {"type": "cloud"} if environment_type == "cloud" else {"type": "self_hosted"}
    )
    environment = await api.beta.environments.create(name="pool", config=config)
    assert environment.config.type == environment_type
    assert environment.scope == "organization"
    account = await api.beta.environments.create(name="mine", config=config, scope="account")
    assert account.scope == "account"


async def test_cloud_environment_takes_a_scope_on_create_and_update(api: AsyncAnthropic) -> None:
    created = await api.beta.environments.create(name="data", config=LIMITED, scope="account")
    assert created.scope == "account"
    assert (await api.beta.environments.retrieve(created.id)).scope == "account"
    assert [environment.scope async for environment in api.beta.environments.list()] == ["account"]

    updated = await api.beta.environments.update(created.id, scope="organization")
    assert updated.scope == "organization"
    # An update without scope keeps it.
    renamed = await api.beta.environments.update(created.id, name="renamed")
    assert (renamed.name, renamed.scope) == ("renamed", "organization")
    assert (await api.beta.environments.retrieve(created.id)).scope == "organization"


async def test_update_keeps_omitted_fields_and_deletes_null_or_empty_metadata(api: AsyncAnthropic) -> None:
    created = await api.beta.environments.create(
        name="env", description="keep me", config=LIMITED, metadata={"a": "1", "b": "2", "c": "3"}
    )
    updated = await api.beta.environments.update(
        created.id,
        metadata={"a": None, "b": "", "d": "4"},
        config={"type": "cloud", "networking": {"type": "limited", "allow_mcp_servers": True}},
    )
    assert updated.name == "env"
    assert updated.description == "keep me"
    assert updated.metadata == {"c": "3", "d": "4"}
    networking = updated.config.model_dump()["networking"]
    # Fields omitted from the limited policy keep their stored values.
    assert networking == {
        "allow_mcp_servers": True,
        "allow_package_managers": True,
        "allowed_hosts": ["api.example.com"],
        "type": "limited",
    }
    assert updated.config.model_dump()["packages"]["pip"] == ["pandas", "numpy"]
    assert updated.updated_at >= created.updated_at
    assert updated.created_at == created.created_at

    renamed = await api.beta.environments.update(created.id, name="renamed")
    assert renamed.name == "renamed"
    assert renamed.metadata == {"c": "3", "d": "4"}


async def test_changing_config_type_is_rejected(api: AsyncAnthropic) -> None:
    created = await api.beta.environments.create(name="env", config={"type": "cloud"})
    with pytest.raises(anthropic.BadRequestError) as caught:
        await api.beta.environments.update(created.id, config={"type": "self_hosted"})
    assert "config.type" in str(caught.value.api_message)
    assert (await api.beta.environments.retrieve(created.id)).config.type == "cloud"


async def test_archive_is_idempotent_and_hides_from_default_list(api: AsyncAnthropic) -> None:
    kept = await api.beta.environments.create(name="kept")
    archived = await api.beta.environments.archive((await api.beta.environments.create(name="old")).id)
    assert archived.archived_at is not None
    again = await api.beta.environments.archive(archived.id)
    assert again.archived_at == archived.archived_at

    default_ids = [environment.id async for environment in api.beta.environments.list()]
    assert default_ids == [kept.id]
    all_ids = [environment.id async for environment in api.beta.environments.list(include_archived=True)]
    assert all_ids == [archived.id, kept.id]


async def test_archived_environment_is_read_only(api: AsyncAnthropic) -> None:
    environment = await api.beta.environments.create(name="old")
    await api.beta.environments.archive(environment.id)
    with pytest.raises(anthropic.BadRequestError, match="archived"):
        await api.beta.environments.update(environment.id, name="new")
    assert (await api.beta.environments.retrieve(environment.id)).name == "old"


async def test_delete_removes_the_environment(api: AsyncAnthropic) -> None:
    environment = await api.beta.environments.create(name="doomed")
    deleted = await api.beta.environments.delete(environment.id)
    assert deleted.model_dump() == {"id": environment.id, "type": "environment_deleted"}
    with pytest.raises(anthropic.NotFoundError):
        await api.beta.environments.retrieve(environment.id)
    with pytest.raises(anthropic.NotFoundError):
        await api.beta.environments.delete(environment.id)


async def test_list_paginates_newest_first_with_a_cursor(api: AsyncAnthropic) -> None:
    created = [(await api.beta.environments.create(name=f"env-{index}")).id for index in range(5)]
    first = await api.beta.environments.list(limit=2)
    assert [environment.id for environment in first.data] == created[::-1][:2]
    assert first.next_page is not None
    everything = [environment.id async for environment in api.beta.environments.list(limit=2)]
    assert everything == created[::-1]
    last = await api.beta.environments.list(limit=5)
    assert last.next_page is None


async def test_list_rejects_a_forged_cursor(api: AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="page"):
        await api.beta.environments.list(page="not-a-cursor")


async def test_environment_not_found_is_404(api: AsyncAnthropic, emulator: EmulatorServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await api.beta.environments.retrieve("env_000000000000000000000000")
    assert caught.value.type == "not_found_error"
