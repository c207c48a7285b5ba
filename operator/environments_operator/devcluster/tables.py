"""Server-side printing: the ``meta.k8s.io/v1`` ``Table`` a real apiserver returns when ``kubectl get`` asks.

``kubectl get`` sends ``Accept: application/json;as=Table;...`` and prints the columns it gets back; a
server that ignores that header leaves it with ``NAME`` and ``AGE`` only. This module builds the Table:
for a custom resource from its CRD's ``additionalPrinterColumns`` (``priority > 0`` columns are the
``-o wide`` ones), for pods and Secrets the columns kubectl users know, else ``NAME`` and ``CREATED AT``.
Column values come from a small JSONPath subset: ``.a.b``, ``[N]`` and ``[?(@.key=="value")]`` filters;
``date`` columns are printed as ages (``5s``, ``3m2s``, ``4h``), as the apiserver prints them.

Pure: plain dicts in, plain dicts out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]

_STEP = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_-]+)==\"([^\"]*)\"\)\]")


def wants_table(accept: str | None) -> bool:
    return accept is not None and "as=Table" in accept


def json_path(obj: Any, path: str) -> Any:
    """The value at ``path`` (a printer column's JSONPath), or None where the object has none."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    position, current = 0, obj
    while position < len(path) and current is not None:
        step = _STEP.match(path, position)
        if step is None:
            return None
        key, index, filter_key, filter_value = step.groups()
        if key is not None:
            current = current.get(key) if isinstance(current, dict) else None
        elif index is not None:
            current = current[int(index)] if isinstance(current, list) and int(index) < len(current) else None
        else:
            matches = [item for item in current or [] if isinstance(item, dict)
                       and str(item.get(filter_key)) == filter_value] if isinstance(current, list) else []
            current = matches[0] if matches else None
        position = step.end()
    return current


def _column(name: str, type_: str = "string", format_: str = "", priority: int = 0, description: str = "") -> JSON:
    return {"name": name, "type": type_, "format": format_, "description": description, "priority": priority}


def _pod_row(pod: JSON) -> list[Any]:
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    ready = sum(1 for c in containers if c.get("ready"))
    waiting = next((c["state"]["waiting"].get("reason") for c in containers
                    if (c.get("state") or {}).get("waiting")), None)
    terminated = next((c["state"]["terminated"].get("reason") for c in containers
                       if (c.get("state") or {}).get("terminated")), None)
    gated = any(c.get("reason") == "SchedulingGated" for c in status.get("conditions") or [])
    shown = "Terminating" if pod["metadata"].get("deletionTimestamp") else (
        waiting or terminated or ("SchedulingGated" if gated else status.get("phase", "Pending")))
    total = len((pod.get("spec") or {}).get("containers") or [])
    return [pod["metadata"]["name"], f"{ready}/{total}", shown,
            sum(c.get("restartCount", 0) for c in containers), pod["metadata"].get("creationTimestamp")]


def _columns_and_cells(kind: str, crd: JSON | None, version: str) -> tuple[list[JSON], Any]:
    if crd is not None:
        served: JSON = next((v for v in crd["spec"]["versions"] if v["name"] == version), {})
        printer = served.get("additionalPrinterColumns") or []
        if printer:
            columns = [_column("Name", format_="name"), *(
                _column(c["name"], c.get("type", "string"), c.get("format", ""), c.get("priority", 0),
                        c.get("description", "")) for c in printer)]
            return columns, lambda obj: [obj["metadata"]["name"], *(json_path(obj, c["jsonPath"]) for c in printer)]
    if kind == "Pod":
        return ([_column("Name", format_="name"), _column("Ready"), _column("Status"),
                 _column("Restarts", "integer"), _column("Age", "date")], _pod_row)
    if kind == "Secret":
        return ([_column("Name", format_="name"), _column("Type"), _column("Data", "integer"), _column("Age", "date")],
                lambda obj: [obj["metadata"]["name"], obj.get("type", "Opaque"), len(obj.get("data") or {}),
                             obj["metadata"].get("creationTimestamp")])
    return ([_column("Name", format_="name"), _column("Created At", "date")],
            lambda obj: [obj["metadata"]["name"], obj["metadata"].get("creationTimestamp")])


def human_duration(seconds: float) -> str:
    """An age as the apiserver prints it in a ``date`` column (``duration.HumanDuration``)."""
    s = max(int(seconds), 0)
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d" if days < 365 * 2 else f"{days // 365}y"


def _age(value: Any, now: datetime) -> Any:
    if not isinstance(value, str):
        return "<unknown>" if value is None else value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    return human_duration((now - moment).total_seconds())


def as_table(kind: str, objects: Iterable[JSON], *, crd: JSON | None, version: str,
             resource_version: str | None = None, now: datetime | None = None) -> JSON:
    """The Table of ``objects`` (one object for a get, a list's items for a list)."""
    columns, cells = _columns_and_cells(kind, crd, version)
    moment = now or datetime.now(UTC)
    dates = [index for index, column in enumerate(columns) if column["type"] == "date"]

    def row(obj: JSON) -> list[Any]:
        values = cells(obj)
        for index in dates:
            values[index] = _age(values[index], moment)
        return values

    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version or ""},
        "columnDefinitions": columns,
        "rows": [{"cells": row(obj), "object": obj} for obj in objects],
    }
