"""The operator's metrics: named by Prometheus' conventions, each listed in the README, and the parts
that feed them (the API call counters, the session start clock, the Environments tally)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from prometheus_client import REGISTRY

import environments_operator
from environments_operator import metrics
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.handlers.environment.runtime import ReadyTally
from environments_operator.handlers.workerpool import session_start
from environments_operator.handlers.workerpool.session_start import SessionStartClock
from tests.chart.monitoring import exposed_name, operator_metrics

ROOT = Path(__file__).resolve().parents[2]
# Label names that would invite a credential or a per-item value into a series.
FORBIDDEN_LABELS = re.compile(r"secret|key|token|session|work_id|uid", re.IGNORECASE)


def readme_metrics() -> dict[str, str]:
    """Name -> labels cell of the README's Metrics table."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("**Metrics** (port", 1)[1].split("\n\n", 2)[1]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {re.match(r"\| `(\w+)`", row[0])[1]: row[2] for row in rows}  # type: ignore[index]


def test_every_metric_follows_prometheus_conventions() -> None:
    for family, metric in operator_metrics().items():
        (described,) = metric.describe()
        assert family.startswith("environments_operator_"), family
        assert re.fullmatch(r"[a-z][a-z0-9_]*", family), family
        assert not family.endswith("_total"), family  # the client adds it to a counter's samples
        if described.type == "histogram":
            assert family.endswith("_seconds"), family  # base units
        if described.type == "gauge":
            assert not re.search(r"_(total|count|sum|bucket)$", family), family
        for label in metric._labelnames:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label) and not FORBIDDEN_LABELS.search(label), (family, label)
        assert described.documentation, family


def test_the_readme_lists_every_metric_with_its_labels() -> None:
    listed = readme_metrics()
    assert set(listed) == {exposed_name(family) for family in operator_metrics()}
    for family, metric in operator_metrics().items():
        cell = listed[exposed_name(family)]
        documented = set(re.findall(r"`(\w+)`", cell))
        assert set(metric._labelnames) <= documented, (family, cell)
        (described,) = metric.describe()
        assert f"| {described.type} |" in next(line for line in (ROOT / "README.md").read_text().splitlines()
                                                if line.startswith(f"| `{exposed_name(family)}` |")), family


def test_build_info_names_the_version_and_python() -> None:
    assert REGISTRY.get_sample_value("environments_operator_build_info", {
        "version": environments_operator.__version__, "python_version": platform.python_version()}) == 1.0


def test_api_calls_are_counted_by_route_and_status_class() -> None:
    def requests(status_class: str) -> float:
        return REGISTRY.get_sample_value("environments_operator_api_requests_total",
                                         {"route": "unit.test", "status_class": status_class}) or 0.0

    def errors(status: str) -> float:
        return REGISTRY.get_sample_value("environments_operator_api_errors_total",
                                         {"route": "unit.test", "status": status}) or 0.0

    before = {c: requests(c) for c in ("2xx", "4xx", "5xx", "none")}
    errors_before = {s: errors(s) for s in ("404", "503", "0")}
    metrics.count_api_success("unit.test")
    metrics.count_api_failure("unit.test", 404)
    metrics.count_api_failure("unit.test", 503)
    metrics.count_api_failure("unit.test", 0)
    assert {c: requests(c) - before[c] for c in before} == {"2xx": 1, "4xx": 1, "5xx": 1, "none": 1}
    assert {s: errors(s) - errors_before[s] for s in errors_before} == {"404": 1, "503": 1, "0": 1}


def view(work_id: str, phase: str, *, pool: str = "clock", deleting: bool = False) -> WorkerPodView:
    return WorkerPodView(name=f"work-{work_id}", namespace="unit", pool=pool, work_id=work_id, phase=phase,
                         deleting=deleting)


def session_starts(pool: str = "clock") -> float:
    return REGISTRY.get_sample_value("environments_operator_session_start_seconds_count",
                                     {"namespace": "unit", "pool": pool}) or 0.0


async def test_the_session_start_clock_observes_each_claimed_pods_first_running_once() -> None:
    import asyncio

    clock, loop = SessionStartClock(), asyncio.get_running_loop()
    before = session_starts()
    clock.claimed("unit", "clock", "w1", loop.time() - 2.0)
    clock.claimed("unit", "clock", "w2", loop.time())
    clock.claimed("unit", "clock", "w3", loop.time())
    clock.saw(view("w1", "Pending"))
    assert session_starts() == before and len(clock) == 3
    clock.saw(view("w1", "Running"))
    clock.saw(view("w1", "Running"))  # a later change of a running pod
    clock.saw(view("unclaimed", "Running"))  # claimed by another process, or before a restart
    assert session_starts() == before + 1
    assert (REGISTRY.get_sample_value("environments_operator_session_start_seconds_sum",
                                      {"namespace": "unit", "pool": "clock"}) or 0.0) >= 2.0
    clock.saw(view("w2", "Failed"))  # ended before it was seen running: not a session start
    clock.saw(view("w3", "Pending", deleting=True))
    assert session_starts() == before + 1 and len(clock) == 0


async def test_the_session_start_clock_forgets_old_claims_and_deleted_pools(monkeypatch) -> None:
    import asyncio

    clock, now = SessionStartClock(), asyncio.get_running_loop().time()
    clock.claimed("unit", "old", "w1", now - session_start.FORGET_AFTER_SECONDS - 1)
    clock.claimed("unit", "kept", "w2", now)
    assert len(clock) == 1
    clock.claimed("unit", "gone", "w3", now)
    clock.forget_pool("unit", "gone")
    assert len(clock) == 1
    monkeypatch.setattr(session_start, "MAX_CLAIMS", 2)
    for index in range(5):
        clock.claimed("unit", "many", f"m{index}", now)
    assert len(clock) == 2


def environments(ready: str, reason: str, namespace: str = "unit-tally") -> float | None:
    return REGISTRY.get_sample_value("environments_operator_environments",
                                     {"namespace": namespace, "ready": ready, "reason": reason})


def ready(status: str, reason: str) -> dict:
    return {"conditions": [{"type": "Ready", "status": status, "reason": reason}]}


def test_the_ready_tally_counts_environments_by_their_ready_condition() -> None:
    tally = ReadyTally()
    tally.saw("u1", "unit-tally", {})
    assert environments("Unknown", "Unknown") == 1
    tally.saw("u1", "unit-tally", ready("True", "Created"))
    tally.saw("u2", "unit-tally", ready("True", "Created"))
    tally.saw("u3", "unit-tally", ready("False", "InvalidSpec"))
    assert environments("Unknown", "Unknown") is None  # a reason nobody has leaves no series behind
    assert environments("True", "Created") == 2 and environments("False", "InvalidSpec") == 1
    tally.saw("u2", "unit-tally", ready("True", "Created"))  # an event that changed nothing counted
    tally.gone("u2")
    tally.gone("never-seen")
    assert environments("True", "Created") == 1
    tally.clear()
    assert environments("True", "Created") is None and environments("False", "InvalidSpec") is None
