"""CustomResourceDefinitions generated from the pydantic spec and status models.

``structural_schema`` turns pydantic's JSON Schema into the structural OpenAPI v3 subset that the
apiserver accepts: ``$ref`` inlined, no ``title``, ``anyOf [X, null]`` folded into ``nullable``, ``const``
as a one-value ``enum``, no ``additionalProperties: false`` beside ``properties`` (the apiserver prunes
unknown fields instead). Also the kopf peering CRDs, so that ``crds/`` is fully generated. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from environments_operator.domain import environment, workerpool
from environments_operator.domain.common import GROUP, VERSION

JSON = dict[str, Any]

_DROPPED_KEYS = frozenset({"title", "discriminator"})


def _inline(node: Any, defs: JSON) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k not in _DROPPED_KEYS}
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and len(any_of) == 2 and {"type": "null"} in any_of:
        (inner,) = [option for option in any_of if option != {"type": "null"}]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        node = {k: v for k, v in {**inner, **outer}.items() if k not in _DROPPED_KEYS}
        node["nullable"] = True
        if node.get("default", ...) is None:
            del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "properties" in node and node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node = {k: v for k, v in node.items() if k not in ("additionalProperties", "default")}
    if "format" in node and node["format"] == "date-time":
        node["type"] = "string"
    return {k: _structural(v) for k, v in node.items()}


def structural_schema(model: type[BaseModel]) -> JSON:
    raw = model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
    inlined = _inline(raw, raw.get("$defs", {}))
    result: JSON = _structural(inlined)
    return result


def _condition_type_column(condition: str) -> JSON:
    return {
        "name": condition,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
    }


def _condition_reason_column(condition: str, name: str = "Reason") -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].reason',
    }


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _crd(
    *, kind: str, plural: str, shortnames: list[str], description: str,
    spec_model: type[BaseModel], status_model: type[BaseModel], columns: list[JSON],
) -> JSON:
    singular = kind.lower()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "environments-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": shortnames,
                "categories": ["managedagents"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "APIVersion of this object."},
                        "kind": {"type": "string", "description": "Kind of this object."},
                        "metadata": {"type": "object"},
                        "spec": {**structural_schema(spec_model), "description": f"Desired state of the {kind}."},
                        "status": {
                            **structural_schema(status_model),
                            "description": f"Observed state of the {kind}, written by the operator.",
                        },
                    },
                }},
            }],
        },
    }


def environment_crd() -> JSON:
    return _crd(
        kind=environment.KIND, plural=environment.PLURAL, shortnames=["menv"],
        description="An environment of Claude Managed Agents, kept in sync with the Environments API.",
        spec_model=environment.EnvironmentSpec, status_model=environment.EnvironmentStatus,
        columns=[
            {"name": "Remote ID", "type": "string", "jsonPath": ".status.id"},
            {"name": "Type", "type": "string", "jsonPath": ".spec.config.type"},
            _condition_type_column("Ready"),
            _condition_reason_column("Ready"),
            _AGE,
        ],
    )


def workerpool_crd() -> JSON:
    return _crd(
        kind=workerpool.KIND, plural=workerpool.PLURAL, shortnames=["wp", "mawp"],
        description="Worker pods serving the work queue of a self_hosted environment, scaled by queue depth.",
        spec_model=workerpool.WorkerPoolSpec, status_model=workerpool.WorkerPoolStatus,
        columns=[
            {"name": "Environment", "type": "string", "jsonPath": ".status.environmentId"},
            {"name": "Max", "type": "integer", "jsonPath": ".spec.maxWorkers"},
            {"name": "Running", "type": "integer", "jsonPath": ".status.workers.running"},
            {"name": "Starting", "type": "integer", "jsonPath": ".status.workers.starting"},
            {"name": "Warm", "type": "integer", "jsonPath": ".status.workers.warm"},
            {"name": "Queued", "type": "integer", "jsonPath": ".status.queue.depth"},
            _condition_type_column("Ready"),
            _condition_reason_column("Ready"),
            {"name": "Min", "type": "integer", "jsonPath": ".spec.minWorkers", "priority": 1},
            {"name": "Failed", "type": "integer", "jsonPath": ".status.workers.failed", "priority": 1},
            {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredWorkers", "priority": 1},
            {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend", "priority": 1},
            _AGE,
        ],
    )


def _kopf_peering_crd(*, scope: str, kind: str, plural: str, singular: str) -> JSON:
    # The same shape kopf ships in its peering.yaml: kopf stores its peers' heartbeats under .status.
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": singular},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                }},
            }],
        },
    }


def all_crds() -> dict[str, JSON]:
    """File name -> CRD document, for every CRD the operator needs."""
    crds = [
        environment_crd(),
        workerpool_crd(),
        _kopf_peering_crd(scope="Namespaced", kind="KopfPeering", plural="kopfpeerings", singular="kopfpeering"),
        _kopf_peering_crd(
            scope="Cluster", kind="ClusterKopfPeering", plural="clusterkopfpeerings", singular="clusterkopfpeering"
        ),
    ]
    return {f"{crd['metadata']['name']}.yaml": crd for crd in crds}
