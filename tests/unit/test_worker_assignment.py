"""A warm worker's assignment (``environments_operator.assignment``): the Secret, the in-cluster config, the wait.

The wait runs against ``tests.harness.incluster.FakeInClusterApi``, a small real HTTPS server with a CA of
its own, so TLS verification, the bearer token and the watch's streaming are all real.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from environments_operator import cli
from environments_operator.assignment import (
    AssignmentError,
    InClusterConfig,
    in_cluster_config,
    parse_assignment,
    wait_for_assignment,
)
from environments_operator.worker import ASSIGNMENT_VARIABLE, conflicting_variables, missing_variables
from tests.harness.incluster import NAMESPACE, FakeInClusterApi, WatchEnd, assignment_data

NAME = "work-3f2a9c"
VALUES = assignment_data("work_01AbC", "env_01XyZ", "session_01Qq", "secret-sentinel-value")
EXPECTED = {
    "ANTHROPIC_WORK_ID": "work_01AbC",
    "ANTHROPIC_ENVIRONMENT_ID": "env_01XyZ",
    "ANTHROPIC_SESSION_ID": "session_01Qq",
    "ANTHROPIC_WORK_SECRET": "secret-sentinel-value",
}
# Short, so that the resumptions of these tests take milliseconds.
FAST = {"backoff_initial": 0.02, "backoff_max": 0.1}


def encoded(values: dict[str, str]) -> dict[str, str]:
    return {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}


class TestParseAssignment:
    def test_the_four_keys_become_the_four_variables(self) -> None:
        assert parse_assignment({"data": encoded(VALUES)}, NAME) == EXPECTED

    @pytest.mark.parametrize("key", list(VALUES))
    def test_a_missing_key_is_named_and_no_value_is_shown(self, key: str) -> None:
        data = encoded({k: v for k, v in VALUES.items() if k != key})
        with pytest.raises(AssignmentError, match=f"'{key}' is missing") as raised:
            parse_assignment({"data": data}, NAME)
        assert NAME in str(raised.value) and "sentinel" not in str(raised.value)

    def test_a_value_that_is_not_base64_is_named(self) -> None:
        data = {**encoded(VALUES), "work-secret": "not base64 !!"}
        with pytest.raises(AssignmentError, match="'work-secret' is not base64"):
            parse_assignment({"data": data}, NAME)

    def test_a_secret_without_data_names_the_first_key(self) -> None:
        with pytest.raises(AssignmentError, match="'work-id'"):
            parse_assignment({"metadata": {"name": NAME}}, NAME)


class TestInClusterConfig:
    def test_reads_the_service_account_mount(self, tmp_path: Path) -> None:
        api = FakeInClusterApi()
        api.write_service_account(tmp_path)
        config = in_cluster_config({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                                   tmp_path)
        assert config == InClusterConfig("https://10.96.0.1:443", NAMESPACE, tmp_path / "token", tmp_path / "ca.crt")
        assert config.token() == api.token

    def test_an_ipv6_host_gets_brackets(self, tmp_path: Path) -> None:
        FakeInClusterApi().write_service_account(tmp_path)
        config = in_cluster_config({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path)
        assert config.base_url == "https://[fd00::1]:443"

    def test_no_service_host_is_named(self, tmp_path: Path) -> None:
        FakeInClusterApi().write_service_account(tmp_path)
        with pytest.raises(AssignmentError, match="KUBERNETES_SERVICE_HOST"):
            in_cluster_config({"KUBERNETES_SERVICE_PORT": "443"}, tmp_path)

    @pytest.mark.parametrize("missing", ["token", "ca.crt", "namespace"])
    def test_a_missing_file_of_the_mount_is_named(self, tmp_path: Path, missing: str) -> None:
        FakeInClusterApi().write_service_account(tmp_path)
        (tmp_path / missing).unlink()
        with pytest.raises(AssignmentError, match=str(tmp_path / missing)):
            in_cluster_config({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path)


class TestTheTwoModes:
    def test_a_warm_pod_needs_none_of_the_item_variables(self) -> None:
        assert missing_variables({ASSIGNMENT_VARIABLE: NAME}) == []
        assert missing_variables({})[:1] == ["ANTHROPIC_WORK_ID"]

    def test_a_warm_pod_with_item_variables_is_a_contract_error(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert conflicting_variables({ASSIGNMENT_VARIABLE: NAME, "ANTHROPIC_WORK_ID": "w"}) == ["ANTHROPIC_WORK_ID"]
        assert conflicting_variables({"ANTHROPIC_WORK_ID": "w"}) == []
        monkeypatch.setenv(ASSIGNMENT_VARIABLE, NAME)
        monkeypatch.setenv("ANTHROPIC_WORK_SECRET", "value-sentinel")
        assert cli.main(["worker"]) == 2
        error = capsys.readouterr().err
        assert "ANTHROPIC_WORK_SECRET" in error and "value-sentinel" not in error

    def test_a_warm_pod_without_in_cluster_config_exits_2(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        for name in ("ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_SECRET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(ASSIGNMENT_VARIABLE, NAME)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        assert cli.main(["worker", "--workdir", str(tmp_path), "--service-account-dir", str(tmp_path)]) == 2
        assert "no in-cluster configuration: KUBERNETES_SERVICE_HOST" in capsys.readouterr().err

        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
        assert cli.main(["worker", "--workdir", str(tmp_path), "--service-account-dir", str(tmp_path)]) == 2
        assert f"{tmp_path / 'token'} does not exist" in capsys.readouterr().err


@pytest.fixture
async def api(tmp_path: Path) -> FakeInClusterApi:
    async with FakeInClusterApi() as server:
        server.write_service_account(tmp_path / "sa")
        yield server  # type: ignore[misc]


def config_for(api: FakeInClusterApi, tmp_path: Path) -> InClusterConfig:
    return in_cluster_config(api.environ(), tmp_path / "sa")


async def until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


class TestTheWait:
    async def test_get_404_then_one_watch_that_sees_the_secret_created_later(
        self, api: FakeInClusterApi, tmp_path: Path
    ) -> None:
        waiting = asyncio.create_task(wait_for_assignment(config_for(api, tmp_path), NAME, **FAST))
        await until(lambda: api.watches())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        api.create_secret(NAME, VALUES)
        assert await asyncio.wait_for(waiting, 5) == EXPECTED

        get, watch = api.requests
        assert (get.method, get.path, get.query) == ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{NAME}", {})
        assert watch.path == f"/api/v1/namespaces/{NAMESPACE}/secrets"
        assert watch.query == {"watch": "true", "fieldSelector": f"metadata.name={NAME}", "timeoutSeconds": "300"}
        assert get.authorization == watch.authorization == f"Bearer {api.token}"

    async def test_a_secret_that_exists_already_is_read_with_one_get(
        self, api: FakeInClusterApi, tmp_path: Path
    ) -> None:
        api.create_secret(NAME, VALUES)
        assert await wait_for_assignment(config_for(api, tmp_path), NAME) == EXPECTED
        assert [seen.is_watch for seen in api.requests] == [False]

    async def test_a_secret_created_between_the_get_and_the_watch_comes_as_the_watchs_first_event(
        self, api: FakeInClusterApi, tmp_path: Path
    ) -> None:
        api.get_statuses.append(404)
        api.create_secret(NAME, VALUES)  # the GET is told 404 anyway: as if the Secret came just after it
        assert await wait_for_assignment(config_for(api, tmp_path), NAME) == EXPECTED
        assert [seen.is_watch for seen in api.requests] == [False, True]

    @pytest.mark.parametrize("how", ["clean", "gone", "drop"])
    async def test_a_watch_that_ends_early_is_resumed_after_a_get(
        self, api: FakeInClusterApi, tmp_path: Path, how: str
    ) -> None:
        api.watch_plan.extend([WatchEnd(how, after=0.1), WatchEnd(how, after=0.1)])  # type: ignore[arg-type]
        waiting = asyncio.create_task(wait_for_assignment(config_for(api, tmp_path), NAME, **FAST))
        await until(lambda: len(api.watches()) >= 3)
        api.create_secret(NAME, VALUES)
        assert await asyncio.wait_for(waiting, 5) == EXPECTED
        # GET, watch, GET, watch, GET, watch: never a list.
        assert [seen.is_watch for seen in api.requests] == [False, True] * 3

    async def test_an_apiserver_that_answers_5xx_is_retried(self, api: FakeInClusterApi, tmp_path: Path) -> None:
        api.get_statuses.extend([503, 500])
        api.watch_statuses.append(503)
        api.create_secret(NAME, VALUES)
        assert await asyncio.wait_for(wait_for_assignment(config_for(api, tmp_path), NAME, **FAST), 5) == EXPECTED

    async def test_the_token_is_read_again_on_each_reconnection(self, api: FakeInClusterApi, tmp_path: Path) -> None:
        api.watch_plan.append(WatchEnd("clean", after=0.3))
        waiting = asyncio.create_task(wait_for_assignment(config_for(api, tmp_path), NAME, **FAST))
        await until(lambda: api.watches())
        api.token = "sa-token-2"  # the kubelet rotated it
        (tmp_path / "sa" / "token").write_text(api.token)
        await until(lambda: len(api.watches()) >= 2)
        api.create_secret(NAME, VALUES)
        assert await asyncio.wait_for(waiting, 5) == EXPECTED
        assert {seen.authorization for seen in api.requests[2:]} == {"Bearer sa-token-2"}

    @pytest.mark.parametrize("status", [401, 403])
    async def test_401_or_403_is_a_contract_error_naming_the_secret(
        self, api: FakeInClusterApi, tmp_path: Path, status: int
    ) -> None:
        api.get_statuses.append(status)
        with pytest.raises(AssignmentError) as raised:
            await wait_for_assignment(config_for(api, tmp_path), NAME, **FAST)
        assert f"{NAMESPACE}/{NAME}" in str(raised.value) and str(status) in str(raised.value)

    async def test_403_on_the_watch_is_a_contract_error(self, api: FakeInClusterApi, tmp_path: Path) -> None:
        api.watch_statuses.append(403)
        with pytest.raises(AssignmentError, match="403"):
            await wait_for_assignment(config_for(api, tmp_path), NAME, **FAST)

    async def test_a_secret_without_a_key_is_a_contract_error(self, api: FakeInClusterApi, tmp_path: Path) -> None:
        waiting = asyncio.create_task(wait_for_assignment(config_for(api, tmp_path), NAME, **FAST))
        await until(lambda: api.watches())
        api.create_secret(NAME, {k: v for k, v in VALUES.items() if k != "session-id"})
        with pytest.raises(AssignmentError, match="'session-id' is missing"):
            await asyncio.wait_for(waiting, 5)

    async def test_a_ca_that_is_not_the_servers_is_retried_not_trusted(
        self, api: FakeInClusterApi, tmp_path: Path
    ) -> None:
        FakeInClusterApi().ca.cert_pem.write_to_path(str(tmp_path / "sa" / "ca.crt"))  # another CA
        api.create_secret(NAME, VALUES)
        waiting = asyncio.create_task(wait_for_assignment(config_for(api, tmp_path), NAME, **FAST))
        await asyncio.sleep(0.5)
        assert not waiting.done() and api.requests == []  # no request ever got through TLS
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
