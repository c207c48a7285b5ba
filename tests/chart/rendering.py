"""Renders the Helm chart through Helm's own Go SDK (helm-python-sdk) and picks the manifests apart.

Shared by the chart, Dockerfile and RBAC tests. It only renders and reads: no cluster, no helm binary.
The scenarios named in ``SCENARIOS`` are the installations the tests render and validate.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from environments_operator.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "environments-operator"
RELEASE = "eo"
RELEASE_NAMESPACE = "operators"
FULLNAME = f"{RELEASE}-environments-operator"
WATCHED = ["team-a", "team-b"]

JSON = dict[str, Any]

# Installations rendered and validated by the tests: name -> values.
SCENARIOS: dict[str, JSON] = {
    "default": {},
    "namespaced": {"watchNamespaces": WATCHED},
    "emulator": {"emulator": {"enabled": True}},
    "emulator-sidecar": {"emulator": {"enabled": True, "mode": "sidecar"}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True},
                               "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}},
    "two-replicas": {"replicaCount": 2, "podDisruptionBudget": {"enabled": True}},
    "existing-secret": {"apiKey": {"existingSecret": "anthropic", "existingSecretKey": "key"}},
    "api-key-value": {"apiKey": {"value": "sk-ant-sample-value"}, "anthropic": {"baseUrl": "https://api.example.test"}},
    "standalone": {"peering": {"enabled": False}},
    "fixed-priority": {"peering": {"priority": 100, "name": "blue"}},
    "no-metrics": {"metrics": {"port": 0}},
    "no-rbac": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "preexisting"}},
    "scheduling": {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "environments-operator"}},
            },
        }]}},
        "image": {"digest": "sha256:" + "a" * 64},
    },
}


@functools.cache
def chart() -> helm.Chart:
    """The chart, loaded once per process (charts are immutable and thread-safe)."""
    return helm.Chart.load(CHART_DIR)


def render_files(values: JSON | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce it (raises on schema or fail)."""
    return chart().render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)


def render(values: JSON | None = None) -> list[JSON]:
    """Every rendered Kubernetes object (NOTES.txt and empty documents left out)."""
    objects: list[JSON] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def of_kind(objects: list[JSON], kind: str) -> list[JSON]:
    return [o for o in objects if o["kind"] == kind]


def only(objects: list[JSON], kind: str, name: str | None = None) -> JSON:
    matches = [o for o in of_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def operator_deployment(objects: list[JSON]) -> JSON:
    return only(objects, "Deployment", FULLNAME)


def container(deployment: JSON, name: str) -> JSON:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def pod_specs(objects: list[JSON]) -> Iterator[JSON]:
    for deployment in of_kind(objects, "Deployment"):
        yield deployment["spec"]["template"]["spec"]


def cli_argv(container_spec: JSON) -> list[str]:
    """The console-script command line a container runs, past any `/bin/sh -c` wrapper."""
    args: list[str] = container_spec.get("command", []) + container_spec["args"]
    return args[args.index("environments-operator") + 1:]


def parse_cli(container_spec: JSON) -> argparse.Namespace:
    """The container's command line, parsed by the real CLI parser (unknown options fail here)."""
    return build_parser().parse_args(cli_argv(container_spec))


def env_of(container_spec: JSON) -> dict[str, JSON]:
    return {e["name"]: e for e in container_spec.get("env", [])}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
