"""What a real apiserver would do to a custom object that kmock stores verbatim: prune, default, validate.

A real apiserver silently drops every field its CRD's structural schema does not declare (pruning),
fills in schema ``default`` values, and rejects type violations with 422. kmock does none of that, so
an operator that writes an undeclared status field (kopf's ``status.kopf``, a handler's return value,
a typo) passes every kmock test and then loses that data in production. These functions replay those
rules against a CRD dict:

    problems = storage_problems(stored_object, crd)        # [] when the apiserver would store it as is
    assert_storable(stored_object, crd)                     # AssertionError listing the problems
    kube.assert_all_storable(crd1, crd2)                    # every stored object of those CRDs (``kube.Kube``)

``Kube.install_crd(crd)`` applies the same rules on every write, as the apiserver does (prune + record,
default, reject with 422), so that the operator under test also *sees* the pruned result.

Not covered: ``x-kubernetes-validations`` (CEL) rules, ``format`` checks, and metadata pruning.
What this module may not do: I/O of any kind.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

JSON = dict[str, Any]

# The apiserver handles these root fields itself; the schema never prunes them.
_IMPLICIT_ROOT_FIELDS = frozenset({"apiVersion", "kind", "metadata"})
_SCHEMA_MAPS = ("properties", "patternProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_SINGLES = ("items", "additionalProperties", "not")


def crd_schema(crd: JSON, version: str | None = None) -> JSON:
    """The ``openAPIV3Schema`` of ``version`` (default: the storage version) of a CRD dict."""
    versions = crd["spec"]["versions"]
    chosen = next((v for v in versions if v["name"] == version), None) if version else \
        next((v for v in versions if v.get("storage")), versions[0])
    if chosen is None:
        raise KeyError(f"CRD {crd['metadata']['name']} has no version {version!r}")
    schema: JSON = chosen.get("schema", {}).get("openAPIV3Schema", {})
    return schema


def prune(obj: JSON, schema: JSON) -> list[str]:
    """Drop the fields the apiserver would drop, in place; return their paths (``status.kopf``, ``a[0].b``)."""
    dropped: list[str] = []
    _prune(obj, schema, "", dropped, root=True)
    return dropped


def _prune(node: Any, schema: JSON, path: str, dropped: list[str], *, root: bool = False) -> None:
    if isinstance(node, dict):
        properties = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True
        implicit = _IMPLICIT_ROOT_FIELDS if root or schema.get("x-kubernetes-embedded-resource") else ()
        for key in list(node):
            child_path = f"{path}.{key}" if path else key
            if key in implicit:
                continue
            if key in properties:
                _prune(node[key], properties[key], child_path, dropped)
            elif isinstance(additional, dict):
                _prune(node[key], additional, child_path, dropped)
            elif not (additional is True or keeps_unknown):
                dropped.append(child_path)
                del node[key]
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(node):
            _prune(item, schema["items"], f"{path}[{index}]", dropped)


def apply_defaults(node: Any, schema: JSON) -> None:
    """Fill in schema ``default`` values in place; a ``null`` in a non-nullable field counts as absent."""
    if isinstance(node, dict):
        for key, subschema in (schema.get("properties") or {}).items():
            if key in node and node[key] is None and not subschema.get("nullable"):
                del node[key]
            if key not in node and "default" in subschema:
                node[key] = copy.deepcopy(subschema["default"])
            if key in node:
                apply_defaults(node[key], subschema)
        if isinstance(schema.get("additionalProperties"), dict):
            for value in node.values():
                apply_defaults(value, schema["additionalProperties"])
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for item in node:
            apply_defaults(item, schema["items"])


def as_json_schema(node: JSON) -> JSON:
    # OpenAPI v3.0 (draft-4 based) differs from JSON Schema draft 4 by `nullable` and the k8s extensions.
    result: JSON = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS:
            result[key] = {name: as_json_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            result[key] = [as_json_schema(sub) for sub in value]
        elif key in _SCHEMA_SINGLES and isinstance(value, dict):
            result[key] = as_json_schema(value)
        elif not (key.startswith("x-kubernetes-") or key == "nullable"):
            result[key] = value
    if node.get("x-kubernetes-int-or-string"):
        result.pop("type", None)
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
        if "enum" in result:
            result["enum"] = [*result["enum"], None]
    return result


def schema_errors(obj: JSON, schema: JSON) -> list[str]:
    """Type/required/enum/range violations the apiserver would answer with 422 Invalid."""
    validator = jsonschema.Draft4Validator(as_json_schema(schema))
    return sorted(
        f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(obj)
    )


def storage_problems(obj: JSON, crd: JSON, version: str | None = None) -> list[str]:
    """Everything the apiserver would prune from or reject in ``obj`` (which stays unchanged)."""
    schema = crd_schema(crd, version)
    candidate = copy.deepcopy(obj)
    apply_defaults(candidate, schema)
    problems = [f"{path}: unknown field, would be pruned" for path in prune(candidate, schema)]
    return problems + schema_errors(candidate, schema)


def assert_storable(obj: JSON, crd: JSON, version: str | None = None) -> None:
    """Fail with a readable list if the apiserver would prune from or reject ``obj``."""
    problems = storage_problems(obj, crd, version)
    if problems:
        meta = obj.get("metadata", {})
        where = f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '?')}"
        raise AssertionError(f"{where} is not storable as is by a real apiserver:\n  " + "\n  ".join(problems))
