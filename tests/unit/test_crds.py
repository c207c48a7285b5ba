"""The generated CRDs: up to date, structural, and enforcing every invariant with a message naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from environments_operator.crdgen import render_crds
from environments_operator.devcluster.crd_validation import validate
from environments_operator.domain.environment import EnvironmentSpec
from environments_operator.domain.workerpool import WorkerPoolSpec

ROOT = Path(__file__).resolve().parents[2]
CRD_DIRS = [ROOT / "crds", ROOT / "charts" / "environments-operator" / "crds"]
CRDS = {
    crd["spec"]["names"]["kind"]: crd
    for crd in (yaml.safe_load(text) for text in render_crds().values())
}
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("directory", CRD_DIRS, ids=lambda d: str(d.relative_to(ROOT)))
def test_committed_crds_equal_generated(directory: Path) -> None:
    rendered = render_crds()
    committed = {p.name: p.read_text() for p in directory.glob("*.yaml")}
    assert committed == rendered, "run: environments-operator crds -o crds -o charts/environments-operator/crds"


def test_cli_writes_the_same_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "environments_operator", "crds", "--output", str(tmp_path)], check=True
    )
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == render_crds()


def test_cli_prints_every_crd_to_stdout() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "environments_operator", "crds"], check=True, capture_output=True, text=True
    ).stdout
    names = {doc["metadata"]["name"] for doc in yaml.safe_load_all(out)}
    assert names == {
        "environments.managedagents.dev", "workerpools.managedagents.dev",
        "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev",
    }


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}/{index}")


@pytest.mark.parametrize("kind", ["Environment", "WorkerPool"])
def test_schema_is_structural_and_described(kind: str) -> None:
    version = CRDS[kind]["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert CRDS[kind]["spec"]["scope"] == "Namespaced"
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "$defs", "title", "anyOf", "oneOf", "allOf", "const"} & node.keys(), path
        if path.endswith("/properties"):
            continue  # a map of field names, not a schema node
        if "x-kubernetes-validations" in path or "/default" in path:
            continue
        if node.get("x-kubernetes-preserve-unknown-fields") or path.endswith("/metadata"):
            continue
        assert "type" in node, f"{path} has no type"
        is_field = not path.endswith(("/items", "/additionalProperties"))
        if is_field and ("/properties/spec" in path or "/properties/status" in path):
            assert node.get("description"), f"{path} has no description"


def test_printer_columns() -> None:
    def names(kind: str) -> list[str]:
        return [c["name"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"]]

    def wide(kind: str) -> list[str]:
        return [c["name"] for c in CRDS[kind]["spec"]["versions"][0]["additionalPrinterColumns"] if c.get("priority")]

    assert names("Environment") == ["Remote ID", "Type", "Ready", "Reason", "Age"]
    assert names("WorkerPool") == ["Environment", "Max", "Running", "Starting", "Warm", "Queued", "Ready", "Reason",
                                   "Min", "Failed", "Desired", "Suspended", "Age"]
    assert wide("WorkerPool") == ["Min", "Failed", "Desired", "Suspended"]  # -o wide


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(example: Path) -> None:
    obj = yaml.safe_load(example.read_text())
    assert validate(CRDS[obj["kind"]], obj) == []
    model = {"Environment": EnvironmentSpec, "WorkerPool": WorkerPoolSpec}[obj["kind"]]
    model.model_validate(obj["spec"])  # the operator parses what the apiserver admits


def _env(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
        "metadata": {"name": "e", "namespace": "ns"},
        "spec": {"config": {"type": "cloud"}, **spec},
    }


def _pool(**spec: Any) -> dict[str, Any]:
    base = {
        "environmentRef": {"name": "e"},
        "environmentKeySecretRef": {"name": "s", "key": "k"},
    }
    return {
        "apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {k: v for k, v in {**base, **spec}.items() if v is not None},
    }


def _limited(**fields: Any) -> dict[str, Any]:
    return {"type": "cloud", "networking": {"type": "limited", **fields}}


# (id, object, old object or None, expected (field path, substring of the reason))
INVALID: list[tuple[str, dict[str, Any], dict[str, Any] | None, tuple[str, str]]] = [
    ("unknown-network-type", _env(config={"type": "cloud", "networking": {"type": "open"}}), None,
     ("spec.config.networking.type", "enum")),
    ("unknown-config-type", _env(config={"type": "on_prem"}), None, ("spec.config.type", "enum")),
    ("missing-config", _env(config=None) | {"spec": {}}, None, ("spec.config", "required")),
    ("missing-config-type", _env(config={}), None, ("spec.config.type", "required")),
    ("missing-network-type", _env(config={"type": "cloud", "networking": {"allowedHosts": []}}), None,
     ("spec.config.networking.type", "required")),
    ("networking-on-self-hosted", _env(config={"type": "self_hosted", "networking": {"type": "unrestricted"}}),
     None, ("spec.config", "networking and packages are only allowed with config type cloud")),
    ("packages-on-self-hosted", _env(config={"type": "self_hosted", "packages": {"pip": ["x"]}}), None,
     ("spec.config", "networking and packages are only allowed with config type cloud")),
    ("allowed-hosts-on-unrestricted",
     _env(config={"type": "cloud", "networking": {"type": "unrestricted", "allowedHosts": ["a.com"]}}), None,
     ("spec.config.networking", "only allowed with type limited")),
    ("allow-mcp-on-unrestricted",
     _env(config={"type": "cloud", "networking": {"type": "unrestricted", "allowMcpServers": True}}), None,
     ("spec.config.networking", "only allowed with type limited")),
    ("allowed-hosts-not-a-list", _env(config=_limited(allowedHosts="a.com")), None,
     ("spec.config.networking.allowedHosts", "type")),
    ("allow-package-managers-not-bool", _env(config=_limited(allowPackageManagers="yes")), None,
     ("spec.config.networking.allowPackageManagers", "type")),
    ("non-string-metadata-value", _env(metadata={"team": 42}), None, ("spec.metadata.team", "type")),
    ("metadata-not-a-map", _env(metadata=["team"]), None, ("spec.metadata", "type")),
    ("unknown-package-manager", _env(config={"type": "cloud", "packages": {"brew": ["x"]}}), None,
     ("spec.config.packages.brew", "unknown field")),
    ("package-list-of-numbers", _env(config={"type": "cloud", "packages": {"pip": [1]}}), None,
     ("spec.config.packages.pip[0]", "type")),
    ("unknown-scope", _env(scope="world"), None, ("spec.scope", "enum")),
    ("unknown-deletion-policy", _env(deletionPolicy="Retain"), None, ("spec.deletionPolicy", "enum")),
    ("empty-name", _env(name=""), None, ("spec.name", "minLength")),
    ("malformed-external-id", _env(externalId="environment-1"), None, ("spec.externalId", "pattern")),
    ("api-key-ref-without-key", _env(apiKeySecretRef={"name": "s"}), None, ("spec.apiKeySecretRef.key", "required")),
    ("unknown-spec-field", _env(replicas=3), None, ("spec.replicas", "unknown field")),
    ("config-type-change", _env(config={"type": "self_hosted"}), _env(config={"type": "cloud"}),
     ("spec.config", "config.type is immutable")),
    ("external-id-change", _env(externalId="env_B"), _env(externalId="env_A"),
     ("spec", "externalId is immutable once set")),
    ("block-ms-zero", _pool(poll={"blockMs": 0}), None, ("spec.poll.blockMs", "minimum")),
    ("block-ms-1000", _pool(poll={"blockMs": 1000}), None, ("spec.poll.blockMs", "maximum")),
    ("block-ms-zero-cel", _pool(poll={"blockMs": 0}), None, ("spec.poll", "blockMs must be between 1 and 999")),
    ("block-ms-1000-cel", _pool(poll={"blockMs": 1000}), None, ("spec.poll", "blockMs must be between 1 and 999")),
    ("min-greater-than-max", _pool(minWorkers=5, maxWorkers=2), None,
     ("spec", "minWorkers must be less than or equal to maxWorkers")),
    ("min-greater-than-default-max", _pool(minWorkers=11), None,
     ("spec", "minWorkers must be less than or equal to maxWorkers")),
    ("max-workers-zero", _pool(maxWorkers=0), None, ("spec.maxWorkers", "minimum")),
    ("negative-min-workers", _pool(minWorkers=-1), None, ("spec.minWorkers", "minimum")),
    ("no-environment", _pool(environmentRef=None), None,
     ("spec", "exactly one of environmentRef and environmentId must be set")),
    ("both-environments", _pool(environmentId="env_abc"), None,
     ("spec", "exactly one of environmentRef and environmentId must be set")),
    ("environment-ref-without-name", _pool(environmentRef={}), None, ("spec.environmentRef.name", "required")),
    ("missing-environment-key-ref", _pool(environmentKeySecretRef=None), None,
     ("spec.environmentKeySecretRef", "required")),
    ("secret-ref-empty-key", _pool(environmentKeySecretRef={"name": "s", "key": ""}), None,
     ("spec.environmentKeySecretRef.key", "minLength")),
    ("unknown-mode", _pool(mode="Burst"), None, ("spec.mode", "enum")),
    ("startup-timeout-zero", _pool(startupTimeoutSeconds=0), None, ("spec.startupTimeoutSeconds", "minimum")),
    ("negative-ttl", _pool(ttlSecondsAfterFinished=-5), None, ("spec.ttlSecondsAfterFinished", "minimum")),
    ("reclaim-zero", _pool(poll={"reclaimOlderThanMs": 0}), None, ("spec.poll.reclaimOlderThanMs", "minimum")),
    ("template-not-an-object", _pool(template="pod.yaml"), None, ("spec.template", "type")),
    ("malformed-environment-id", _pool(environmentRef=None, environmentId="ENV-1"), None,
     ("spec.environmentId", "pattern")),
]


def test_enough_distinct_invalid_cases() -> None:
    assert len({case[0] for case in INVALID}) == len(INVALID) >= 25


@pytest.mark.parametrize(("obj", "old", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_resource_is_rejected_for_the_named_reason(
    obj: dict[str, Any], old: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    errors = validate(CRDS[obj["kind"]], obj, old)
    path, reason = expected
    assert any(e.path == path and reason in e.reason for e in errors), errors


def test_valid_update_keeping_type_is_accepted() -> None:
    old = _env(config={"type": "cloud"}, externalId="env_A")
    new = copy.deepcopy(old)
    new["spec"]["description"] = "changed"
    assert validate(CRDS["Environment"], new, old) == []


def test_null_optional_fields_are_accepted() -> None:
    assert validate(CRDS["Environment"], _env(description=None, scope=None)) == []


_REMOVABLE_KEYWORDS = ("enum", "minimum", "maximum", "required", "pattern", "minLength")


def _without_rule(node: Any, reason: str) -> Any:
    """A copy of a schema without the rule that produces ``reason``: a keyword, or a CEL rule by message."""
    if isinstance(node, list):
        return [
            _without_rule(item, reason) for item in node
            if not (isinstance(item, dict) and reason in item.get("message", ""))
        ]
    if isinstance(node, dict):
        return {k: _without_rule(v, reason) for k, v in node.items() if k != reason}
    return node


def _is_cel_message(reason: str) -> bool:
    return " " in reason and reason != "unknown field"


MUTABLE = [c for c in INVALID if c[3][1] in _REMOVABLE_KEYWORDS or _is_cel_message(c[3][1])]


@pytest.mark.parametrize(("obj", "old", "expected"), [c[1:] for c in MUTABLE], ids=[c[0] for c in MUTABLE])
def test_removing_the_named_rule_lets_the_resource_through(
    obj: dict[str, Any], old: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    """Proves each invalid case rejects *because of* its rule, not by accident."""
    path, reason = expected
    weakened = _without_rule(CRDS[obj["kind"]], reason)
    errors = validate(weakened, obj, old)
    assert not any(e.path == path and reason in e.reason for e in errors), errors
