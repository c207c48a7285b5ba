"""The fake apiserver follows real apiserver rules where kmock 0.8 does not (over HTTP, as the operator sees it)."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from typing import Any

import aiohttp
import kubernetes
import pytest

from environments_operator.devcluster.kube import ENVIRONMENTS, NAMESPACES, PODS, SECRETS, Kube, RbacUse, start_kube
from environments_operator.devcluster.recorder import RBAC_RECORD_ENV, SESSION_RBAC_USES, load_rbac_record

NS = "ns1"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def http(kube: Kube, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, \
            session.request(method, kube.url + path, json=body, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


def environment(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec or {"x": 1}}


async def test_new_objects_get_system_metadata_and_pods_start_pending(kube: Kube) -> None:
    status, env = await http(kube, "POST", ENVIRONMENTS.path(NS), {**environment("e1"), "status": {"bogus": 1}})
    assert status == 201
    meta = env["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1 and int(meta["resourceVersion"])
    assert "status" not in env  # the status subresource ignores status on create
    _, pod = await http(kube, "POST", PODS.path(NS), {"metadata": {"name": "p1"}, "spec": {"containers": []}})
    assert pod["status"] == {"phase": "Pending"}
    _, generated = await http(kube, "POST", PODS.path(NS), {"metadata": {"generateName": "worker-"}})
    assert generated["metadata"]["name"].startswith("worker-") and len(generated["metadata"]["name"]) == 12


async def test_generation_counts_spec_changes_only(kube: Kube) -> None:
    kube.create(ENVIRONMENTS, environment("e1"), NS)
    await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), {"metadata": {"labels": {"a": "b"}}}, MERGE)
    await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1", "status"), {"status": {"phase": "x"}}, MERGE)
    assert kube.get(ENVIRONMENTS, "e1", NS)["metadata"]["generation"] == 1
    _, patched = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), {"spec": {"x": 2}}, MERGE)
    assert patched["metadata"]["generation"] == 2


async def test_status_subresource_separates_spec_and_status(kube: Kube) -> None:
    kube.create(ENVIRONMENTS, environment("e1"), NS)
    _, main = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), {"spec": {"x": 2}, "status": {"a": 1}}, MERGE)
    assert main["spec"] == {"x": 2} and "status" not in main
    _, sub = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1", "status"), {"spec": {"x": 3}, "status": {"a": 1}},
                        MERGE)
    assert sub["spec"] == {"x": 2} and sub["status"] == {"a": 1}


async def test_a_write_that_changes_nothing_keeps_the_resource_version(kube: Kube) -> None:
    created = kube.create(ENVIRONMENTS, environment("e1"), NS)
    _, patched = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), {"spec": {"x": 1}}, MERGE)
    assert patched["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


async def test_namespaces_are_served_and_core_discovery_names_v1(kube: Kube) -> None:
    kube.ensure_namespace(NS)
    assert (await http(kube, "GET", "/api/v1/namespaces"))[1]["items"][0]["metadata"]["name"] == NS
    assert (await http(kube, "GET", f"/api/v1/namespaces/{NS}"))[1]["status"] == {"phase": "Active"}
    _, core = await http(kube, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    assert {"pods", "pods/status", "secrets", "namespaces", "events"} <= {r["name"] for r in core["resources"]}


@pytest.mark.parametrize(("selector", "expected"), [
    ("tier=web", ["a", "b"]),
    ("tier==web,zone!=z1", ["b"]),
    ("tier in (web,db)", ["a", "b", "c"]),
    ("tier notin (web)", ["c", "d"]),
    ("zone", ["a", "b"]),
    ("!zone", ["c", "d"]),
])
async def test_label_selectors_filter_lists(kube: Kube, selector: str, expected: list[str]) -> None:
    for name, labels in [("a", {"tier": "web", "zone": "z1"}), ("b", {"tier": "web", "zone": "z2"}),
                         ("c", {"tier": "db"}), ("d", {})]:
        kube.create(PODS, {"metadata": {"name": name, "labels": labels}}, NS)
    _, listed = await http(kube, "GET", PODS.path(NS) + "?labelSelector=" + selector.replace(" ", "%20"))
    assert [item["metadata"]["name"] for item in listed["items"]] == expected
    assert [pod["metadata"]["name"] for pod in kube.list(PODS, NS, labels=selector)] == expected


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[tuple[str, str]]:
    events = []
    for _ in range(count):
        line = await asyncio.wait_for(response.content.readline(), 5)
        event = json.loads(line)
        events.append((event["type"], event["object"]["metadata"]["name"]))
    return events


async def test_watch_applies_label_selectors_to_changes(kube: Kube) -> None:
    kube.create(PODS, {"metadata": {"name": "in", "labels": {"pool": "a"}}}, NS)
    kube.create(PODS, {"metadata": {"name": "out", "labels": {"pool": "b"}}}, NS)
    async with aiohttp.ClientSession() as session, \
            session.get(kube.url + PODS.path(NS) + "?watch=true&labelSelector=pool%3Da") as response:
        assert await read_events(response, 1) == [("ADDED", "in")]
        kube.patch(PODS, "in", {"metadata": {"labels": {"pool": "b"}}}, NS)  # leaves the selection
        kube.patch(PODS, "out", {"metadata": {"labels": {"pool": "a"}}}, NS)  # enters it
        kube.patch(PODS, "in", {"metadata": {"annotations": {"a": "b"}}}, NS)  # outside the selection: not shown
        kube.delete(PODS, "out", NS)
        assert await read_events(response, 3) == [("DELETED", "in"), ("ADDED", "out"), ("DELETED", "out")]


async def test_watch_from_a_resource_version_replays_what_was_missed(kube: Kube) -> None:
    kube.create(ENVIRONMENTS, environment("old"), NS)
    _, listed = await http(kube, "GET", ENVIRONMENTS.path(NS))
    kube.create(ENVIRONMENTS, environment("new"), NS)
    kube.patch(ENVIRONMENTS, "old", {"spec": {"x": 5}}, NS)
    since = listed["metadata"]["resourceVersion"]
    async with aiohttp.ClientSession() as session, \
            session.get(kube.url + ENVIRONMENTS.path(NS) + f"?watch=true&resourceVersion={since}") as response:
        assert await read_events(response, 2) == [("ADDED", "new"), ("MODIFIED", "old")]


async def test_put_replaces_and_a_stale_resource_version_conflicts(kube: Kube) -> None:
    created = kube.create(ENVIRONMENTS, environment("e1"), NS)
    body = {**created, "spec": {"y": 2}}
    status, replaced = await http(kube, "PUT", ENVIRONMENTS.path(NS, "e1"), body)
    assert status == 200 and replaced["spec"] == {"y": 2}
    status, error = await http(kube, "PUT", ENVIRONMENTS.path(NS, "e1"), body)  # the old resourceVersion again
    assert (status, error["reason"]) == (409, "Conflict")


async def test_json_patch_applies_and_a_failed_test_is_422(kube: Kube) -> None:
    created = kube.create(ENVIRONMENTS, environment("e1"), NS)
    json_patch = {"Content-Type": "application/json-patch+json"}
    rv = created["metadata"]["resourceVersion"]
    status, patched = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["f1"]},
    ], json_patch)
    assert status == 200 and patched["metadata"]["finalizers"] == ["f1"]
    status, error = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv}], json_patch)
    assert (status, error["reason"]) == (422, "Invalid")


async def test_strategic_merge_patch_works_for_pods_only(kube: Kube) -> None:
    smp = {"Content-Type": "application/strategic-merge-patch+json"}
    kube.create(PODS, {"metadata": {"name": "p1", "finalizers": ["a"]}}, NS)
    _, pod = await http(kube, "PATCH", PODS.path(NS, "p1"), {"metadata": {"finalizers": ["b"]}}, smp)
    assert pod["metadata"]["finalizers"] == ["a", "b"]  # finalizers merge, unlike in a merge patch
    kube.create(ENVIRONMENTS, environment("e1"), NS)
    status, error = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), {"spec": {"x": 2}}, smp)
    assert (status, error["reason"]) == (415, "UnsupportedMediaType")


async def test_finalizers_hold_deletion_until_removed(kube: Kube) -> None:
    kube.create(ENVIRONMENTS, {**environment("e1"), "metadata": {"name": "e1", "finalizers": ["f"]}}, NS)
    status, deleting = await http(kube, "DELETE", ENVIRONMENTS.path(NS, "e1"))
    assert status == 200 and deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["generation"] == 2
    status, error = await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"),
                               {"metadata": {"finalizers": ["f", "g"]}}, MERGE)
    assert (status, error["reason"]) == (422, "Invalid")  # no new finalizers while deleting
    await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1"), {"metadata": {"finalizers": []}}, MERGE)
    assert kube.get(ENVIRONMENTS, "e1", NS) is None


@pytest.mark.parametrize(("method", "path", "body", "code", "reason"), [
    ("GET", PODS.path(NS, "missing"), None, 404, "NotFound"),
    ("POST", PODS.path(NS), {"metadata": {"name": "dup"}}, 409, "AlreadyExists"),
    ("POST", PODS.path(NS), {"metadata": {"name": "Not_DNS"}}, 422, "Invalid"),
    ("POST", PODS.path(NS), {"metadata": {"name": "p", "labels": {"k": "x" * 64}}}, 422, "Invalid"),
    ("POST", SECRETS.path(NS), {"metadata": {"name": "s"}, "data": {"k": "not base64!"}}, 400, "BadRequest"),
    ("GET", "/api/v1/configmaps", None, 404, "NotFound"),
    ("PATCH", PODS.path(NS, "dup"), {"spec": {"containers": [{"name": "c", "image": "i", "env": []}]}}, 422,
     "Invalid"),  # a pod's spec is immutable but for images and a few more
])
async def test_errors_come_as_standard_status_bodies(kube: Kube, method: str, path: str, body: Any, code: int,
                                                     reason: str) -> None:
    kube.create(PODS, {"metadata": {"name": "dup"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, NS)
    status, error = await http(kube, method, path, body, MERGE if method == "PATCH" else None)
    assert (status, error["kind"], error["status"], error["reason"], error["code"]) == \
        (code, "Status", "Failure", reason, code)


async def test_injected_failures_answer_without_touching_the_store(kube: Kube) -> None:
    fault = kube.fail("create", PODS, code=403, message="exceeded quota: q1", times=2,
                      when=lambda body: body["metadata"]["name"].startswith("w"))
    outcomes = [(await http(kube, "POST", PODS.path(NS), {"metadata": {"name": name}}))[0]
                for name in ("w1", "other", "w2", "w3")]
    assert outcomes == [403, 201, 403, 201]
    assert fault.hits == 2 and kube.get(PODS, "w1", NS) is None and kube.get(PODS, "w2", NS) is None
    status, _ = await http(kube, "POST", PODS.path(NS), {"metadata": {"name": "w4"}})
    assert status == 201  # the fault is used up


async def test_a_hold_commits_first_and_answers_when_released(kube: Kube) -> None:
    hold = kube.hold("create", PODS)
    request = asyncio.create_task(http(kube, "POST", PODS.path(NS), {"metadata": {"name": "p1"}}))
    await hold.wait_arrived()
    assert kube.get(PODS, "p1", NS) is not None and not request.done()
    hold.release()
    assert (await request)[0] == 201


async def test_the_kubernetes_client_works_against_it(kube: Kube) -> None:
    # Our adapters use the official client (through asyncio.to_thread); it must meet no kmock gap.
    def roundtrip() -> tuple[list[str], str, str, str]:
        api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(kube.kubeconfig)))
        labels = {"managedagents.dev/worker-pool": "wp1"}
        spec = {"containers": [{"name": "c", "image": "i"}]}
        api.create_namespaced_pod(NS, {"metadata": {"name": "p1", "labels": labels}, "spec": spec})
        api.create_namespaced_pod(NS, {"metadata": {"name": "p2"}, "spec": spec})
        listed = api.list_namespaced_pod(NS, label_selector="managedagents.dev/worker-pool=wp1")
        api.patch_namespaced_pod("p1", NS, {"metadata": {"annotations": {"a": "b"}}})
        pod = api.read_namespaced_pod("p1", NS)
        pod.metadata.labels["extra"] = "yes"
        replaced = api.replace_namespaced_pod("p1", NS, pod)
        api.create_namespaced_secret(NS, {"metadata": {"name": "s1"}, "stringData": {"k": "v"}})
        secret = api.read_namespaced_secret("s1", NS)
        api.delete_namespaced_pod("p2", NS)
        try:
            api.read_namespaced_pod("p2", NS)
        except kubernetes.client.ApiException as error:
            missing = error.reason
        return [p.metadata.name for p in listed.items], replaced.metadata.labels["extra"], secret.data["k"], missing

    names, extra, secret_data, missing = await asyncio.to_thread(roundtrip)
    assert (names, extra, secret_data, missing) == (["p1"], "yes", "dg==", "Not Found")
    assert kube.get(PODS, "p1", NS)["metadata"]["annotations"] == {"a": "b"}


async def test_requests_are_recorded_in_rbac_terms(kube: Kube) -> None:
    kube.create(ENVIRONMENTS, environment("e1"), NS)
    await http(kube, "GET", ENVIRONMENTS.path(NS) + "?watch=true&timeoutSeconds=0.01")
    await http(kube, "PATCH", ENVIRONMENTS.path(NS, "e1", "status"), {"status": {}}, MERGE)
    await http(kube, "DELETE", PODS.path(NS) + "?labelSelector=a%3Db")
    await http(kube, "GET", NAMESPACES.path())
    await http(kube, "GET", "/apis")  # discovery: not an RBAC use
    expected = {RbacUse("managedagents.dev", "environments", "watch"),
                RbacUse("managedagents.dev", "environments/status", "patch"),
                RbacUse("", "pods", "deletecollection"), RbacUse("", "namespaces", "list")}
    assert kube.rbac_uses() == expected
    assert expected <= SESSION_RBAC_USES


async def test_the_record_file_accumulates_across_fixtures(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "rbac.json"
    monkeypatch.setenv(RBAC_RECORD_ENV, str(record))
    for path in (PODS.path(NS), SECRETS.path(NS)):
        async with start_kube(tmp_path) as kube:
            await http(kube, "GET", path)
    assert load_rbac_record(record) == {RbacUse("", "pods", "list"), RbacUse("", "secrets", "list")}


async def watch_lines(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """Every event until the server ends the stream."""
    events = []
    while line := await asyncio.wait_for(response.content.readline(), 5):
        events.append(json.loads(line))
    return events


async def test_a_watch_resumed_after_compaction_gets_410_and_a_fresh_list_misses_the_deleted_pod(kube: Kube) -> None:
    for name in ("gone", "kept"):
        kube.create(PODS, {"metadata": {"name": name}}, NS)
    _, listed = await http(kube, "GET", PODS.path(NS))
    last_seen = listed["metadata"]["resourceVersion"]
    async with aiohttp.ClientSession() as session:
        async with session.get(kube.url + PODS.path(NS) + f"?watch=true&resourceVersion={last_seen}") as watch:
            kube.patch(PODS, "kept", {"metadata": {"labels": {"a": "b"}}}, NS)
            (event,) = [json.loads(await asyncio.wait_for(watch.content.readline(), 5))]
            assert event["type"] == "MODIFIED"
            last_seen = event["object"]["metadata"]["resourceVersion"]
            hold = kube.hold("watch", PODS, apply_first=False, times=None)  # reconnections wait
            assert kube.break_watches(PODS) == 1
            assert await watch_lines(watch) == []  # the stream just ends, as a dropped connection would
        resumed = asyncio.create_task(session.get(
            kube.url + PODS.path(NS) + f"?watch=true&resourceVersion={last_seen}"))
        await hold.wait_arrived()
        kube.delete(PODS, "gone", NS)  # while nobody watches
        compacted = kube.compact(PODS)
        hold.release()
        async with await resumed as watch:
            assert watch.status == 200
            (error,) = await watch_lines(watch)  # one ERROR event, then the end
        assert error == {"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410,
            "reason": "Expired", "message": f"too old resource version: {last_seen} ({compacted + 1})"}}
        # The client must re-list: the deleted pod is simply absent (no DELETED event ever reached it).
        _, relisted = await http(kube, "GET", PODS.path(NS))
        assert [pod["metadata"]["name"] for pod in relisted["items"]] == ["kept"]
        assert int(relisted["metadata"]["resourceVersion"]) > compacted
        async with session.get(kube.url + PODS.path(NS) +
                               f"?watch=true&resourceVersion={relisted['metadata']['resourceVersion']}") as watch:
            kube.create(PODS, {"metadata": {"name": "new"}}, NS)  # a watch from the fresh list works
            assert await read_events(watch, 1) == [("ADDED", "new")]


async def test_compaction_spares_watches_without_a_resource_version_and_other_resources(kube: Kube) -> None:
    kube.create(PODS, {"metadata": {"name": "p1"}}, NS)
    old = kube.create(ENVIRONMENTS, environment("e1"), NS)["metadata"]["resourceVersion"]
    kube.compact(PODS)
    for query in ("", "&resourceVersion=0", f"&resourceVersion={old}&sendInitialEvents=true"):
        async with aiohttp.ClientSession() as session, \
                session.get(kube.url + PODS.path(NS) + "?watch=true" + query) as watch:
            assert await read_events(watch, 1) == [("ADDED", "p1")]
    async with aiohttp.ClientSession() as session, \
            session.get(kube.url + ENVIRONMENTS.path(NS) + f"?watch=true&resourceVersion={int(old) - 1}") as watch:
        assert await read_events(watch, 1) == [("ADDED", "e1")]  # only pods were compacted


async def test_breaking_watches_ends_only_that_resources_streams(kube: Kube) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(kube.url + PODS.path(NS) + "?watch=true") as pods, \
            session.get(kube.url + ENVIRONMENTS.path(NS) + "?watch=true") as environments:
        await kube.wait_until(lambda: kube.server.open_watches == 2)
        assert kube.break_watches(PODS) == 1
        kube.create(PODS, {"metadata": {"name": "after"}}, NS)  # not sent: the stream is over
        assert await watch_lines(pods) == []
        kube.create(ENVIRONMENTS, environment("e1"), NS)
        assert await read_events(environments, 1) == [("ADDED", "e1")]


def seconds_from_now(timestamp: str) -> float:
    moment = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return (moment - datetime.datetime.now(datetime.UTC)).total_seconds()


async def test_in_graceful_mode_a_deleted_pod_stays_terminating_until_a_force_delete(kube: Kube) -> None:
    kube.graceful_pod_deletion = True
    spec = {"containers": [{"name": "c", "image": "i"}], "terminationGracePeriodSeconds": 20}
    kube.create(PODS, {"metadata": {"name": "p1"}, "spec": spec}, NS)

    def delete(**options: Any) -> None:
        api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(kube.kubeconfig)))
        api.delete_namespaced_pod("p1", NS, **options)

    async with aiohttp.ClientSession() as session, \
            session.get(kube.url + PODS.path(NS) + "?watch=true") as watch:
        assert await read_events(watch, 1) == [("ADDED", "p1")]
        await asyncio.to_thread(delete)  # the spec's grace period
        assert await read_events(watch, 1) == [("MODIFIED", "p1")]
        terminating = kube.get(PODS, "p1", NS)
        meta = terminating["metadata"]
        assert meta["deletionGracePeriodSeconds"] == 20 and 18 <= seconds_from_now(meta["deletionTimestamp"]) <= 21
        table = {"Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"}
        _, listed = await http(kube, "GET", PODS.path(NS), headers=table)
        assert listed["rows"][0]["cells"][2] == "Terminating"
        await asyncio.to_thread(delete, grace_period_seconds=5)  # again, with a grace: nothing changes
        assert kube.get(PODS, "p1", NS) == terminating
        await asyncio.to_thread(delete, grace_period_seconds=0)  # kubectl delete --force --grace-period=0
        assert await read_events(watch, 1) == [("DELETED", "p1")]
    assert kube.get(PODS, "p1", NS) is None


@pytest.mark.parametrize(("options", "query", "grace"), [
    ({"gracePeriodSeconds": 7}, "", 7),
    (None, "?gracePeriodSeconds=3", 3),
    (None, "", 30),  # neither DeleteOptions nor the spec say: 30 s
    ({"gracePeriodSeconds": 0}, "", None),  # deleted at once
    (None, "?gracePeriodSeconds=0", None),
])
async def test_the_grace_period_comes_from_delete_options_body_or_query(
        kube: Kube, options: Any, query: str, grace: int | None) -> None:
    kube.graceful_pod_deletion = True
    kube.create(PODS, {"metadata": {"name": "p1"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, NS)
    status, _ = await http(kube, "DELETE", PODS.path(NS, "p1") + query, options)
    assert status == 200
    pod = kube.get(PODS, "p1", NS)
    assert (pod and pod["metadata"]["deletionGracePeriodSeconds"]) == grace


async def test_in_graceful_mode_finalizers_and_the_kubelet_both_hold_a_pod(kube: Kube) -> None:
    kube.graceful_pod_deletion = True
    for name in ("finalizers-last", "kubelet-last"):
        kube.create(PODS, {"metadata": {"name": name, "finalizers": ["f"]}}, NS)
        kube.delete(PODS, name, NS)
    kube.remove_finalizers(PODS, "kubelet-last", NS)
    assert kube.get(PODS, "kubelet-last", NS)["metadata"]["deletionGracePeriodSeconds"] == 30  # still Terminating
    kube.delete(PODS, "kubelet-last", NS, grace_period_seconds=0)
    assert kube.get(PODS, "kubelet-last", NS) is None
    kube.delete(PODS, "finalizers-last", NS, grace_period_seconds=0)  # the containers stopped; the finalizer holds
    assert kube.get(PODS, "finalizers-last", NS)["metadata"]["deletionGracePeriodSeconds"] == 0
    kube.remove_finalizers(PODS, "finalizers-last", NS)
    assert kube.get(PODS, "finalizers-last", NS) is None


async def test_without_graceful_mode_or_once_finished_a_deleted_pod_is_gone_at_once(kube: Kube) -> None:
    kube.create(PODS, {"metadata": {"name": "p1"}}, NS)
    await http(kube, "DELETE", PODS.path(NS, "p1"), {"gracePeriodSeconds": 30})
    assert kube.get(PODS, "p1", NS) is None  # the default mode
    kube.graceful_pod_deletion = True
    kube.create(PODS, {"metadata": {"name": "done"}}, NS)
    kube.patch_status(PODS, "done", {"phase": "Succeeded"}, NS)
    kube.delete(PODS, "done", NS)
    assert kube.get(PODS, "done", NS) is None  # nothing runs any more: no grace period
    kube.create(ENVIRONMENTS, environment("e1"), NS)
    kube.delete(ENVIRONMENTS, "e1", NS)
    assert kube.get(ENVIRONMENTS, "e1", NS) is None  # only pods are deleted gracefully


async def test_a_delayed_create_is_applied_and_answered_only_after_the_delay(kube: Kube) -> None:
    delay = kube.delay("create", PODS, 0.5, times=1)
    started = time.monotonic()
    request = asyncio.create_task(http(kube, "POST", PODS.path(NS), {"metadata": {"name": "slow"}}))
    await asyncio.sleep(0.3)
    assert not request.done() and kube.get(PODS, "slow", NS) is None  # not admitted yet
    assert (await request)[0] == 201
    assert time.monotonic() - started >= 0.5 and kube.get(PODS, "slow", NS) is not None
    started = time.monotonic()
    assert (await http(kube, "POST", PODS.path(NS), {"metadata": {"name": "fast"}}))[0] == 201
    assert time.monotonic() - started < 0.3 and delay.hits == 1  # used up


async def test_a_delay_matches_like_a_fault_and_comes_before_one(kube: Kube) -> None:
    kube.create(ENVIRONMENTS, environment("e1"), NS)
    kube.delay("patch", ENVIRONMENTS, 0.3, subresource="status")  # every status write, from now on
    kube.fail("patch", ENVIRONMENTS, code=500, subresource="status", times=1)
    timings = []
    for path in (ENVIRONMENTS.path(NS, "e1", "status"), ENVIRONMENTS.path(NS, "e1"),
                 ENVIRONMENTS.path(NS, "e1", "status")):
        started = time.monotonic()
        status, _ = await http(kube, "PATCH", path, {"metadata": {"labels": {"a": "b"}}}, MERGE)
        timings.append((status, time.monotonic() - started >= 0.3))
    assert timings == [(500, True), (200, False), (200, True)]  # slow, then failed; the main resource: fast
