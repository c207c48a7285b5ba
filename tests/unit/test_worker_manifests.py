"""Worker Pod and per-item Secret manifests: the pod contract, deterministic names, restricted defaults.

Every built Pod and Secret is checked with kubernetes-validate (the apiserver's own OpenAPI schemas,
strict: unknown fields fail) at the newest Kubernetes version it knows.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import kubernetes_validate
import pytest

from environments_operator.domain.worker_manifests import (
    ANNOTATION_ENVIRONMENT_ID,
    ANNOTATION_WORK_ID,
    ENV_MAX_IDLE,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    LABEL_WORK_ID,
    LABEL_WORKER_POOL,
    SCHEDULING_GATE,
    WORK_SECRET_KEY,
    PoolIdentity,
    WorkAssignment,
    build_work_secret,
    build_worker_pod,
    label_value,
    pool_selector,
    release_patch,
    work_secret_name,
    worker_pod_name,
)
from environments_operator.worker import MAX_IDLE_VARIABLE

K8S_VERSION = kubernetes_validate.latest_version()
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
POOL = PoolIdentity(namespace="team-a", name="sandboxes", uid="6a1f0c1e-1111-4222-8333-944455556666")
WORK = WorkAssignment(
    work_id="work_01HZabcDEF9xyz", environment_id="env_01ABC", session_id="sesn_01XYZ",
    secret="eyJzZXNzaW9uc190b2tlbiI6InRvayJ9",
)
IMAGE = "ghcr.io/example/worker:1.0"


def validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def pod(
    template: dict[str, Any] | None = None, *, base_url: str | None = "http://api.test", max_idle_seconds: int = 60
) -> dict[str, Any]:
    return build_worker_pod(POOL, WORK, template=template or {}, default_image=IMAGE, base_url=base_url,
                            max_idle_seconds=max_idle_seconds)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


TEMPLATES: dict[str, dict[str, Any]] = {
    "empty": {},
    "image and resources": {"spec": {"containers": [{
        "name": "main", "image": "example/own:2", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
    }]}},
    "sidecar and init container": {"spec": {
        "initContainers": [{"name": "fetch", "image": "busybox:1", "command": ["true"]}],
        "containers": [{"name": "proxy", "image": "envoy:1"}, {"name": "worker", "args": ["--max-idle", "30"]}],
    }},
    "own security context and service account": {
        "metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
        "spec": {
            "serviceAccountName": "agent", "automountServiceAccountToken": True,
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
            "containers": [{"name": "worker", "securityContext": {"readOnlyRootFilesystem": True}}],
            "restartPolicy": "Always",
        },
    },
}


class TestDeterministicNames:
    @pytest.mark.parametrize("work_id", ["work_01HZabcDEF9xyz", "work_01hzabcdef9xyz", "W" * 200, "work_a"])
    def test_pod_and_secret_names_are_lowercase_dns_1123_and_stable(self, work_id: str) -> None:
        assert worker_pod_name(work_id) == worker_pod_name(work_id)
        assert DNS_1123_LABEL.match(worker_pod_name(work_id))
        assert DNS_1123_LABEL.match(work_secret_name(work_id))
        assert len(work_secret_name(work_id)) <= 63

    def test_ids_differing_only_in_case_get_different_names(self) -> None:
        assert worker_pod_name("work_AbC") != worker_pod_name("work_abc")

    @pytest.mark.parametrize(("text", "kept"), [("work_01HZabc", True), ("pool-a", True), ("x" * 64, False),
                                                 ("has space", False), ("-lead", False)])
    def test_label_values_keep_valid_text_and_hash_the_rest(self, text: str, kept: bool) -> None:
        value = label_value(text)
        assert (value == text) is kept
        assert len(value) <= 63 and re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", value)

    def test_pool_selector_matches_the_labels_it_sets(self) -> None:
        labels = pod()["metadata"]["labels"]
        for requirement in pool_selector(POOL.name).split(","):
            key, value = requirement.split("=")
            assert labels[key] == value


class TestWorkerPod:
    @pytest.mark.parametrize("name", list(TEMPLATES))
    def test_every_built_pod_is_a_valid_pod(self, name: str) -> None:
        validate(pod(TEMPLATES[name]))

    def test_contract_env_labels_and_owner(self) -> None:
        manifest = pod()
        (container,) = manifest["spec"]["containers"]
        env = env_of(container)
        assert env["ANTHROPIC_WORK_ID"] == WORK.work_id
        assert env["ANTHROPIC_ENVIRONMENT_ID"] == WORK.environment_id
        assert env["ANTHROPIC_SESSION_ID"] == WORK.session_id
        assert env["ANTHROPIC_BASE_URL"] == "http://api.test"
        assert env["ANTHROPIC_WORK_SECRET"] == {
            "secretKeyRef": {"name": work_secret_name(WORK.work_id), "key": WORK_SECRET_KEY}
        }
        assert env[ENV_MAX_IDLE] == "60"
        assert manifest["metadata"]["name"] == worker_pod_name(WORK.work_id)
        assert manifest["metadata"]["labels"] == {
            LABEL_WORKER_POOL: "sandboxes", LABEL_WORK_ID: WORK.work_id, LABEL_MANAGED_BY: "environments-operator",
            LABEL_SESSION_ID: WORK.session_id,
        }
        assert manifest["metadata"]["annotations"][ANNOTATION_WORK_ID] == WORK.work_id
        (owner,) = manifest["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool", "name": "sandboxes",
                         "uid": POOL.uid, "controller": True, "blockOwnerDeletion": True}
        assert manifest["metadata"]["annotations"][ANNOTATION_ENVIRONMENT_ID] == WORK.environment_id

    @pytest.mark.parametrize(("template_gates", "released"), [
        ([], None),
        ([{"name": "example.com/quota"}], [{"name": "example.com/quota"}]),
    ])
    def test_pods_are_created_gated_and_the_release_keeps_other_gates(
            self, template_gates: list[dict[str, str]], released: list[dict[str, str]] | None) -> None:
        manifest = pod({"spec": {"schedulingGates": template_gates}})
        gates = manifest["spec"]["schedulingGates"]
        assert gates == [*template_gates, {"name": SCHEDULING_GATE}]
        assert release_patch(tuple(gate["name"] for gate in gates)) == {"spec": {"schedulingGates": released}}

    def test_the_pools_max_idle_reaches_the_worker_and_a_template_cannot_override_it(self) -> None:
        template = {"spec": {"containers": [{"name": "worker", "env": [{"name": ENV_MAX_IDLE, "value": "999"}]}]}}
        (container,) = pod(template, max_idle_seconds=0)["spec"]["containers"]
        assert [e["value"] for e in container["env"] if e["name"] == ENV_MAX_IDLE] == ["0"]
        # The worker reads the very variable the operator sets.
        assert ENV_MAX_IDLE == MAX_IDLE_VARIABLE

    def test_defaults_image_command_and_restricted_security(self) -> None:
        spec = pod()["spec"]
        (container,) = spec["containers"]
        assert container["image"] == IMAGE
        # args, not command: the default image's tini entrypoint must stay PID 1
        assert container["args"] == ["environments-operator", "worker"] and "command" not in container
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

    @pytest.mark.parametrize(
        ("container", "expected"),
        [
            ({"image": "own/image:1"}, {"command": ["environments-operator", "worker"]}),
            ({"args": ["--max-idle", "30"]},
             {"command": ["environments-operator", "worker"], "args": ["--max-idle", "30"]}),
            ({"command": ["/bin/run"]}, {"command": ["/bin/run"]}),
        ],
    )
    def test_worker_command_defaults(self, container: dict[str, Any], expected: dict[str, Any]) -> None:
        template = {"spec": {"containers": [{"name": "worker", **container}]}}
        (built,) = pod(template)["spec"]["containers"]
        assert {k: built[k] for k in ("command", "args") if k in built} == expected

    def test_template_choices_are_kept_where_the_contract_allows(self) -> None:
        manifest = pod(TEMPLATES["own security context and service account"])
        spec = manifest["spec"]
        assert spec["automountServiceAccountToken"] is True
        assert spec["serviceAccountName"] == "agent"
        assert spec["securityContext"]["runAsUser"] == 1000
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["restartPolicy"] == "Never"  # a restarted worker would serve an item it no longer holds
        assert manifest["metadata"]["labels"]["team"] == "a"
        assert manifest["metadata"]["annotations"]["note"] == "x"

    def test_contract_goes_to_the_worker_container_only(self) -> None:
        spec = pod(TEMPLATES["sidecar and init container"])["spec"]
        proxy, worker = spec["containers"]
        assert "env" not in proxy and "command" not in proxy
        assert worker["image"] == IMAGE and worker["args"] == ["--max-idle", "30"]
        assert "ANTHROPIC_WORK_SECRET" in env_of(worker)
        for container in [*spec["initContainers"], *spec["containers"]]:
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}

    def test_template_cannot_override_contract_variables(self) -> None:
        template = {"spec": {"containers": [{"name": "worker", "env": [
            {"name": "ANTHROPIC_WORK_ID", "value": "forged"}, {"name": "KEEP", "value": "1"},
        ]}]}}
        env = env_of(pod(template)["spec"]["containers"][0])
        assert env["ANTHROPIC_WORK_ID"] == WORK.work_id and env["KEEP"] == "1"

    def test_base_url_is_left_to_the_sdk_default_when_unset(self) -> None:
        assert "ANTHROPIC_BASE_URL" not in env_of(pod(base_url=None)["spec"]["containers"][0])

    def test_template_is_not_mutated(self) -> None:
        template = TEMPLATES["sidecar and init container"]
        before = json.dumps(template, sort_keys=True)
        pod(template)
        assert json.dumps(template, sort_keys=True) == before

    def test_the_work_secret_is_referenced_never_inline(self) -> None:
        assert WORK.secret not in json.dumps(pod())
        assert WORK.secret not in repr(WORK)


class TestWorkSecret:
    def test_secret_is_valid_immutable_and_holds_only_the_work_secret(self) -> None:
        secret = build_work_secret(POOL, WORK, pod_uid="pod-uid-1")
        validate(secret)
        assert secret["immutable"] is True
        assert secret["metadata"]["name"] == work_secret_name(WORK.work_id)
        assert list(secret["data"]) == [WORK_SECRET_KEY]
        assert base64.b64decode(secret["data"][WORK_SECRET_KEY]).decode() == WORK.secret
        assert secret["metadata"]["labels"][LABEL_WORK_ID] == WORK.work_id
        # It belongs to its pod, not to the pool: it goes with the pod, and only that pod's pool has it.
        assert secret["metadata"]["ownerReferences"] == [{
            "apiVersion": "v1", "kind": "Pod", "name": worker_pod_name(WORK.work_id), "uid": "pod-uid-1",
            "controller": True, "blockOwnerDeletion": False}]
        assert secret["metadata"]["labels"][LABEL_WORKER_POOL] == POOL.name
