"""The bits of Kubernetes API machinery that the fake apiserver needs and kmock 0.8 lacks.

Pure functions, no I/O: label and field selectors, the three patch formats (JSON merge patch,
JSON patch, strategic merge patch), name and label validation, and the standard ``Status`` error
body. ``environments_operator.devcluster.kube`` wires them into the HTTP server; keeping them here lets
the rules be read (and fixed) without wading through request plumbing.

What this module may not do: talk HTTP, hold state, or know about kopf.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

JSON = dict[str, Any]

# The reasons the apiserver puts into Status bodies, by HTTP code (k8s.io/apimachinery StatusReason).
REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Gone",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """An error the fake apiserver answers with a standard ``Status`` body."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason or REASONS.get(code, "Unknown")
        self.message = message
        self.details = details or {}

    def status_body(self) -> JSON:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


# --- selectors --------------------------------------------------------------------------------------------

_SET_OPERATION = re.compile(r"^\s*(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")
_EQUALITY = re.compile(r"^\s*(?P<key>[^\s!=<>(),]+)\s*(?P<op>==|=|!=|<|>)\s*(?P<value>[^\s!=<>(),]*)\s*$")
_EXISTENCE = re.compile(r"^\s*(?P<neg>!?)\s*(?P<key>[^\s!=<>(),]+)\s*$")

Labels = Mapping[str, str]


def _split_requirements(text: str) -> list[str]:
    # Commas separate requirements, except inside the value list of `in (a,b)` / `notin (a,b)`.
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in parts if part.strip()]


def _one_label_requirement(text: str) -> Callable[[Labels], bool]:
    if match := _SET_OPERATION.match(text):
        key, values = match["key"], {value.strip() for value in match["values"].split(",")}
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQUALITY.match(text):
        key, op, value = match["key"], match["op"], match["value"]
        if op in ("=", "=="):
            return lambda labels: labels.get(key) == value
        if op == "!=":
            return lambda labels: labels.get(key) != value
        try:
            bound = int(value)
        except ValueError:
            raise ApiError(400, f"unable to parse requirement: {text!r}: for 'Gt', 'Lt' operators, "
                                f"the value must be an integer") from None
        if op == ">":
            return lambda labels: key in labels and labels[key].isdigit() and int(labels[key]) > bound
        return lambda labels: key in labels and labels[key].isdigit() and int(labels[key]) < bound
    if match := _EXISTENCE.match(text):
        key = match["key"]
        if match["neg"]:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise ApiError(400, f"unable to parse requirement: {text!r}")


def label_selector(text: str | None) -> Callable[[Labels], bool]:
    """Parse a ``labelSelector`` query (``a=b,c!=d,e in (f,g),!h``) into a predicate over labels."""
    requirements = [_one_label_requirement(part) for part in _split_requirements(text or "")]
    return lambda labels: all(requirement(labels) for requirement in requirements)


def _field_value(obj: JSON, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


def field_selector(text: str | None) -> Callable[[JSON], bool]:
    """Parse a ``fieldSelector`` query (``metadata.name=x,status.phase!=Running``) into a predicate."""
    checks: list[Callable[[JSON], bool]] = []
    for part in _split_requirements(text or ""):
        match = _EQUALITY.match(part)
        if not match or match["op"] not in ("=", "==", "!="):
            raise ApiError(400, f"invalid field selector: {part!r}")
        checks.append(_one_field_requirement(match["key"], match["value"], negate=match["op"] == "!="))
    return lambda obj: all(check(obj) for check in checks)


def _one_field_requirement(path: str, value: str, *, negate: bool) -> Callable[[JSON], bool]:
    return lambda obj: (_field_value(obj, path) == value) != negate


def selector_from_labels(labels: Mapping[str, str] | str | None) -> str | None:
    """Accept either a selector string or a ``{key: value}`` dict, as test helpers do."""
    if labels is None or isinstance(labels, str):
        return labels
    return ",".join(f"{key}={value}" for key, value in labels.items())


# --- patches ----------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, ``null`` deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ApiError(422, f"the server rejected our request: path {path!r} does not exist")
    return node


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent, last = _parent(doc, parts, path), parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise ApiError(422, f"the server rejected our request: path {path!r} does not exist")


def _remove(doc: Any, path: str) -> Any:
    value = _get(doc, path)
    parts = _pointer(path)
    parent = _parent(doc, parts, path)
    if isinstance(parent, dict):
        del parent[parts[-1]]
    else:
        del parent[int(parts[-1])]
    return value


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent, last = _parent(doc, parts, path), parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and last == "-":
        parent.append(value)
    elif isinstance(parent, list) and last.isdigit() and int(last) <= len(parent):
        parent.insert(int(last), value)
    else:
        raise ApiError(422, f"the server rejected our request: cannot add at path {path!r}")
    return doc


def json_patch(target: JSON, operations: list[JSON]) -> JSON:
    """RFC 6902 JSON patch. A failed ``test`` (kopf tests ``/metadata/resourceVersion``) answers 422."""
    doc: Any = copy.deepcopy(target)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path", "")
        if op == "test":
            if _get(doc, path) != operation.get("value"):
                raise ApiError(422, f"the server rejected our request due to an error in our request: "
                                    f"test failed at {path!r}")
        elif op == "remove":
            _remove(doc, path)
        elif op == "add":
            doc = _add(doc, path, copy.deepcopy(operation.get("value")))
        elif op == "replace":
            _get(doc, path)  # the target must exist, unlike for "add"
            parts, value = _pointer(path), copy.deepcopy(operation.get("value"))
            if not parts:
                doc = value
            else:
                parent = _parent(doc, parts, path)
                parent[parts[-1] if isinstance(parent, dict) else int(parts[-1])] = value
        elif op in ("move", "copy"):
            value = copy.deepcopy(_get(doc, operation.get("from", "")))
            if op == "move":
                _remove(doc, operation.get("from", ""))
            doc = _add(doc, path, value)
        else:
            raise ApiError(422, f"unsupported JSON patch operation: {op!r}")
    if not isinstance(doc, dict):
        raise ApiError(422, "a JSON patch must leave an object")
    return doc


# Lists that strategic merge patch merges by a key instead of replacing (the patchMergeKey tags of
# k8s.io/api for the fields our operator and kopf touch). Unknown lists are replaced, as in a merge patch.
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "conditions": "type",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "tolerations": "key",
}
# Primitive lists with patchStrategy=merge: a patch adds to them instead of replacing them.
_MERGED_PRIMITIVE_LISTS = frozenset({"finalizers"})
_DELETE_FROM_PRIMITIVE = "$deleteFromPrimitiveList/"


def strategic_merge_patch(target: Any, patch: Any, key: str | None = None) -> Any:
    """A strategic merge patch, for built-in kinds only (the apiserver answers 415 for custom resources).

    Covered: dicts merge, ``null`` deletes, lists in ``_MERGE_KEYS`` merge item by item (``$patch: delete``
    removes one), ``finalizers`` merge as a set, ``$deleteFromPrimitiveList/<field>`` removes from one.
    """
    if not isinstance(patch, dict):
        if isinstance(patch, list) and isinstance(target, list) and key in _MERGED_PRIMITIVE_LISTS:
            return list(target) + [item for item in patch if item not in target]
        if isinstance(patch, list) and isinstance(target, list) and key in _MERGE_KEYS:
            return _merge_keyed_list(target, patch, _MERGE_KEYS[key])
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for field, value in patch.items():
        if field.startswith(_DELETE_FROM_PRIMITIVE):
            name = field[len(_DELETE_FROM_PRIMITIVE):]
            result[name] = [item for item in result.get(name, []) if item not in value]
        elif field.startswith("$"):
            continue  # $retainKeys, $setElementOrder: ordering/retention hints the fake server ignores
        elif value is None:
            result.pop(field, None)
        else:
            result[field] = strategic_merge_patch(result.get(field), value, field)
    return result


def _merge_keyed_list(target: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    result = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            return copy.deepcopy(patch)  # not a keyed list after all: replace, as the apiserver would
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, dict) and old.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(copy.deepcopy(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


# --- validation -------------------------------------------------------------------------------------------


def mutable_pod_spec(spec: Any) -> Any:
    """A pod spec without the few fields an update may change: what must stay equal across updates."""
    if not isinstance(spec, dict):
        return spec
    frozen = copy.deepcopy(spec)
    frozen.pop("activeDeadlineSeconds", None)
    frozen.pop("tolerations", None)  # additions are allowed; the fake server does not check the rest
    frozen.pop("schedulingGates", None)  # gates may be removed (``scheduling_gate_errors`` checks the rest)
    for key in ("containers", "initContainers"):
        for container in frozen.get(key) or []:
            if isinstance(container, dict):
                container.pop("image", None)
    return frozen


def scheduling_gate_errors(new_spec: Any, old_spec: Any) -> list[str]:
    """A pod update may remove scheduling gates, never add one (as the apiserver rules since 1.27)."""
    def gates(spec: Any) -> list[str]:
        return [gate.get("name", "") for gate in (spec or {}).get("schedulingGates") or [] if isinstance(gate, dict)]

    before = set(gates(old_spec))
    return [f"spec.schedulingGates: Forbidden: only deletion is allowed, but found new scheduling gate '{gate}'"
            for gate in gates(new_spec) if gate not in before]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def name_errors(name: str, *, dns_label: bool) -> list[str]:
    """Why ``name`` is not a valid object name (DNS-1123 subdomain, or label for namespaces)."""
    if dns_label:
        if len(name) > 63 or not _DNS_LABEL.match(name):
            return [f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 label must consist of lower "
                    f"case alphanumeric characters or '-', start and end with one, and be at most 63 characters"]
        return []
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return [f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of lower "
                f"case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"]
    return []


def label_errors(labels: Any) -> list[str]:
    """Why ``metadata.labels`` would be rejected (key syntax, 63-character values, value charset)."""
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return ["metadata.labels: Invalid value: must be a map of strings"]
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or \
                len(name) > 63 or not _LABEL_NAME.match(name):
            errors.append(f"metadata.labels: Invalid value: {key!r}: name part must consist of alphanumeric "
                          f"characters, '-', '_' or '.', and must start and end with an alphanumeric character")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(f"metadata.labels: Invalid value: {value!r}: a valid label must be an empty string or "
                          f"consist of at most 63 alphanumeric characters, '-', '_' or '.', and must start and "
                          f"end with an alphanumeric character")
    return errors
