"""The operator's metrics and the parts that feed them: the API call counters, build_info."""

from __future__ import annotations

import platform

from prometheus_client import REGISTRY

import environments_operator
from environments_operator import metrics


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
