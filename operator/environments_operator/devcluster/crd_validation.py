"""Validate custom objects against a generated CRD the way the apiserver does, without an apiserver.

Order as in kube-apiserver: structural defaulting, then OpenAPI schema validation (with strict field
validation, so an unknown field is an error as with ``kubectl apply``; defaulting, pruning and the
schema conversion are shared with ``pruning``), then the CEL rules in
``x-kubernetes-validations``; transition rules (those using ``oldSelf``) run only on update, where the
old object has a value at the same path. Each error names the field path and the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema

from environments_operator.devcluster.pruning import apply_defaults, as_json_schema, crd_schema, prune

JSON = dict[str, Any]


@dataclass(frozen=True)
class FieldError:
    path: str  # e.g. "spec.poll.blockMs"
    reason: str
    source: str  # "schema" or "cel"

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} ({self.source})"


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def schema_errors(obj: JSON, schema: JSON) -> list[FieldError]:
    """Unknown fields (strict field validation, as ``kubectl apply`` asks for), then schema violations."""
    candidate = copy.deepcopy(obj)
    errors = [
        FieldError(path, f"unknown field {path.rsplit('.', 1)[-1]!r}", "schema") for path in prune(candidate, schema)
    ]
    for error in jsonschema.Draft4Validator(as_json_schema(schema)).iter_errors(candidate):
        path = _path(error.absolute_path)
        if error.validator == "required":
            missing = error.message.split("'")[1]
            errors.append(FieldError(f"{path}.{missing}" if path != "<root>" else missing, "required", "schema"))
        else:
            errors.append(FieldError(path, f"{error.validator}: {error.message}", "schema"))
    return errors


_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _CEL.program(_CEL.compile(rule))
    return _PROGRAMS[rule]


_ABSENT = object()


def cel_errors(new: Any, schema: JSON, old: Any = _ABSENT, path: str = "") -> list[FieldError]:
    errors: list[FieldError] = []
    for rule in schema.get("x-kubernetes-validations", []):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and old is _ABSENT:
            continue
        activation = {"self": celpy.json_to_cel(new)}
        if is_transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            result = _program(rule["rule"]).evaluate(activation)
        except celpy.CELEvalError:
            continue  # a value of the wrong type: the schema error already names it
        if isinstance(result, Exception) or not bool(result):
            errors.append(FieldError(path or "<root>", rule["message"], "cel"))
    if isinstance(new, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in new and new[name] is not None:
                old_value = old.get(name, _ABSENT) if isinstance(old, dict) else _ABSENT
                if old_value is None:
                    old_value = _ABSENT
                errors += cel_errors(new[name], sub, old_value, f"{path}.{name}" if path else name)
    return errors


def validate(crd: JSON, obj: JSON, old: JSON | None = None) -> list[FieldError]:
    """All errors the apiserver would report for creating ``obj`` (or updating ``old`` to ``obj``)."""
    schema = crd_schema(crd)
    new = copy.deepcopy(obj)
    apply_defaults(new, schema)
    previous: Any = _ABSENT
    if old is not None:
        previous = copy.deepcopy(old)
        apply_defaults(previous, schema)
    return schema_errors(new, schema) + cel_errors(new, schema, previous)
