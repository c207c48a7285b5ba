"""Spec and status models of the ``Environment`` custom resource.

The spec mirrors the API's ``EnvironmentCreateParams`` (camelCase here, snake_case in the API) plus the
operator's own fields: ``externalId``, ``deletionPolicy`` and ``apiKeySecretRef``. Pure: no I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from environments_operator.domain.common import (
    Condition,
    SecretKeyReference,
    SpecModel,
    StatusModel,
    cel,
)

KIND = "Environment"
PLURAL = "environments"

EnvironmentType = Literal["cloud", "self_hosted"]
NetworkType = Literal["unrestricted", "limited"]
DeletionPolicy = Literal["Archive", "Delete", "Orphan"]
Scope = Literal["organization", "account"]

_LIMITED_ONLY = ("allowedHosts", "allowPackageManagers", "allowMcpServers")
_CLOUD_ONLY = ("networking", "packages")


def _only_with_type_rule(fields: tuple[str, ...], type_value: str, message: str) -> dict[str, str]:
    """The CEL twin of ``_reject_unless_type``, for the apiserver."""
    absent = " && ".join(f"!has(self.{field})" for field in fields)
    return {"rule": f"self.type == '{type_value}' || ({absent})", "message": message}


def _reject_unless_type(model: SpecModel, fields: tuple[str, ...], type_value: str, label: str) -> None:
    if getattr(model, "type", None) != type_value:
        given = [field for field in fields if getattr(model, field) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only allowed with {label} {type_value}")


class Networking(SpecModel):
    model_config = SpecModel.model_config | {
        "json_schema_extra": cel(_only_with_type_rule(
            _LIMITED_ONLY, "limited",
            "allowedHosts, allowPackageManagers and allowMcpServers are only allowed with type limited",
        ))
    }

    type: NetworkType = Field(description="Network policy: unrestricted, or limited to the allowed hosts.")
    allowedHosts: list[str] | None = Field(
        default=None, description="Domains the container can reach (limited only)."
    )
    allowPackageManagers: bool | None = Field(
        default=None,
        description="Permit outbound access to public package registries beyond allowedHosts (limited only).",
    )
    allowMcpServers: bool | None = Field(
        default=None,
        description="Permit outbound access to the agent's MCP server endpoints beyond allowedHosts (limited only).",
    )

    @model_validator(mode="after")
    def _limited_fields_only_when_limited(self) -> Networking:
        _reject_unless_type(self, _LIMITED_ONLY, "limited", "networking type")
        return self


class Packages(SpecModel):
    apt: list[str] | None = Field(default=None, description="Ubuntu/Debian packages to install.")
    cargo: list[str] | None = Field(default=None, description="Rust packages to install.")
    gem: list[str] | None = Field(default=None, description="Ruby packages to install.")
    go: list[str] | None = Field(default=None, description="Go packages to install.")
    npm: list[str] | None = Field(default=None, description="Node.js packages to install.")
    pip: list[str] | None = Field(
        default=None, description="Python packages to install, optionally versioned (package==1.0.0)."
    )


class EnvironmentConfig(SpecModel):
    model_config = SpecModel.model_config | {
        "json_schema_extra": cel(
            _only_with_type_rule(
                _CLOUD_ONLY, "cloud", "networking and packages are only allowed with config type cloud"
            ),
            {"rule": "self.type == oldSelf.type", "message": "config.type is immutable"},
        )
    }

    type: EnvironmentType = Field(
        description="cloud (Anthropic-hosted sandboxes) or self_hosted (served by a WorkerPool). Immutable."
    )
    networking: Networking | None = Field(default=None, description="Network policy (cloud only).")
    packages: Packages | None = Field(default=None, description="Packages installed in the sandbox (cloud only).")

    @model_validator(mode="after")
    def _cloud_fields_only_when_cloud(self) -> EnvironmentConfig:
        _reject_unless_type(self, _CLOUD_ONLY, "cloud", "config type")
        return self


class EnvironmentSpec(SpecModel):
    model_config = SpecModel.model_config | {
        "json_schema_extra": cel({
            "rule": "!has(oldSelf.externalId) || (has(self.externalId) && self.externalId == oldSelf.externalId)",
            "message": "externalId is immutable once set",
        })
    }

    name: str | None = Field(
        default=None, min_length=1, max_length=256,
        description="Human-readable name of the environment; defaults to metadata.name.",
    )
    description: str | None = Field(default=None, max_length=4096, description="Description of the environment.")
    metadata: dict[str, str] | None = Field(
        default=None,
        description="Key-value metadata on the remote environment. Keys removed here are removed remotely; "
        "keys written by others are kept.",
    )
    scope: Scope | None = Field(
        default=None,
        description="Visibility: organization (all accounts) or account (owning account only). Self-hosted only.",
    )
    config: EnvironmentConfig = Field(description="Environment configuration: cloud or self_hosted.")
    externalId: str | None = Field(
        default=None, min_length=1, pattern=r"^env_[A-Za-z0-9]+$",
        description="ID of an existing environment (env_...) to adopt instead of creating one. Immutable once set.",
    )
    deletionPolicy: DeletionPolicy = Field(
        default="Archive",
        description="What deleting this resource does remotely: Archive (default), Delete, or Orphan (nothing).",
    )
    apiKeySecretRef: SecretKeyReference | None = Field(
        default=None,
        description="Secret key holding the API key to use for this environment; defaults to the operator's key.",
    )


class EnvironmentStatus(StatusModel):
    id: str | None = Field(default=None, description="Remote environment ID (env_...).")
    type: EnvironmentType | None = Field(default=None, description="Remote environment type.")
    createdAt: datetime | None = Field(default=None, description="When the remote environment was created.")
    updatedAt: datetime | None = Field(default=None, description="When the remote environment was last updated.")
    archivedAt: datetime | None = Field(
        default=None, description="When the remote environment was archived; null if it is not."
    )
    observedGeneration: int | None = Field(
        default=None, description="The .metadata.generation last synced to the API."
    )
    lastSyncTime: datetime | None = Field(default=None, description="When the operator last synced or checked.")
    ownedMetadataKeys: list[str] | None = Field(
        default=None, description="Remote metadata keys that the operator manages on behalf of spec.metadata."
    )
    driftedFields: list[str] | None = Field(
        default=None, description="Fields that differed from the spec at the last drift check."
    )
    createRequestedBy: str | None = Field(
        default=None,
        description="Operator instance that may have sent a create request whose result is not yet in id; "
        "any other instance first looks for an environment stamped with this resource's UID.",
    )
    lastHandledSyncNow: str | None = Field(
        default=None,
        description="Value of the environments.managedagents.dev/sync-now annotation that was last acted upon.",
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, Synced and other conditions, Kubernetes-style."
    )
