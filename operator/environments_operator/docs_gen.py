"""The generated parts of the documentation, and the command that rewrites them.

Run from the repository root::

    python -m environments_operator.docs_gen           # rewrite every generated block in place
    python -m environments_operator.docs_gen --check   # exit 1, naming each stale page

A generated block is the text between ``<!-- generated:NAME -->`` and ``<!-- end generated -->``; the
prose around it is written by hand. What fills the blocks:

- ``docs/environment.md``, ``docs/workerpool.md``: the field tables (path, type, default, constraints,
  description), the CEL validation rules and the printer columns come from the CRDs exactly as
  ``domain.crd`` generates them from the pydantic models. The tables of condition reasons and Events
  are rendered from ``CONDITIONS`` and ``EVENTS`` below, which name every reason by its constant in the
  domain (``environment_sync``, ``dispatch``, ``worker_lifecycle``); what each one means is written
  here, once. ``tests/unit/test_docs.py`` fails when the domain has a reason these tables lack, or the
  handlers post an Event they do not list.
- ``charts/environments-operator/README.md``: the values table, from the ``# --`` comments of
  ``values.yaml`` (helm-docs style: a ``# --`` comment documents the key below it, with everything
  under it); the type comes from ``values.schema.json``. A value without a comment is an error.

Needs only pydantic and PyYAML, and imports nothing but the domain: no kopf, no cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from environments_operator.domain import crd, dispatch, warm_workers, worker_lifecycle
from environments_operator.domain import environment_sync as sync
from environments_operator.domain.environment import KIND as ENVIRONMENT
from environments_operator.domain.pool_loop import REPEATED_FAILURE_EVENT_EVERY
from environments_operator.domain.workerpool import KIND as WORKER_POOL

JSON = dict[str, Any]

BEGIN = re.compile(r"<!-- generated:(?P<name>[a-z][a-z0-9-]*) -->\n")
END = "<!-- end generated -->"

CHART_DIR = Path("charts") / "environments-operator"


# ----- the catalogue: conditions, their reasons, and Events ---------------------------------------


@dataclass(frozen=True)
class Reason:
    """One reason a condition can carry: on which condition(s), with which status, and what it means."""

    conditions: str  # e.g. "Ready, Synced"
    status: str  # "True" or "False"
    reason: str
    meaning: str


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" or "Warning"
    reason: str
    meaning: str


_RS = f"{sync.READY}, {sync.SYNCED}"
_TRANSIENT = f"{sync.SYNCED}; {sync.READY} too while no remote environment exists yet"

# Every reason of every condition, per kind. A DispatchFailing reason is made from the refused object's
# kind and the apiserver's status (``dispatch.dispatch_failure``); its rows are produced by calling it.
CONDITIONS: dict[str, list[Reason]] = {
    ENVIRONMENT: [
        Reason(_RS, "True", sync.CREATED, "The operator created the remote environment, or found the one an "
               "interrupted create request had made (by the resource UID in its metadata)."),
        Reason(_RS, "True", sync.RECREATED, "The remote environment was deleted outside the operator, and a new "
               "one was created."),
        Reason(_RS, "True", sync.ADOPTED, "`spec.externalId` named an existing environment of the same type; it was "
               "taken over and brought to the spec."),
        Reason(_RS, "True", sync.UPDATED, "Fields that differed from the spec were sent to the API."),
        Reason(_RS, "True", sync.IN_SYNC, "The remote environment matches the spec."),
        Reason(_RS, "True", sync.DRIFT_CORRECTED, "A drift check found fields changed outside the operator and "
               "corrected them (`status.driftedFields`)."),
        Reason(_RS, "False", sync.ARCHIVED, "The remote environment was archived outside the operator. Archived "
               "environments are read-only: the operator stops syncing it and never un-archives it."),
        Reason(_RS, "False", sync.INVALID_SPEC, "The spec fails the operator's validation, or the API refused it "
               "(400/422; its message verbatim). Not retried until the spec changes."),
        Reason(_RS, "False", sync.REJECTED, "The API refused the request with another 4xx that retrying cannot fix. "
               "Not retried until the spec changes."),
        Reason(_RS, "False", sync.NOT_FOUND, "The environment named by `spec.externalId` does not exist, or the API "
               "answered another request with 404. Not retried until the spec changes."),
        Reason(_RS, "False", sync.TYPE_MISMATCH, "The environment named by `spec.externalId` is not of type "
               "`spec.config.type`. Not retried until the spec changes."),
        Reason(_TRANSIENT, "False", sync.CREDENTIALS_UNAVAILABLE, "The Secret or key named by "
               "`spec.apiKeySecretRef` is missing; retried with backoff, starting within "
               "seconds so that a Secret created just after is picked up."),
        Reason(_TRANSIENT, "False", sync.UNAUTHORIZED, "The API refused the API key (401/403); the message names "
               "where the key came from. Retried with backoff from "
               f"{sync.CREDENTIALS_BACKOFF_BASE_SECONDS:g} s."),
        Reason(_TRANSIENT, "False", sync.RATE_LIMITED, "The API answered 429; retried after its `retry-after`, else "
               "with backoff."),
        Reason(_TRANSIENT, "False", sync.API_UNAVAILABLE, "5xx, 408, 409 or no answer; retried after `retry-after`, "
               f"else with backoff ({sync.BACKOFF_BASE_SECONDS:g} s doubling, capped at "
               f"{sync.BACKOFF_CAP_SECONDS:g} s)."),
        Reason(sync.READY, "False", sync.DELETION_BLOCKED, "The resource is being deleted, and its `deletionPolicy` "
               "cannot be applied yet (the message names the cause); retried with backoff."),
        Reason(sync.DRIFT_DETECTED, "True", sync.DRIFT_CORRECTED, "The last drift check found fields changed outside "
               "the operator (listed in the message) and corrected them."),
        Reason(sync.DRIFT_DETECTED, "True", sync.RECREATED, "The remote environment had been deleted outside the "
               "operator and was created again."),
        Reason(sync.DRIFT_DETECTED, "False", sync.NO_DRIFT, "The last drift check found the environment equal to "
               "the spec."),
    ],
    WORKER_POOL: [
        Reason(dispatch.CONDITION_READY, "True", dispatch.SERVING, "The pool serves its environment's work queue."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.INVALID_SPEC, "The spec fails validation; the message "
               "names the field."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.ENVIRONMENT_NOT_FOUND, "`spec.environmentRef` names no "
               "Environment in the pool's namespace."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.ENVIRONMENT_NOT_SELF_HOSTED, "The Environment is not "
               "`self_hosted`; a WorkerPool serves only self-hosted environments."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.ENVIRONMENT_ARCHIVED, "The Environment is archived and "
               "takes no new work."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.ENVIRONMENT_NOT_READY, "The Environment has no "
               "`status.id` yet (not synced)."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.ENVIRONMENT_KEY_UNAVAILABLE, "The Secret or key named by "
               "`spec.environmentKeySecretRef` cannot be read."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.ENVIRONMENT_KEY_REJECTED, "The API rejected the "
               "environment key; the Secret is read again before the next poll."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.POLL_REJECTED, "The API refused a poll with an error that "
               "retrying cannot fix; polling goes on with backoff."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.WORK_QUEUE_UNAVAILABLE,
               f"{dispatch.POLL_FAILURES_BEFORE_NOT_READY} or more polls in a row failed (5xx, 429, no answer); "
               "polling goes on with jittered backoff."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.SUSPENDED, "`spec.suspend` is true: no new work item is "
               "claimed; running sessions and their pods continue, and the queue's depth is still shown."),
        Reason(dispatch.CONDITION_READY, "False", dispatch.DELETING, "The pool is being deleted: its workers' items "
               "are stopped and its pods and Secrets deleted."),
        Reason(dispatch.CONDITION_AT_CAPACITY, "True", dispatch.MAX_WORKERS_REACHED, "Unfinished worker pods reached "
               "`maxWorkers`: the pool does not poll, items wait in the queue (the message gives the backlog)."),
        Reason(dispatch.CONDITION_AT_CAPACITY, "False", dispatch.BELOW_CAPACITY, "Fewer than `maxWorkers` unfinished "
               "worker pods."),
        *(
            Reason(dispatch.CONDITION_DISPATCH_FAILING, "True",
                   dispatch.dispatch_failure(kind, status, "", "", "").reason,
                   f"Kubernetes refused to create a worker's {kind} ({answer}); the item is left unacknowledged, "
                   "and dispatch pauses with backoff.")
            for kind in ("Pod", "Secret")
            for status, answer in ((403, "403, e.g. a quota or a policy"), (422, "422, an invalid manifest"),
                                   (500, "any other status, or no answer"))
        ),
        Reason(dispatch.CONDITION_DISPATCH_FAILING, "False", dispatch.DISPATCHING, "The last Pod and Secret creations "
               "went through."),
    ],
}

_FIRST = "posted when the condition reason of that name first appears"

# The Ready=False reasons that reach the status through ``dispatch.pool_conditions``, whose changes
# ``dispatch.ready_event`` turns into Events. ``Deleting`` does not: the deletion handler writes it last.
_POOL_READY_EVENTS = [row.reason for row in CONDITIONS[WORKER_POOL] if row.conditions == dispatch.CONDITION_READY
                      and row.status == "False" and row.reason not in (dispatch.DELETING, dispatch.SUSPENDED)]

EVENTS: dict[str, list[Event]] = {
    ENVIRONMENT: [
        Event("Normal", sync.CREATED, "Created the remote environment."),
        Event("Normal", sync.ADOPTED, "Took over the environment named by `spec.externalId`, or found the one an "
              "interrupted create request had made."),
        Event("Normal", sync.UPDATED, "Sent the fields that differed from the spec (listed)."),
        Event("Normal", sync.ARCHIVED, "Archived the remote environment on deletion (`deletionPolicy: Archive`)."),
        Event("Normal", sync.DELETED, "Deleted the remote environment on deletion (`deletionPolicy: Delete`)."),
        Event("Normal", sync.ORPHANED, "Left the remote environment in place on deletion (`deletionPolicy: Orphan`)."),
        Event("Warning", sync.DRIFT_DETECTED, "A drift check found fields changed outside the operator, and "
              "corrected them."),
        Event("Warning", sync.RECREATED, "The remote environment was deleted outside the operator; created again."),
        Event("Warning", sync.ARCHIVED, "The remote environment was archived outside the operator; it is no longer "
              "synced."),
        *(Event("Warning", reason, f"The sync failed: {_FIRST} (see Conditions).")
          for reason in (sync.INVALID_SPEC, sync.REJECTED, sync.NOT_FOUND, sync.TYPE_MISMATCH, sync.RATE_LIMITED,
                         sync.API_UNAVAILABLE, sync.UNAUTHORIZED)),
        Event("Warning", sync.CREDENTIALS_UNAVAILABLE, f"The API key's Secret is missing: {_FIRST}; also when a "
              "deleted resource is released without the look-up for an interrupted create, for want of a key."),
        Event("Warning", sync.DELETION_BLOCKED, f"The deletion cannot proceed: {_FIRST}."),
        Event("Warning", sync.INVALID_ANNOTATION, f"`{sync.DRIFT_INTERVAL_ANNOTATION}` is not a number of seconds "
              f">= {sync.MIN_DRIFT_INTERVAL_SECONDS:g}; the default interval applies (once per distinct value)."),
    ],
    WORKER_POOL: [
        *(Event("Warning", reason, "Ready turned False with this reason (see Conditions); once, however long it "
                "lasts.") for reason in _POOL_READY_EVENTS),
        Event("Normal", dispatch.SUSPENDED, "`spec.suspend` turned true: Ready is False, reason `Suspended`."),
        Event("Normal", dispatch.SERVING, "Ready again; the message names the reason the pool recovered from."),
        Event("Warning", dispatch.DISPATCH_FAILED, "Kubernetes refused a worker's Pod or Secret (the message is "
              "`DispatchFailing`'s); posted for a new reason, and then for every "
              f"{REPEATED_FAILURE_EVENT_EVERY}th failure in a row of the same one."),
        Event("Warning", dispatch.WORK_ITEM_UNSERVABLE, "A work item carries no per-item secret (or no session), "
              "and worker pods never get the environment key; the item is force-stopped."),
        Event("Warning", worker_lifecycle.WORKER_START_TIMEOUT, "A released worker pod was still Pending after "
              "`startupTimeoutSeconds` (the cause is in the message); its item is force-stopped, then the pod and its "
              "Secret are deleted."),
        Event("Warning", worker_lifecycle.WORKER_FAILED, "A worker pod failed (the container's reason and exit code "
              "are in the message); its item is force-stopped."),
        Event("Warning", worker_lifecycle.WORKER_VANISHED, "A worker pod disappeared before it finished; its item is "
              "force-stopped."),
        Event("Warning", warm_workers.WARM_WORKER_FAILED, "An idle warm pod ended before any item was bound to it; "
              "it is deleted and replaced."),
        Event("Warning", warm_workers.WARM_WORKER_START_TIMEOUT, "An idle warm pod was not ready within "
              "`startupTimeoutSeconds`; it is deleted and replaced, and no item was bound to it."),
        Event("Warning", warm_workers.WARM_WORKER_VANISHED, "An idle warm pod disappeared; it is replaced."),
        Event("Warning", warm_workers.WARM_WORKER_CREATION_FAILED, "Creating a warm pod (or its ServiceAccount, "
              "Role or RoleBinding) was refused; retried after 10 s, and items get fresh pods meanwhile."),
        Event("Warning", worker_lifecycle.WORKER_NEVER_RELEASED, "A gated pod's item was still queued after "
              "`startupTimeoutSeconds` without being acknowledged; the pod (in which no worker ever ran) is deleted."),
        Event("Warning", worker_lifecycle.WORKER_FORCE_DELETED, "A deleted worker pod was still Terminating after its "
              "grace period (its node is gone); it is force-deleted and stops counting against `maxWorkers`."),
    ],
}


def condition_types(kind: str) -> list[str]:
    return list(dict.fromkeys(
        part.split(";")[0].strip() for row in CONDITIONS[kind] for part in row.conditions.split(",")
    ))


def documented_names(kind: str) -> set[str]:
    """Condition types, reasons and Event reasons the page of ``kind`` lists."""
    return ({row.reason for row in CONDITIONS[kind]} | {event.reason for event in EVENTS[kind]}
            | set(condition_types(kind)))


# ----- markdown ----------------------------------------------------------------------------------


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: object) -> str:
    """Inline code; ``table`` escapes the pipes (GitHub tables need that inside code spans too)."""
    return f"`{text}`" if text != "" else ""


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


# ----- fields, from the CRD schema ---------------------------------------------------------------


def _crd_schema(kind: str) -> JSON:
    document = crd.environment_crd() if kind == ENVIRONMENT else crd.workerpool_crd()
    schema: JSON = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _type(node: JSON) -> str:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (any fields)"
    kind = node.get("type", "")
    if kind == "array":
        return f"array of {_type(node.get('items') or {})}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of string to {_type(node['additionalProperties'])}"
    if kind == "string" and node.get("format"):
        return f"string ({node['format']})"
    return str(kind)


def _range(low: Any, high: Any, unit: str = "") -> str:
    if low is not None and high is not None:
        return f"{unit}{low}..{high}"
    return f"{unit}>= {low}" if low is not None else f"{unit}<= {high}"


def _constraints(node: JSON, required: bool) -> str:
    parts = ["required"] if required else []
    if "enum" in node:
        parts.append("one of " + ", ".join(_code(value) for value in node["enum"]))
    if "minimum" in node or "maximum" in node:
        parts.append(_range(node.get("minimum"), node.get("maximum")))
    if "minLength" in node or "maxLength" in node:
        parts.append(_range(node.get("minLength"), node.get("maxLength"), "length "))
    if "minItems" in node or "maxItems" in node:
        parts.append(_range(node.get("minItems"), node.get("maxItems"), "items "))
    if "pattern" in node:
        parts.append(f"pattern {_code(node['pattern'])}")
    return "; ".join(parts)


def _children(node: JSON, path: str) -> Iterator[tuple[str, JSON, bool]]:
    """(path, schema, required) of each field directly below ``node``, arrays and maps looked through."""
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        yield from _children(node["items"], f"{path}[]")
        return
    required = set(node.get("required") or [])
    for name, child in (node.get("properties") or {}).items():
        yield f"{path}.{name}", child, name in required


def field_rows(node: JSON, path: str) -> Iterator[list[str]]:
    for child_path, child, required in _children(node, path):
        default = _code(_json(child["default"])) if "default" in child else ""
        yield [_code(child_path), _type(child), default, _constraints(child, required),
               child.get("description", "")]
        yield from field_rows(child, child_path)


FIELD_HEADER = ("field", "type", "default", "constraints", "description")


def fields_table(kind: str, part: str) -> str:
    return table(FIELD_HEADER, list(field_rows(_crd_schema(kind)["properties"][part], part)))


def _rules(node: JSON, path: str) -> Iterator[list[str]]:
    for rule in node.get("x-kubernetes-validations") or []:
        yield [_code(path), _code(rule["rule"]), rule.get("message", "")]
    for child_path, child, _ in _children(node, path):
        yield from _rules(child, child_path)


def validations_table(kind: str) -> str:
    return table(("field", "rule (CEL)", "message"), list(_rules(_crd_schema(kind)["properties"]["spec"], "spec")))


def columns_table(kind: str) -> str:
    document = crd.environment_crd() if kind == ENVIRONMENT else crd.workerpool_crd()
    columns = document["spec"]["versions"][0]["additionalPrinterColumns"]
    return table(("column", "shows", "listed"), [
        [column["name"], _code(column["jsonPath"]), "with `-o wide`" if column.get("priority", 0) > 0 else "always"]
        for column in columns
    ])


def conditions_table(kind: str) -> str:
    return table(("condition", "status", "reason", "meaning"),
                 [[row.conditions, row.status, _code(row.reason), row.meaning] for row in CONDITIONS[kind]])


def events_table(kind: str) -> str:
    return table(("type", "reason", "posted when"),
                 [[event.type, _code(event.reason), event.meaning] for event in EVENTS[kind]])


def resource_blocks(kind: str) -> dict[str, str]:
    return {
        "spec-fields": fields_table(kind, "spec"),
        "status-fields": fields_table(kind, "status"),
        "validations": validations_table(kind),
        "columns": columns_table(kind),
        "conditions": conditions_table(kind),
        "events": events_table(kind),
    }


# ----- the chart's values, from values.yaml comments ---------------------------------------------


class UndocumentedValues(ValueError):
    pass


_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")
_DOC = re.compile(r"^ *# -- ?(?P<text>.*)$")
_MORE = re.compile(r"^ *# ?(?P<text>.*)$")


def documented_values(text: str) -> list[tuple[str, str]]:
    """(value path, description) of every ``# --``-commented key of a values.yaml, in file order.

    A comment documents the key right below it and everything under that key. A key without one must
    be a plain parent (a mapping of documented keys); any other is listed in ``UndocumentedValues``.
    """
    rows: list[tuple[str, str]] = []
    undocumented: list[str] = []
    parents: list[tuple[int, str]] = []
    pending: list[str] | None = None
    inside: int | None = None  # indentation of the documented key whose block is being skipped
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            pending = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        if inside is not None:
            if indent > inside or (stripped.startswith("- ") and indent == inside):
                continue
            inside = None
        if (doc := _DOC.match(line)) is not None:
            pending = [doc["text"].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None and (more := _MORE.match(line)) is not None:
                pending.append(more["text"].strip())
            continue
        key = _KEY.match(line)
        if key is None:
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([name for _, name in parents] + [key["key"]])
        rest = key["rest"].split(" #", 1)[0].strip()
        if pending is not None:
            rows.append((path, " ".join(part for part in pending if part)))
            inside = indent
        elif rest:
            undocumented.append(path)
        else:
            parents.append((indent, key["key"]))
        pending = None
    if undocumented:
        raise UndocumentedValues("values without a `# --` comment in values.yaml: " + ", ".join(undocumented))
    return rows


def _lookup(tree: Any, path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _schema_type(schema: JSON | None, path: str) -> str | None:
    """The type values.schema.json gives the value at ``path`` (``$ref`` followed), if it gives one."""
    definitions: JSON = (schema or {}).get("definitions", {})

    def deref(node: JSON | None) -> JSON | None:
        while node is not None and "$ref" in node:
            node = definitions.get(node["$ref"].rsplit("/", 1)[-1])
        return node

    node = deref(schema)
    for part in path.split("."):
        node = deref(((node or {}).get("properties") or {}).get(part))
    if node is None or "type" not in node:
        return None
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    return " or ".join("list" if kind == "array" else str(kind) for kind in kinds)


def _python_type(value: Any) -> str:
    for python, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                         (list, "list"), (dict, "object")):
        if isinstance(value, python):
            return name
    return "null"


def values_table(values_text: str, schema: JSON | None = None) -> str:
    values = yaml.safe_load(values_text)
    rows = []
    for path, description in documented_values(values_text):
        default = _lookup(values, path)
        kind = _schema_type(schema, path) or _python_type(default)
        rows.append([_code(path), kind, _code(_json(default)), description])
    return table(("value", "type", "default", "description"), rows)


def chart_blocks(root: Path) -> dict[str, str]:
    schema_path = root / CHART_DIR / "values.schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8")) if schema_path.exists() else None
    return {"values": values_table((root / CHART_DIR / "values.yaml").read_text(encoding="utf-8"), schema)}


# ----- pages --------------------------------------------------------------------------------------


class PageError(ValueError):
    pass


def fill(text: str, blocks: Mapping[str, str], page: str) -> str:
    """``text`` with each generated block's body replaced; every block must be there exactly once."""
    out: list[str] = []
    seen: list[str] = []
    position = 0
    for match in BEGIN.finditer(text):
        if match.start() < position:
            raise PageError(f"{page}: block {match['name']!r} starts inside another one")
        name = match["name"]
        if name not in blocks:
            raise PageError(f"{page}: unknown generated block {name!r} (known: {', '.join(blocks)})")
        end = text.find(END, match.end())
        if end < 0:
            raise PageError(f"{page}: block {name!r} has no {END!r}")
        # Blank lines around the body, so that Markdown never reads a table into the comments' lines.
        out += [text[position:match.end()], "\n", blocks[name], "\n"]
        seen.append(name)
        position = end
    out.append(text[position:])
    missing = [name for name in blocks if name not in seen]
    repeated = {name for name in seen if seen.count(name) > 1}
    if missing or repeated:
        raise PageError(f"{page}: generated blocks missing {missing}, repeated {sorted(repeated)}")
    return "".join(out)


ENVIRONMENT_PAGE = Path("docs") / "environment.md"
WORKER_POOL_PAGE = Path("docs") / "workerpool.md"
CHART_README = CHART_DIR / "README.md"
PAGES = (ENVIRONMENT_PAGE, WORKER_POOL_PAGE, CHART_README)


def blocks_of(page: Path, root: Path) -> dict[str, str]:
    """The generated blocks of one of ``PAGES``, by name."""
    if page == CHART_README:
        return chart_blocks(root)
    return resource_blocks(ENVIRONMENT if page == ENVIRONMENT_PAGE else WORKER_POOL)


def pages(root: Path) -> dict[Path, str]:
    """Each generated page (relative to ``root``) with its blocks filled in as they should be."""
    return {page: fill((root / page).read_text(encoding="utf-8"), blocks_of(page, root), str(page))
            for page in PAGES}


def stale_pages(root: Path) -> list[Path]:
    return [path for path, text in pages(root).items() if (root / path).read_text(encoding="utf-8") != text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m environments_operator.docs_gen",
                                     description="Rewrite the generated blocks of the documentation.")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: here)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    args = parser.parse_args(argv)
    root: Path = args.root
    try:
        rendered = pages(root)
    except (PageError, UndocumentedValues, OSError) as error:
        print(f"docs_gen: {error}", file=sys.stderr)
        return 2
    stale = [path for path, text in rendered.items() if (root / path).read_text(encoding="utf-8") != text]
    for path in stale:
        if args.check:
            print(f"stale: {path} (run: python -m environments_operator.docs_gen)", file=sys.stderr)
        else:
            (root / path).write_text(rendered[path], encoding="utf-8")
            print(f"updated {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
