"""Records every Kubernetes API request the operator sends to the fake apiserver, in RBAC terms.

Each request becomes an ``ApiCall`` (verb, group, resource, subresource, namespace, name, answered
status). The verb is the RBAC verb, not the HTTP method: get/list/watch/create/update/patch/delete/
deletecollection. Discovery (``/api``, ``/apis/...`` without a resource) is not recorded: every
authenticated user may read it (the ``system:discovery`` role).

Three ways to read the record:
- per test: ``kube.calls`` (every ``ApiCall``) and ``kube.rbac_uses()`` (a set of ``RbacUse``);
- per pytest session: ``SESSION_RBAC_USES``, the union over every ``kube`` fixture of the session;
- across processes: set ``HARNESS_RBAC_RECORD=/path/record.json`` and each ``kube`` fixture merges its
  uses into that file at teardown; ``load_rbac_record(path)`` reads it back.

A test that asserts RBAC coverage must run after the end-to-end tests: mark it
``@pytest.mark.after_e2e`` and ``tests.harness.plugin`` moves it to the end of the session.

What this module may not do: decide anything about RBAC itself (that is the chart test's job).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

RBAC_RECORD_ENV = "HARNESS_RBAC_RECORD"


class RbacUse(NamedTuple):
    """One (apiGroup, resource, verb) triple as an RBAC rule names it; resource may be ``pods/status``."""

    group: str
    resource: str
    verb: str


@dataclasses.dataclass
class ApiCall:
    """One request the fake apiserver received. ``status`` is the HTTP code answered (None while streaming)."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    status: int | None = None

    @property
    def rbac(self) -> RbacUse:
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return RbacUse(self.group, resource, self.verb)


# The union of every fixture's uses in this pytest session (filled by ``record_call``).
SESSION_RBAC_USES: set[RbacUse] = set()


def record_call(calls: list[ApiCall], call: ApiCall) -> None:
    calls.append(call)
    SESSION_RBAC_USES.add(call.rbac)


def load_rbac_record(path: str | os.PathLike[str]) -> set[RbacUse]:
    """Read a record file written by ``save_rbac_record``; a missing file is an empty record."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return set()
    return {RbacUse(row["group"], row["resource"], row["verb"]) for row in rows}


def save_rbac_record(path: str | os.PathLike[str], uses: Iterable[RbacUse]) -> None:
    """Merge ``uses`` into the record file (atomically, so a concurrent reader never sees half a file)."""
    target = Path(path)
    merged = load_rbac_record(target) | set(uses)
    rows = [use._asdict() for use in sorted(merged)]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as handle:
        json.dump(rows, handle, indent=1)
    os.replace(handle.name, target)


def save_to_env_record(uses: Iterable[RbacUse]) -> None:
    """Merge into the file named by ``$HARNESS_RBAC_RECORD``, if that variable is set."""
    path = os.environ.get(RBAC_RECORD_ENV)
    if path:
        save_rbac_record(path, uses)
