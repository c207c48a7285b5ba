"""The generated documentation: every generated block is up to date, and the tables of conditions and
Events list exactly what the code can report (``environments_operator.docs_gen``)."""

from __future__ import annotations

import ast
import importlib
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from environments_operator import docs_gen
from environments_operator.crdgen import render_crds
from environments_operator.devcluster.crd_validation import validate
from environments_operator.domain import dispatch, warm_workers, worker_lifecycle
from environments_operator.domain import environment_sync as sync
from environments_operator.domain.api_failure import ApiFailure
from environments_operator.domain.environment import EnvironmentSpec
from environments_operator.domain.workerpool import WorkerPoolSpec

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = ROOT / "operator" / "environments_operator" / "handlers"
ENVIRONMENT, WORKER_POOL = "Environment", "WorkerPool"
PAGES = [str(page) for page in docs_gen.PAGES]
REGENERATE = "run: python -m environments_operator.docs_gen"


# ----- up to date --------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_generated_blocks_are_up_to_date(page: str) -> None:
    expected = docs_gen.fill((ROOT / page).read_text(encoding="utf-8"), docs_gen.blocks_of(Path(page), ROOT), page)
    assert (ROOT / page).read_text(encoding="utf-8") == expected, f"{page} is stale; {REGENERATE}"


def _copy_of_the_pages(tmp_path: Path) -> Path:
    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    for name in ("values.yaml", "values.schema.json"):
        shutil.copy(ROOT / docs_gen.CHART_DIR / name, tmp_path / docs_gen.CHART_DIR / name)
    assert docs_gen.main(["--root", str(tmp_path)]) == 0  # up to date, whatever the real pages are
    return tmp_path


def test_the_documented_command_checks_the_checkout() -> None:
    result = subprocess.run([sys.executable, "-m", "environments_operator.docs_gen", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")


def test_a_changed_description_makes_its_page_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_of_the_pages(tmp_path)
    original = docs_gen._crd_schema

    def edited(kind: str) -> dict[str, Any]:
        schema = original(kind)
        if kind == WORKER_POOL:
            schema["properties"]["spec"]["properties"]["maxWorkers"]["description"] = "Edited in the model."
        return schema

    monkeypatch.setattr(docs_gen, "_crd_schema", edited)
    assert docs_gen.stale_pages(root) == [Path("docs/workerpool.md")]
    assert docs_gen.main(["--check", "--root", str(root)]) == 1
    assert "stale: docs/workerpool.md" in capsys.readouterr().err
    assert docs_gen.main(["--root", str(root)]) == 0  # rewrites it
    assert "| `spec.maxWorkers` | integer | `10` | 1..10000 | Edited in the model. |" in (
        root / "docs/workerpool.md").read_text()
    assert docs_gen.main(["--check", "--root", str(root)]) == 0


def test_a_changed_values_comment_makes_the_chart_readme_stale(tmp_path: Path) -> None:
    root = _copy_of_the_pages(tmp_path)
    values = root / docs_gen.CHART_DIR / "values.yaml"
    values.write_text(values.read_text().replace("# -- Image pull policy.", "# -- How images are pulled."))
    assert docs_gen.stale_pages(root) == [docs_gen.CHART_DIR / "README.md"]


def test_hand_written_prose_survives_regeneration(tmp_path: Path) -> None:
    root = _copy_of_the_pages(tmp_path)
    page = root / "docs/environment.md"
    text = page.read_text()
    emptied = re.sub(r"(<!-- generated:spec-fields -->\n).*?(<!-- end generated -->)", r"\1\2", text, flags=re.S)
    page.write_text(emptied.replace("# Environment\n", "# Environment\n\nA new paragraph.\n"))
    assert docs_gen.main(["--root", str(root)]) == 0
    assert page.read_text() == text.replace("# Environment\n", "# Environment\n\nA new paragraph.\n")


@pytest.mark.parametrize(("text", "message"), [
    ("<!-- generated:spec-fields -->\n", "has no"),
    ("<!-- generated:nonsense -->\n<!-- end generated -->\n", "unknown generated block"),
    ("no blocks at all\n", "missing"),
])
def test_a_broken_page_is_refused(text: str, message: str) -> None:
    with pytest.raises(docs_gen.PageError, match=message):
        docs_gen.fill(text, {"spec-fields": "x\n"}, "page.md")


# ----- the values table -------------------------------------------------------------------------


def test_values_table_takes_each_comment_and_its_continuation() -> None:
    text = (
        "# A section comment, not documentation.\n"
        "image:\n"
        "  # -- The repository.\n"
        "  # Second line.\n"
        "  repository: example\n"
        "\n"
        "# -- Resources, documented as one value.\n"
        "resources:\n"
        "  limits:\n"
        "    memory: 1Gi\n"
        "# -- A list.\n"
        "items:\n"
        "  - a\n"
    )
    assert docs_gen.documented_values(text) == [
        ("image.repository", "The repository. Second line."),
        ("resources", "Resources, documented as one value."),
        ("items", "A list."),
    ]
    table = docs_gen.values_table(text)
    assert '| `resources` | object | `{"limits": {"memory": "1Gi"}}` | Resources, documented as one value. |' in table


def test_a_value_without_a_comment_is_refused() -> None:
    text = "image:\n  # -- The repository.\n  repository: example\n  tag: latest\nverbose: false\n"
    with pytest.raises(docs_gen.UndocumentedValues, match=r"image\.tag, verbose"):
        docs_gen.documented_values(text)


def test_every_chart_value_is_in_the_table() -> None:
    values = yaml.safe_load((ROOT / docs_gen.CHART_DIR / "values.yaml").read_text())
    documented = {path for path, _ in docs_gen.documented_values(
        (ROOT / docs_gen.CHART_DIR / "values.yaml").read_text())}

    def leaves(tree: Any, prefix: str = "") -> set[str]:
        if prefix in documented:
            return {prefix}
        assert isinstance(tree, dict), f"{prefix} is neither documented nor a mapping of documented values"
        return set().union(*(leaves(value, f"{prefix}.{key}" if prefix else key) for key, value in tree.items()))

    assert leaves(values) == documented


# ----- the examples on the pages ----------------------------------------------------------------


CRDS = {crd["spec"]["names"]["kind"]: crd for crd in (yaml.safe_load(text) for text in render_crds().values())}
MODELS = {ENVIRONMENT: EnvironmentSpec, WORKER_POOL: WorkerPoolSpec}


def _page_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for page in ("docs/environment.md", "docs/workerpool.md"):
        for block in re.findall(r"```yaml\n(.*?)```", (ROOT / page).read_text(), flags=re.S):
            obj = yaml.safe_load(block)
            if str(obj.get("apiVersion", "")).startswith("managedagents.dev/"):
                found.append((f"{page}:{obj['metadata']['name']}", obj))
    return found


@pytest.mark.parametrize(("where", "obj"), _page_manifests(), ids=[where for where, _ in _page_manifests()])
def test_the_pages_examples_are_valid(where: str, obj: dict[str, Any]) -> None:
    assert validate(CRDS[obj["kind"]], obj) == []
    MODELS[obj["kind"]].model_validate(obj["spec"])


def test_each_page_has_examples() -> None:
    assert {obj["kind"] for _, obj in _page_manifests()} == {ENVIRONMENT, WORKER_POOL}


# ----- conditions and reasons: what the code can report is on the page, and only that ----------


def _camel_to_snake(value: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", value).upper()


def _reason_constants(*modules: Any) -> set[str]:
    """Module constants named after their CamelCase value (``INVALID_SPEC = "InvalidSpec"``): the
    domain's spelling of condition types and reasons."""
    return {value for module in modules for name, value in vars(module).items()
            if isinstance(value, str) and re.fullmatch(r"[A-Z][A-Za-z]+", value) and _camel_to_snake(value) == name}


@pytest.mark.parametrize(("kind", "modules"), [
    (ENVIRONMENT, (sync,)), (WORKER_POOL, (dispatch, worker_lifecycle, warm_workers)),
], ids=[ENVIRONMENT, WORKER_POOL])
def test_every_reason_constant_of_the_domain_is_documented(kind: str, modules: tuple[Any, ...]) -> None:
    constants = _reason_constants(*modules)
    assert constants, "the naming convention found no constants"
    assert constants - docs_gen.documented_names(kind) == set(), f"document them in docs_gen's tables of {kind}"


def test_no_reason_is_documented_that_the_domain_does_not_name() -> None:
    for kind, modules in ((ENVIRONMENT, (sync,)), (WORKER_POOL, (dispatch, worker_lifecycle, warm_workers))):
        generated = {row.reason for row in docs_gen.CONDITIONS[kind]
                     if row.conditions == dispatch.CONDITION_DISPATCH_FAILING}
        types = set(docs_gen.condition_types(kind))  # named by constants too, e.g. dispatch.CONDITION_READY
        assert docs_gen.documented_names(kind) - _reason_constants(*modules) - generated - types == set(), kind


def _documented(kind: str, condition: str, status: str) -> set[str]:
    return {row.reason for row in docs_gen.CONDITIONS[kind]
            if row.status == status and condition in re.split(r"[,;] | ", row.conditions)}


_STATUSES = [None, 400, 401, 403, 404, 408, 409, 410, 413, 422, 429, 500, 502, 503]


def test_environment_reasons_the_domain_produces_are_documented() -> None:
    for flags in itertools.product([False, True], repeat=5):
        adopting, created, recovered, recreating, check = flags
        for fields in ((), ("description",)):
            report = sync.success_report("env_1", fields, "check" if check else "spec", previous_id="env_0",
                                         adopting=adopting, created=created, recovered=recovered,
                                         recreating=recreating)
            assert report.reason in _documented(ENVIRONMENT, sync.READY, "True")
            assert report.reason in _documented(ENVIRONMENT, sync.SYNCED, "True")
            for change in report.drift:
                assert change.reason in _documented(ENVIRONMENT, change.type, change.status)
    for status in _STATUSES:
        decision = sync.decide_failure(ApiFailure(status, "refused"), retry=0, action="create environment")
        for change in sync.failed_conditions(decision.reason, "", ready=False):
            assert change.reason in _documented(ENVIRONMENT, change.type, change.status), (status, change)
    for change in sync.drift_conditions(()):
        assert change.reason in _documented(ENVIRONMENT, change.type, change.status)


def test_workerpool_reasons_the_domain_produces_are_documented() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    blockers: list[dispatch.Blocker | None] = [None]
    for failures, retryable, rejected in itertools.product([1, 5], [False, True], [False, True]):
        blockers.append(dispatch.after_failed_poll(failures=failures, status=500, retryable=retryable,
                                                   credential_rejected=rejected, retry_after=None, api_message="",
                                                   error="").blocker)
    failures = [None, *(dispatch.dispatch_failure(kind, status, "", "", "w")
                        for kind in ("Pod", "Secret") for status in (403, 409, 422, 500))]
    for blocker, failure, active in itertools.product(blockers, failures, [0, 5]):
        for condition in dispatch.pool_conditions(None, blocker=blocker, environment_id="env_1", max_workers=5,
                                                  active=active, depth=1, dispatch_failure=failure, generation=1,
                                                  now=now):
            assert condition["reason"] in _documented(WORKER_POOL, condition["type"], condition["status"]), condition


# ----- Events: what the handlers post is on the page, and only that -----------------------------


# Methods of the handlers that post an Event: name -> (index of the type argument, or the fixed type;
# index of the reason argument).
EVENT_POSTERS: dict[str, tuple[int | str, int]] = {
    "event": (0, 1),
    "report_terminal": ("Warning", 0),
    "_report": ("Warning", 1),
    "_report_and_owe_stop": ("Warning", 1),
    "_warn": ("Warning", 0),
}


def _posted_in(path: Path, namespace: dict[str, Any]) -> set[tuple[str, str]]:
    """(type, reason) of each Event one handler module posts with a reason constant (resolved in
    ``namespace``, the module's globals); a string literal as a reason fails: it belongs in the domain,
    where the docs can see it."""
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in EVENT_POSTERS) or any(isinstance(a, ast.Starred) for a in node.args):
            continue
        if ast.unparse(node.func.value) == "kopf.on":  # @kopf.on.event(...) registers a handler
            continue
        type_at, reason_at = EVENT_POSTERS[node.func.attr]
        if len(node.args) <= reason_at:
            continue
        reason = node.args[reason_at]
        assert not (isinstance(reason, ast.Constant) and isinstance(reason.value, str)), (
            f"{path.name}:{node.lineno}: Event reason {reason.value!r} is a literal; make it a domain constant")
        if isinstance(type_at, str):
            event_type = type_at
        else:
            type_node = node.args[type_at]
            assert isinstance(type_node, ast.Constant), f"{path.name}:{node.lineno}: Event type is not a literal"
            event_type = type_node.value
        for part in ast.walk(reason):
            name = part.attr if isinstance(part, ast.Attribute) else part.id if isinstance(part, ast.Name) else ""
            if re.fullmatch(r"[A-Z][A-Z_]+", name):
                found.add((event_type, eval(compile(ast.Expression(part), str(path), "eval"), namespace)))
    return found


def _posted_events(package: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in sorted((HANDLERS / package).glob("*.py")):
        name = f"environments_operator.handlers.{package}" + ("" if path.stem == "__init__" else f".{path.stem}")
        found |= _posted_in(path, vars(importlib.import_module(name)))
    return found


def _documented_events(kind: str) -> set[tuple[str, str]]:
    return {(event.type, event.reason) for event in docs_gen.EVENTS[kind]}


def test_environment_events_are_exactly_the_documented_ones() -> None:
    posted = _posted_events("environment")
    # Events whose reason the domain decides: the success reports, API failures, adoption problems.
    for flags in itertools.product([False, True], repeat=5):
        adopting, created, recovered, recreating, check = flags
        for fields in ((), ("description",)):
            event = sync.success_report("env_1", fields, "check" if check else "spec", previous_id="env_0",
                                        adopting=adopting, created=created, recovered=recovered,
                                        recreating=recreating).event
            if event is not None:
                posted.add(event[:2])
    for status in _STATUSES:
        posted.add(("Warning", sync.decide_failure(ApiFailure(status, "x"), retry=0, action="a").reason))
    spec = EnvironmentSpec.model_validate({"config": {"type": "cloud"}})
    remote = sync.RemoteEnvironment.from_api({"id": "env_1", "config": {"type": "self_hosted"}})
    problem = sync.adoption_problem(spec, remote)
    assert problem is not None
    posted.add(("Warning", problem[0]))
    assert posted == _documented_events(ENVIRONMENT)


def test_workerpool_events_are_exactly_the_documented_ones() -> None:
    posted = _posted_events("workerpool")
    # Events on changes of Ready (``dispatch.ready_event``, posted by the loop with ``ctx.event(*event)``),
    # for every Ready reason that reaches the status through ``pool_conditions``: all but Deleting,
    # which the deletion handler writes last.
    ready = _documented(WORKER_POOL, dispatch.CONDITION_READY, "False") - {dispatch.DELETING}
    serving = [{"type": dispatch.CONDITION_READY, "status": "True", "reason": dispatch.SERVING, "message": ""}]
    for reason in ready:
        blocked = [{"type": dispatch.CONDITION_READY, "status": "False", "reason": reason, "message": ""}]
        for previous, current in ((None, blocked), (serving, blocked), (blocked, serving)):
            event = dispatch.ready_event(previous, current)
            assert event is not None
            posted.add(event[:2])
        assert dispatch.ready_event(blocked, blocked) is None
    assert posted == _documented_events(WORKER_POOL)


def test_a_literal_event_reason_is_caught(tmp_path: Path) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text('def f(ctx):\n    ctx.event("Warning", "SomethingNew", "message")\n')
    with pytest.raises(AssertionError, match="SomethingNew"):
        _posted_in(handler, {})
    handler.write_text('def f(ctx):\n    ctx.event("Warning", sync.INVALID_SPEC if ctx else sync.REJECTED, "m")\n')
    assert _posted_in(handler, {"sync": sync}) == {("Warning", "InvalidSpec"), ("Warning", "Rejected")}
