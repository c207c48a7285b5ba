"""The Helm chart: lints, renders valid Kubernetes objects in every scenario, rejects bad values, and
wires the operator exactly as its public contract (the CLI parser and ``settings.SETTINGS``) says."""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from environments_operator.devcluster.crd_validation import validate as validate_custom_object
from environments_operator.settings import SETTING_NAMES, SETTINGS, SettingSpec, load_settings
from tests.chart.rendering import (
    CHART_DIR,
    FULLNAME,
    JSON,
    RELEASE_NAMESPACE,
    ROOT,
    SCENARIOS,
    WATCHED,
    chart,
    cli_argv,
    container,
    env_of,
    load_yaml,
    of_kind,
    only,
    operator_deployment,
    parse_cli,
    pod_specs,
    render,
    render_files,
)

CHART_YAML = load_yaml(CHART_DIR / "Chart.yaml")
DEFAULT_VALUES: JSON = load_yaml(CHART_DIR / "values.yaml")

# Kubernetes versions every rendered object must be valid for: the chart's minimum and the newest known.
MINIMUM_KUBE = re.sub(r"^>=\s*|-0$", "", CHART_YAML["kubeVersion"])
KUBE_VERSIONS = [MINIMUM_KUBE, kubernetes_validate.utils.latest_version()]

# Variables the Deployment may set that are not the operator's settings: kopf reads POD_ID as this
# pod's identity in peering records.
NON_SETTING_ENV = {"POD_ID"}


# ---- chart metadata and lint ---------------------------------------------------------------------

def test_app_version_is_the_package_version() -> None:
    assert CHART_YAML["appVersion"] == importlib.metadata.version("environments-operator")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{CHART_YAML["appVersion"]}"' in pyproject


@pytest.mark.parametrize("scenario", ["default", "namespaced", "emulator", "monitoring"])
def test_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART_DIR, SCENARIOS[scenario], strict=True, kube_version=f"v{KUBE_VERSIONS[-1]}")
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); warnings (2) and errors (3) must not occur.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_ships_the_generated_crds() -> None:
    # Equality with the top-level crds/ is tests/unit/test_crds.py's job; here: Helm loads them as CRDs.
    names = {yaml.safe_load(crd["data"])["metadata"]["name"] for crd in chart().crds}
    assert names == {p.name.removesuffix(".yaml") for p in (ROOT / "crds").glob("*.yaml")}


# ---- every rendered object is valid ------------------------------------------------------------

CRDS = {
    (crd["spec"]["group"], crd["spec"]["names"]["kind"]): crd
    for crd in (load_yaml(p) for p in (CHART_DIR / "crds").glob("*.yaml"))
}

# The Prometheus Operator's ServiceMonitor is a CRD type kubernetes-validate does not know: this
# structural schema checks the fields the chart writes (and that it writes no others).
SERVICE_MONITOR_SCHEMA: JSON = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "honorLabels": {"type": "boolean"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                    },
                }},
            },
        },
    },
}


# The Prometheus Operator's PrometheusRule (monitoring.coreos.com/v1), as its CRD's schema has it for the
# fields the chart writes (and no others): groups of alerting rules, durations in Prometheus' syntax.
PROMETHEUS_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
PROMETHEUS_RULE_SCHEMA: JSON = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": PROMETHEUS_DURATION},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["alert", "expr", "labels", "annotations"],
                        "additionalProperties": False,
                        "properties": {
                            "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": {"type": "string", "pattern": PROMETHEUS_DURATION},
                            "labels": {"type": "object", "required": ["severity"],
                                       "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string"}},
                        },
                    }},
                },
            }}},
        },
    },
}
CUSTOM_RESOURCE_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


def _custom_object_errors(obj: JSON) -> list[str]:
    """Validates an object of one of the chart's own CRDs as the apiserver would."""
    group, version = obj["apiVersion"].split("/")
    crd = CRDS.get((group, obj["kind"]))
    if crd is None:
        return [f"no CRD in the chart for {obj['apiVersion']} {obj['kind']}"]
    errors = [str(e) for e in validate_custom_object(
        crd, {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")})]
    if version not in [v["name"] for v in crd["spec"]["versions"] if v["served"]]:
        errors.append(f"version {version} is not served")
    if ("namespace" in obj["metadata"]) != (crd["spec"]["scope"] == "Namespaced"):
        errors.append(f"namespace does not match scope {crd['spec']['scope']}")
    return errors


def _validation_errors(obj: JSON, kube_version: str) -> list[str]:
    if obj["kind"] in CUSTOM_RESOURCE_SCHEMAS:
        import jsonschema

        validator = jsonschema.Draft202012Validator(CUSTOM_RESOURCE_SCHEMAS[obj["kind"]])
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    if obj["apiVersion"].split("/")[0] in {group for group, _ in CRDS}:
        return _custom_object_errors(obj)
    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(scenario: str, kube_version: str) -> None:
    objects = render(SCENARIOS[scenario])
    assert objects
    failures = {
        f"{o['kind']}/{o['metadata']['name']}": errors
        for o in objects if (errors := _validation_errors(o, kube_version))
    }
    assert failures == {}


def test_the_validation_catches_a_broken_object() -> None:
    """Guards the test above: a wrong field type, an unknown field and a bad custom object all fail."""
    deployment = copy.deepcopy(operator_deployment(render()))
    deployment["spec"]["replicas"] = "one"
    assert _validation_errors(deployment, KUBE_VERSIONS[-1])
    deployment = copy.deepcopy(operator_deployment(render()))
    deployment["spec"]["template"]["spec"]["containers"][0]["restartAlways"] = True
    assert _validation_errors(deployment, KUBE_VERSIONS[-1])
    peering = copy.deepcopy(only(render(), "ClusterKopfPeering"))
    peering["metadata"]["namespace"] = "somewhere"
    assert _validation_errors(peering, KUBE_VERSIONS[-1])
    monitor = copy.deepcopy(only(render(SCENARIOS["servicemonitor"]), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = 30
    assert _validation_errors(monitor, KUBE_VERSIONS[-1])
    monitoring = render(SCENARIOS["monitoring"])
    rule = copy.deepcopy(only(monitoring, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert _validation_errors(rule, KUBE_VERSIONS[-1])
    rule = copy.deepcopy(only(monitoring, "PrometheusRule"))
    del rule["spec"]["groups"][0]["rules"][0]["labels"]["severity"]
    assert _validation_errors(rule, KUBE_VERSIONS[-1])
    dashboard = copy.deepcopy(only(monitoring, "ConfigMap"))
    dashboard["data"]["environments-operator.json"] = {"panels": []}
    assert _validation_errors(dashboard, KUBE_VERSIONS[-1])


def test_every_object_is_labelled_and_placed() -> None:
    for scenario, values in SCENARIOS.items():
        for obj in render(values):
            labels = obj["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/instance") == "eo", (scenario, obj["kind"])
            assert labels.get("app.kubernetes.io/managed-by") == "Helm", (scenario, obj["kind"])
            namespace = obj["metadata"].get("namespace")
            if obj["kind"] in ("Role", "RoleBinding", "KopfPeering"):
                assert namespace in WATCHED, (scenario, obj["kind"])
            elif obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
                assert namespace == RELEASE_NAMESPACE, (scenario, obj["kind"])


# ---- values the schema rejects ------------------------------------------------------------------

# (id, values, fragment of Helm's message naming the field and the rule)
INVALID_VALUES: list[tuple[str, JSON, str]] = [
    ("replicas-as-string", {"replicaCount": "2"}, "'/replicaCount': got string, want integer"),
    ("zero-replicas", {"replicaCount": 0}, "'/replicaCount': minimum"),
    ("unknown-top-level-key", {"replicas": 2}, "additional properties 'replicas' not allowed"),
    ("unknown-nested-key", {"apiKey": {"secretName": "x"}}, "additional properties 'secretName' not allowed"),
    ("log-format-not-in-enum", {"logFormat": "xml"}, "'/logFormat'"),
    ("namespaces-as-string", {"watchNamespaces": "team-a"}, "'/watchNamespaces': got string, want array"),
    ("namespace-not-dns-label", {"watchNamespaces": ["Team_A"]}, "'/watchNamespaces/0'"),
    ("namespace-glob", {"watchNamespaces": ["team-*"]}, "'/watchNamespaces/0'"),
    ("duplicate-namespaces", {"watchNamespaces": ["team-a", "team-a"]}, "'/watchNamespaces'"),
    ("metrics-port-out-of-range", {"metrics": {"port": 70000}}, "'/metrics/port': maximum"),
    ("probe-port-zero", {"probes": {"port": 0}}, "'/probes/port': minimum"),
    ("priority-not-integer", {"peering": {"priority": "high"}}, "'/peering/priority'"),
    ("peering-enabled-not-boolean", {"peering": {"enabled": "yes"}}, "'/peering/enabled': got string, want boolean"),
    ("digest-not-sha256", {"image": {"digest": "latest"}}, "'/image/digest'"),
    ("pull-policy-unknown", {"image": {"pullPolicy": "Sometimes"}}, "'/image/pullPolicy'"),
    ("base-url-without-scheme", {"anthropic": {"baseUrl": "api.anthropic.com"}}, "'/anthropic/baseUrl'"),
    ("worker-base-url-not-string", {"worker": {"baseUrl": 8765}}, "'/worker/baseUrl': got number, want string"),
    ("drift-interval-zero", {"sync": {"driftIntervalSeconds": 0}}, "'/sync/driftIntervalSeconds': minimum"),
    ("concurrency-as-float", {"sync": {"apiConcurrency": 2.5}}, "'/sync/apiConcurrency': got number, want integer"),
    ("emulator-mode-unknown", {"emulator": {"mode": "daemonset"}}, "'/emulator/mode'"),
    ("tolerations-as-object", {"tolerations": {"key": "x"}}, "'/tolerations': got object, want array"),
    ("node-selector-non-string", {"nodeSelector": {"disk": 1}}, "'/nodeSelector/disk': got number, want string"),
    ("scrape-interval-not-duration", {"metrics": {"serviceMonitor": {"interval": "often"}}},
     "'/metrics/serviceMonitor/interval'"),
    ("backlog-minutes-zero", {"metrics": {"prometheusRule": {"backlogMinutes": 0}}},
     "'/metrics/prometheusRule/backlogMinutes': minimum"),
    ("start-timeouts-as-string", {"metrics": {"prometheusRule": {"startTimeouts": "3"}}},
     "'/metrics/prometheusRule/startTimeouts': got string, want integer"),
    ("operator-selector-with-braces", {"metrics": {"prometheusRule": {"operatorSelector": '{job="x"}'}}},
     "'/metrics/prometheusRule/operatorSelector'"),
    ("dashboard-label-with-space", {"metrics": {"grafanaDashboard": {"label": "grafana dashboard"}}},
     "'/metrics/grafanaDashboard/label'"),
    ("dashboard-namespace-not-dns-label", {"metrics": {"grafanaDashboard": {"namespace": "Grafana"}}},
     "'/metrics/grafanaDashboard/namespace'"),
]


def test_enough_distinct_invalid_values() -> None:
    assert len({case[0] for case in INVALID_VALUES}) == len(INVALID_VALUES) >= 8


@pytest.mark.parametrize(("values", "message"), [c[1:] for c in INVALID_VALUES], ids=[c[0] for c in INVALID_VALUES])
def test_schema_rejects_invalid_values(values: JSON, message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render_files(values)
    assert message in str(caught.value)
    with pytest.raises(helm.HelmValuesError):
        chart().validate_schema(values)


def test_schema_accepts_the_defaults_and_every_scenario() -> None:
    chart().validate_schema(DEFAULT_VALUES)
    for values in SCENARIOS.values():
        chart().validate_schema(values)


def test_schema_types_every_default_value() -> None:
    """Every key of values.yaml is declared in the schema (so a typo in a value is always an error)."""
    schema = chart().schema
    assert schema is not None

    def resolve(node: JSON) -> JSON:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(values: Any, node: JSON, path: str) -> None:
        node = resolve(node)
        if isinstance(values, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
            for key, value in values.items():
                assert key in node["properties"], f"{path}/{key} is not in the schema"
                walk(value, node["properties"][key], f"{path}/{key}")

    walk(DEFAULT_VALUES, schema, "")


# (id, values, fragment of the message) for combinations the schema cannot express: the render fails.
INCOHERENT_VALUES: list[tuple[str, JSON, str]] = [
    ("replicas-without-peering", {"replicaCount": 2, "peering": {"enabled": False}}, "needs peering.enabled"),
    ("replicas-with-fixed-priority", {"replicaCount": 2, "peering": {"priority": 5}},
     "replicas with the same priority"),
    ("emulator-and-base-url", {"emulator": {"enabled": True}, "anthropic": {"baseUrl": "https://x.test"}},
     "are exclusive"),
    ("sidecar-emulator-with-replicas", {"replicaCount": 2, "emulator": {"enabled": True, "mode": "sidecar"}},
     "emulator.mode sidecar needs replicaCount 1"),
    ("pdb-with-one-replica", {"podDisruptionBudget": {"enabled": True}}, "would block every node drain"),
    ("servicemonitor-without-metrics", {"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}},
     "needs metrics.port > 0"),
    ("prometheusrule-without-metrics", {"metrics": {"port": 0, "prometheusRule": {"enabled": True}}},
     "metrics.prometheusRule.enabled needs metrics.port > 0"),
    ("dashboard-without-metrics", {"metrics": {"port": 0, "grafanaDashboard": {"enabled": True}}},
     "metrics.grafanaDashboard.enabled needs metrics.port > 0"),
    ("metrics-on-probe-port", {"metrics": {"port": 8080}}, "metrics.port and probes.port must differ"),
    # The sidecar shares the operator pod's network: two servers on one port, and one crash-loops.
    ("sidecar-emulator-on-metrics-port", {"emulator": {"enabled": True, "mode": "sidecar", "port": 9090}},
     "emulator.port must differ from probes.port and metrics.port"),
    ("sidecar-emulator-on-probe-port", {"emulator": {"enabled": True, "mode": "sidecar", "port": 8080}},
     "emulator.port must differ from probes.port and metrics.port"),
    ("no-service-account", {"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
]


@pytest.mark.parametrize(("values", "message"), [c[1:] for c in INCOHERENT_VALUES],
                         ids=[c[0] for c in INCOHERENT_VALUES])
def test_incoherent_values_fail_the_render(values: JSON, message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_files(values)


def test_emulator_in_its_own_pod_may_use_any_port() -> None:
    """Only the sidecar shares the operator pod's ports; the emulator's own pod may reuse their numbers."""
    objects = render({"emulator": {"enabled": True, "port": 8080}})
    assert only(objects, "Service", f"{FULLNAME}-emulator")["spec"]["ports"][0]["port"] == 8080


# ---- the Deployment follows the public contract -------------------------------------------------

def _value_at(values: JSON, path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def _set_value(path: str, value: Any) -> JSON:
    result: JSON = {}
    node = result
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def _schema_at(path: str) -> JSON:
    schema = chart().schema
    assert schema is not None
    node: JSON = schema
    for part in path.split("."):
        node = node["properties"][part]
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _sample(path: str) -> Any:
    """A valid value for a Helm value path that differs from its default, derived from the schema."""
    node = _schema_at(path)
    default = _value_at(DEFAULT_VALUES, path)
    if "enum" in node:
        return next(v for v in node["enum"] if v != default)
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    if "integer" in types:
        candidate = max(int(default or 0), int(node.get("minimum", 0))) + 7
        assert candidate <= node.get("maximum", candidate)
        return candidate
    assert "string" in types, path
    candidates = ["sample-name", "https://sample.invalid/api"]
    return next(c for c in candidates if re.fullmatch(node.get("pattern", ".*"), c))


def _helm_paths(spec: SettingSpec) -> list[str]:
    return [p.strip() for p in spec.helm_value.split("/")]


@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: s.env)
def test_every_setting_is_set_by_its_helm_value(spec: SettingSpec) -> None:
    """settings.SETTINGS names the Helm value of each variable: setting that value sets that variable."""
    for path in _helm_paths(spec):
        sample = _sample(path)
        operator = container(operator_deployment(render(_set_value(path, sample))), "operator")
        env = env_of(operator).get(spec.env)
        assert env is not None, f"{path}={sample!r} does not set {spec.env}"
        if spec.secret:
            assert "value" not in env, f"{spec.env} must come from a Secret, never inline"
            ref = env["valueFrom"]["secretKeyRef"]
            if path.endswith("existingSecret"):
                assert ref["name"] == sample
            else:
                secret = only(render(_set_value(path, sample)), "Secret", ref["name"])
                assert base64.b64decode(secret["data"][ref["key"]]).decode() == sample
        else:
            assert env["value"] == str(sample), f"{path}={sample!r} sets {spec.env}={env['value']!r}"


# Deliberate differences between the chart's defaults and the operator's own (settings.py) defaults.
CHART_DEFAULT_DIFFERS = {
    "ENVIRONMENTS_OPERATOR_WORKER_IMAGE": "the chart defaults worker pods to the operator's own image",
    "ENVIRONMENTS_OPERATOR_PEERING_NAME": "the chart turns peering on (one active pod, safe rolling updates)",
    "ENVIRONMENTS_OPERATOR_PEERING_PRIORITY": "the chart draws a random priority per pod",
}


@pytest.mark.parametrize("spec", [s for s in SETTINGS if s.env not in CHART_DEFAULT_DIFFERS], ids=lambda s: s.env)
def test_chart_defaults_agree_with_the_operator(spec: SettingSpec) -> None:
    env = env_of(container(operator_deployment(render()), "operator"))
    if spec.default is None:
        assert spec.env not in env, f"{spec.env} has no default and must stay unset by default"
    else:
        assert env[spec.env]["value"] == spec.default
        assert str(_value_at(DEFAULT_VALUES, _helm_paths(spec)[0])) == spec.default


def _environ(operator: JSON) -> dict[str, str]:
    """The variables the container would see (a placeholder for Secret and field references)."""
    return {name: e.get("value", "from-a-reference") for name, e in env_of(operator).items()}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_accepts_its_rendered_configuration(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    operator = container(operator_deployment(objects), "operator")
    assert set(env_of(operator)) <= SETTING_NAMES | NON_SETTING_ENV
    settings = load_settings(_environ(operator))  # raises SettingsError naming a bad variable
    args = parse_cli(operator)
    assert args.command == "run"
    if SCENARIOS[scenario].get("watchNamespaces"):
        assert args.namespace == WATCHED and not args.all_namespaces
    else:
        assert args.namespace == [] and args.all_namespaces
    peering = SCENARIOS[scenario].get("peering", {})
    assert args.standalone is (peering.get("enabled") is False)
    assert bool(settings.peering_name) is not args.standalone
    if not args.standalone:
        peering_kind = "KopfPeering" if args.namespace else "ClusterKopfPeering"
        names = {o["metadata"]["name"] for o in of_kind(objects, peering_kind)}
        assert names == {settings.peering_name}, "the peering object the operator waits for is rendered"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_use_kopfs_liveness_endpoint(scenario: str) -> None:
    operator = container(operator_deployment(render(SCENARIOS[scenario])), "operator")
    url = parse_cli(operator).liveness
    match = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S*)", url)
    assert match, url
    port = {p["name"]: p["containerPort"] for p in operator["ports"]}["healthz"]
    assert int(match[1]) == port
    for probe in (operator["livenessProbe"], operator["readinessProbe"]):
        assert probe["httpGet"] == {"path": match[2], "port": "healthz"}


def test_verbose_value_passes_the_flag() -> None:
    operator = container(operator_deployment(render({"verbose": True})), "operator")
    assert parse_cli(operator).verbose


def test_metrics_port_is_served_and_exposed() -> None:
    objects = render(SCENARIOS["servicemonitor"])
    operator = container(operator_deployment(objects), "operator")
    port = int(env_of(operator)["ENVIRONMENTS_OPERATOR_METRICS_PORT"]["value"])
    assert {p["name"]: p["containerPort"] for p in operator["ports"]}["metrics"] == port
    service = only(objects, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= operator_deployment(objects)["spec"]["template"]["metadata"][
        "labels"].items()
    monitor = only(objects, "ServiceMonitor")
    # The ServiceMonitor selects the metrics Service (and no other: the emulator's has another component).
    selected = [s for s in of_kind(objects, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert selected == [service] and monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    no_metrics = render(SCENARIOS["no-metrics"])
    assert not [s for s in of_kind(no_metrics, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert "metrics" not in {p["name"] for p in container(operator_deployment(no_metrics), "operator")["ports"]}


# ---- security ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_meet_the_restricted_pod_security_standard(scenario: str) -> None:
    for pod in pod_specs(render(SCENARIOS[scenario])):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not {"hostNetwork", "hostPID", "hostIPC"} & pod.keys()
        mounts = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context.get("privileged") is not True
            # The image points HOME and TMPDIR at /tmp, the one writable path: an emptyDir.
            tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
            assert "emptyDir" in mounts[tmp["name"]]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_only_the_operator_pod_gets_a_kubernetes_token() -> None:
    objects = render(SCENARIOS["emulator"])
    assert only(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert operator_deployment(objects)["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    emulator = only(objects, "Deployment", f"{FULLNAME}-emulator")["spec"]["template"]["spec"]
    assert emulator["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in emulator


def test_api_key_value_never_appears_outside_its_secret() -> None:
    files = render_files(SCENARIOS["api-key-value"])
    leaking = [path for path, text in files.items()
               if "sk-ant-sample-value" in text and not path.endswith("secret.yaml")]
    assert leaking == []
    assert not [path for path, text in files.items() if "sk-ant-sample-value" in text]  # base64 in the Secret


def test_existing_secret_is_referenced_not_created() -> None:
    objects = render(SCENARIOS["existing-secret"])
    assert of_kind(objects, "Secret") == []
    env = env_of(container(operator_deployment(objects), "operator"))
    assert env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "anthropic", "key": "key"}


def test_no_api_key_by_default() -> None:
    objects = render()
    assert of_kind(objects, "Secret") == []
    assert "ANTHROPIC_API_KEY" not in env_of(container(operator_deployment(objects), "operator"))


# ---- scheduling and availability -----------------------------------------------------------------

def test_scheduling_values_reach_the_pod() -> None:
    values = SCENARIOS["scheduling"]
    deployment = operator_deployment(render(values))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    image = container(deployment, "operator")["image"]
    assert image.endswith("@" + values["image"]["digest"])
    assert env_of(container(deployment, "operator"))["ENVIRONMENTS_OPERATOR_WORKER_IMAGE"]["value"] == image


def test_two_replicas_get_a_disruption_budget_and_roll_safely() -> None:
    objects = render(SCENARIOS["two-replicas"])
    deployment = operator_deployment(objects)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    budget = only(objects, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_without_peering_pods_never_overlap() -> None:
    deployment = operator_deployment(render(SCENARIOS["standalone"]))
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert of_kind(render(SCENARIOS["standalone"]), "ClusterKopfPeering") == []


# ---- kopf peering priorities ---------------------------------------------------------------------

def _run_wrapped(operator: JSON, tmp_path: Path) -> tuple[str, list[str]]:
    """Runs the container's command line with a stand-in `environments-operator` that reports what it got."""
    fake = tmp_path / "environments-operator"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps([os.environ.get('ENVIRONMENTS_OPERATOR_PEERING_PRIORITY'), sys.argv[1:]]))\n"
    )
    fake.chmod(0o755)
    argv = operator.get("command", []) + operator["args"]
    environ = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"} | {
        name: value for name, value in _environ(operator).items() if name != "POD_ID"}
    out = subprocess.run(argv, env=environ, capture_output=True, text=True, check=True).stdout
    priority, args = yaml.safe_load(out)
    return priority, args


@pytest.mark.parametrize("scenario", ["default", "two-replicas", "namespaced"])
def test_each_pod_draws_its_own_peering_priority(scenario: str, tmp_path: Path) -> None:
    """Replicas with equal priorities all pause (kopf), so every pod start draws a random one."""
    operator = container(operator_deployment(render(SCENARIOS[scenario])), "operator")
    assert "ENVIRONMENTS_OPERATOR_PEERING_PRIORITY" not in env_of(operator)
    draws = [_run_wrapped(operator, tmp_path) for _ in range(3)]
    priorities = [p for p, _ in draws]
    assert len(set(priorities)) == 3, priorities
    for priority, args in draws:
        assert 1 <= int(priority) <= 2**31 - 1
        assert args == cli_argv(operator)  # the command line reaches the operator intact
        assert load_settings({"ENVIRONMENTS_OPERATOR_PEERING_PRIORITY": priority}).peering_priority == int(priority)


def test_fixed_priority_runs_the_operator_directly(tmp_path: Path) -> None:
    operator = container(operator_deployment(render(SCENARIOS["fixed-priority"])), "operator")
    assert operator["args"][0] == "environments-operator"
    assert _run_wrapped(operator, tmp_path) == ("100", cli_argv(operator))


# ---- the embedded default: the emulator -----------------------------------------------------------

@pytest.mark.parametrize("scenario", ["emulator", "emulator-sidecar"])
def test_emulator_mode_points_the_operator_and_workers_at_the_emulator(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    deployment = operator_deployment(objects)
    operator = container(deployment, "operator")
    settings = load_settings(_environ(operator))
    service = only(objects, "Service", f"{FULLNAME}-emulator")
    port = service["spec"]["ports"][0]["port"]
    service_url = f"http://{FULLNAME}-emulator.{RELEASE_NAMESPACE}.svc:{port}"
    # Worker pods run in other namespaces: they need the Service's fully qualified name.
    assert settings.worker_base_url == service_url
    if scenario == "emulator-sidecar":
        emulator_pod = deployment
        assert settings.base_url == f"http://127.0.0.1:{port}"
    else:
        emulator_pod = only(objects, "Deployment", f"{FULLNAME}-emulator")
        assert settings.base_url == service_url
        assert emulator_pod["spec"]["replicas"] == 1 and emulator_pod["spec"]["strategy"] == {"type": "Recreate"}
    emulator = container(emulator_pod, "emulator")
    args = parse_cli(emulator)
    assert (args.command, args.host, args.port) == ("emulator", "0.0.0.0", port)
    assert service["spec"]["selector"].items() <= emulator_pod["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["containerPort"] for p in emulator["ports"]}["emulator"] == port
    assert settings.api_key == "from-a-reference"  # the emulator accepts any non-empty key


# ---- documentation -------------------------------------------------------------------------------

def _documented_values() -> list[str]:
    """Value paths to document: leaves of values.yaml, where free-form Kubernetes objects
    (resources, security contexts, affinity, ...) count as one value."""
    schema = chart().schema
    assert schema is not None
    paths: list[str] = []

    def walk(values: Any, node: JSON, path: str) -> None:
        if node.get("$ref") == "#/definitions/resources":
            paths.append(path)
            return
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        if isinstance(values, dict) and "properties" in node:
            for key, value in values.items():
                walk(value, node["properties"][key], f"{path}.{key}" if path else key)
        else:
            paths.append(path)

    walk(DEFAULT_VALUES, schema, "")
    return paths


def test_every_value_has_a_comment_in_values_yaml() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    for path in _documented_values():
        *parents, leaf = path.split(".")
        indent = "  " * len(parents)
        # The key's line within its parent's block; the line above it must be a `# --` comment block.
        start = 0
        for depth, parent in enumerate(parents):
            start = next(i for i in range(start, len(lines)) if lines[i] == f"{'  ' * depth}{parent}:")
        index = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{indent}{leaf}:"))
        above = index - 1
        while lines[above].lstrip().startswith("#") and not lines[above].lstrip().startswith("# --"):
            above -= 1
        if not lines[above].lstrip().startswith("# --"):
            undocumented.append(path)
    assert undocumented == []


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    section = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    table = {m[1] for m in re.finditer(r"^\| `([\w.]+)` \|", section, re.MULTILINE)}
    assert set(_documented_values()) == table
