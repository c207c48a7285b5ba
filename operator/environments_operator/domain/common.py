"""Shapes shared by both custom resources: references, conditions and the CRD-schema helpers.

Pure: no I/O. ``cel`` attaches an ``x-kubernetes-validations`` rule to a model's generated schema;
``crd.py`` turns these models into structural CRD schemas.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "managedagents.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


def cel(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules; each rule has ``rule`` and ``message`` (and maybe ``fieldPath``)."""
    return {"x-kubernetes-validations": list(rules)}


class SpecModel(BaseModel):
    """Base for spec models: camelCase fields in YAML, unknown fields refused (as ``kubectl`` strict validation)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class StatusModel(BaseModel):
    """Base for status models: tolerant of fields written by newer operator versions."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class LocalObjectReference(SpecModel):
    name: str = Field(min_length=1, max_length=253, description="Name of the object in the same namespace.")


class SecretKeyReference(SpecModel):
    name: str = Field(min_length=1, max_length=253, description="Name of a Secret in the same namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret's data.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    type: str = Field(description="Type of the condition, e.g. Ready or Synced.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="Machine-readable CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable explanation of the last transition.")
    lastTransitionTime: datetime = Field(description="When the status last changed.")
    observedGeneration: int | None = Field(
        default=None, description="The .metadata.generation the condition was computed from."
    )
