"""The operator's metrics and the parts that feed them: the API call counters, build_info, the session start
clock."""

from __future__ import annotations

import platform

from prometheus_client import REGISTRY

import environments_operator
from environments_operator import metrics
from environments_operator.domain.dispatch import WorkerPodView
from environments_operator.handlers.workerpool import session_start
from environments_operator.handlers.workerpool.session_start import SessionStartClock


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
