"""Validation of request bodies and query parameters for the emulator.

Each function checks one piece of client input and returns it as plain Python values, or raises a
400 ``ApiError`` whose message names the field path and the reason (``config.networking.type: ...``).
Validation happens completely before any state changes, so a rejected request changes nothing.
This module may not read or change emulator state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from environments_operator.emulator.errors import ApiError, invalid_request

JSONObject = dict[str, Any]

NAME_MAX_LENGTH = 256
DESCRIPTION_MAX_LENGTH = 2048
METADATA_MAX_PAIRS = 16
METADATA_KEY_MAX_LENGTH = 64
METADATA_VALUE_MAX_LENGTH = 512
PACKAGE_MANAGERS = ("apt", "cargo", "gem", "go", "npm", "pip")
PACKAGE_SPEC_MAX_LENGTH = 256
ALLOWED_HOSTS_MAX = 256
SCOPES = ("organization", "account")
ENVIRONMENT_TYPES = ("cloud", "self_hosted")
_DECIMAL_INTEGER = re.compile(r"-?[0-9]+")


# bool before int: in Python a bool is an int, in JSON it is not a number.
_JSON_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
    (list, "array"), (dict, "object"),
)


def json_type(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    return next((name for kind, name in _JSON_TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def _wrong_type(path: str, expected: str, value: object) -> ApiError:
    return invalid_request(f"{path}: expected {expected}, got {json_type(value)}")


def expect_object(value: object, path: str) -> JSONObject:
    if not isinstance(value, dict):
        raise _wrong_type(path, "an object", value)
    return value


def reject_unknown_fields(obj: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        where = f"{path}." if path else ""
        raise invalid_request(f"{where}{unknown[0]}: unknown field; expected one of: {', '.join(allowed)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def string_value(value: object, path: str, *, max_length: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _wrong_type(path, "a string", value)
    if not value and not allow_empty:
        raise invalid_request(f"{path}: must not be empty")
    if len(value) > max_length:
        raise invalid_request(f"{path}: is {len(value)} characters long; the limit is {max_length}")
    return value


def optional_string(
    obj: Mapping[str, Any], key: str, path: str, *, max_length: int, allow_empty: bool = True
) -> str | None:
    """A string field that may be absent or null (both give ``None``)."""
    value = obj.get(key)
    if value is None:
        return None
    return string_value(value, _join(path, key), max_length=max_length, allow_empty=allow_empty)


def optional_bool(obj: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _wrong_type(_join(path, key), "a boolean", value)
    return value


def optional_string_list(
    obj: Mapping[str, Any], key: str, path: str, *, max_items: int, max_length: int
) -> list[str] | None:
    value = obj.get(key)
    if value is None:
        return None
    field = _join(path, key)
    if not isinstance(value, list):
        raise _wrong_type(field, "an array of strings", value)
    if len(value) > max_items:
        raise invalid_request(f"{field}: has {len(value)} items; the limit is {max_items}")
    return [string_value(item, f"{field}[{index}]", max_length=max_length) for index, item in enumerate(value)]


def _check_metadata_key(key: str, field: str) -> None:
    if not key:
        raise invalid_request(f"{field}: metadata keys must not be empty")
    if len(key) > METADATA_KEY_MAX_LENGTH:
        raise invalid_request(
            f"{field}.{key[:16]}...: key is {len(key)} characters long; the limit is {METADATA_KEY_MAX_LENGTH}"
        )


def metadata(value: object, path: str) -> dict[str, str]:
    """Metadata given in full (on create): string keys to string values."""
    if value is None:
        return {}
    mapping = expect_object(value, path)
    if len(mapping) > METADATA_MAX_PAIRS:
        raise invalid_request(f"{path}: has {len(mapping)} keys; the limit is {METADATA_MAX_PAIRS}")
    result: dict[str, str] = {}
    for key, item in mapping.items():
        _check_metadata_key(key, path)
        result[key] = string_value(item, f"{path}.{key}", max_length=METADATA_VALUE_MAX_LENGTH, allow_empty=True)
    return result


def metadata_patch(value: object, path: str) -> dict[str, str | None]:
    """A metadata patch (on update): a string upserts a key, null deletes it."""
    mapping = expect_object(value, path)
    result: dict[str, str | None] = {}
    for key, item in mapping.items():
        _check_metadata_key(key, path)
        if item is None:
            result[key] = None
        else:
            result[key] = string_value(item, f"{path}.{key}", max_length=METADATA_VALUE_MAX_LENGTH, allow_empty=True)
    return result


def apply_metadata_patch(
    current: Mapping[str, str], patch: Mapping[str, str | None], path: str, *, empty_deletes: bool
) -> dict[str, str]:
    """The metadata after ``patch``; rejects a result over the key limit before anything changes."""
    result = dict(current)
    for key, item in patch.items():
        if item is None or (empty_deletes and item == ""):
            result.pop(key, None)
        else:
            result[key] = item
    if len(result) > METADATA_MAX_PAIRS:
        raise invalid_request(f"{path}: the update would leave {len(result)} keys; the limit is {METADATA_MAX_PAIRS}")
    return result


def _packages(value: object, path: str, existing: Mapping[str, Any] | None) -> JSONObject:
    packages = expect_object(value, path)
    reject_unknown_fields(packages, (*PACKAGE_MANAGERS, "type"), path)
    package_type = packages.get("type")
    if package_type is not None and package_type != "packages":
        raise invalid_request(f"{path}.type: unknown packages type {package_type!r}; expected 'packages'")
    result: JSONObject = {}
    for manager in PACKAGE_MANAGERS:
        given = optional_string_list(
            packages, manager, path, max_items=ALLOWED_HOSTS_MAX, max_length=PACKAGE_SPEC_MAX_LENGTH
        )
        # Omitted or null keeps the stored list on update, and means "none" on create.
        previous = list(existing[manager]) if existing is not None else []
        result[manager] = given if given is not None else previous
    result["type"] = "packages"
    return result


def _networking(value: object, path: str, existing: Mapping[str, Any] | None) -> JSONObject:
    networking = expect_object(value, path)
    network_type = networking.get("type")
    if network_type == "unrestricted":
        reject_unknown_fields(networking, ("type",), path)
        return {"type": "unrestricted"}
    if network_type == "limited":
        reject_unknown_fields(
            networking, ("type", "allow_mcp_servers", "allow_package_managers", "allowed_hosts"), path
        )
        # Omitted fields keep their stored value only when the stored policy is also limited.
        previous = existing if existing is not None and existing.get("type") == "limited" else None
        hosts = optional_string_list(
            networking, "allowed_hosts", path, max_items=ALLOWED_HOSTS_MAX, max_length=NAME_MAX_LENGTH
        )
        mcp = optional_bool(networking, "allow_mcp_servers", path)
        package_managers = optional_bool(networking, "allow_package_managers", path)
        return {
            "allow_mcp_servers": mcp if mcp is not None else bool(previous and previous["allow_mcp_servers"]),
            "allow_package_managers": package_managers
            if package_managers is not None
            else bool(previous and previous["allow_package_managers"]),
            "allowed_hosts": hosts if hosts is not None else list(previous["allowed_hosts"] if previous else []),
            "type": "limited",
        }
    if network_type is None:
        raise invalid_request(f"{path}.type: required; expected 'unrestricted' or 'limited'")
    raise invalid_request(
        f"{path}.type: unknown network policy type {network_type!r}; expected 'unrestricted' or 'limited'"
    )


def default_cloud_config() -> JSONObject:
    return {
        "networking": {"type": "unrestricted"},
        "packages": {**{manager: [] for manager in PACKAGE_MANAGERS}, "type": "packages"},
        "type": "cloud",
    }


def environment_config(value: object, path: str, existing: Mapping[str, Any] | None) -> JSONObject:
    """The stored config after applying ``value`` (create when ``existing`` is None, else update).

    On update the type may not change, and omitted or null fields keep their stored values.
    """
    if value is None:
        return dict(existing) if existing is not None else default_cloud_config()
    config = expect_object(value, path)
    config_type = config.get("type")
    if config_type is None:
        raise invalid_request(f"{path}.type: required; expected one of: {', '.join(ENVIRONMENT_TYPES)}")
    if config_type not in ENVIRONMENT_TYPES:
        raise invalid_request(
            f"{path}.type: unknown environment type {config_type!r}; expected one of: {', '.join(ENVIRONMENT_TYPES)}"
        )
    if existing is not None and existing["type"] != config_type:
        raise invalid_request(
            f"{path}.type: cannot change an environment's type from {existing['type']!r} to {config_type!r}; "
            "create a new environment instead"
        )
    if config_type == "self_hosted":
        reject_unknown_fields(config, ("type",), path)
        return {"type": "self_hosted"}
    reject_unknown_fields(config, ("type", "networking", "packages"), path)
    base = existing if existing is not None else default_cloud_config()
    networking_value = config.get("networking")
    packages_value = config.get("packages")
    return {
        "networking": _networking(networking_value, f"{path}.networking", base["networking"])
        if networking_value is not None
        else dict(base["networking"]),
        "packages": _packages(packages_value, f"{path}.packages", existing["packages"] if existing else None)
        if packages_value is not None
        else dict(base["packages"]),
        "type": "cloud",
    }


def scope(value: object, path: str) -> str | None:
    if value is None:
        return None
    if value not in SCOPES:
        if not isinstance(value, str):
            raise _wrong_type(path, "'organization' or 'account'", value)
        raise invalid_request(f"{path}: unknown scope {value!r}; expected 'organization' or 'account'")
    return str(value)


def query_int(query: Mapping[str, str], name: str, *, minimum: int, maximum: int, clamp: bool = False) -> int | None:
    """An optional integer query parameter within [minimum, maximum].

    Out of that range it is a 400, or with ``clamp`` the nearest bound; anything but an integer is a 400.
    """
    raw = query.get(name)
    if raw is None:
        return None
    # int() alone would also take "5_0", " 5" and non-ASCII digits, which no client means as a number.
    if not _DECIMAL_INTEGER.fullmatch(raw):
        raise invalid_request(f"{name}: expected an integer, got {raw!r}")
    if clamp:
        return _clamped(raw, minimum, maximum)
    try:
        value = int(raw, 10)  # may still refuse thousands of digits
    except ValueError:
        raise invalid_request(f"{name}: expected an integer, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise invalid_request(f"{name}: must be between {minimum} and {maximum}, got {value}")
    return value


def _clamped(decimal: str, minimum: int, maximum: int) -> int:
    """A decimal integer, however many digits it has, clamped into [minimum, maximum]."""
    negative = decimal.startswith("-")
    significant = decimal.removeprefix("-").lstrip("0") or "0"
    # With more digits than either bound has, it is past the bound on its side; int() would refuse thousands.
    if len(significant) > len(str(max(abs(minimum), abs(maximum)))):
        return minimum if negative else maximum
    value = -int(significant) if negative else int(significant)
    return max(minimum, min(value, maximum))


def query_bool(query: Mapping[str, str], name: str) -> bool | None:
    raw = query.get(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise invalid_request(f"{name}: expected 'true' or 'false', got {raw!r}")


def query_time(query: Mapping[str, str], name: str) -> datetime | None:
    """An optional RFC 3339 timestamp query parameter; one without a zone is taken as UTC."""
    raw = query.get(name)
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise invalid_request(f"{name}: expected an RFC 3339 timestamp, got {raw!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
