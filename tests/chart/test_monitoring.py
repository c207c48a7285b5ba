"""The chart's Grafana dashboard and PrometheusRule: off by default, shaped as Grafana and the Prometheus
Operator read them, configurable, and naming only the operator's metrics.

That the real operator exposes every name they use is checked end to end in tests/e2e/test_metrics.py;
here, against the metrics the operator defines. Kubernetes validity (the ConfigMap through
kubernetes-validate, the PrometheusRule through its CRD's schema) is the scenario ``monitoring`` of
tests/chart/test_chart.py's ``test_every_rendered_object_is_valid``.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.chart.monitoring import (
    DASHBOARD_FILE,
    MONITORING_VALUES,
    alerting_rules,
    balanced,
    dashboard_metric_names,
    dashboard_panels,
    dashboard_queries,
    grafana_query_names,
    load_dashboard,
    metric_names,
    operator_metrics,
    prometheus_rule,
    rule_metric_names,
    sample_names,
)
from tests.chart.rendering import FULLNAME, JSON, RELEASE_NAMESPACE, of_kind, only, render

ALERTS = {
    "EnvironmentsOperatorDown", "EnvironmentsOperatorDispatchFailing", "EnvironmentsOperatorPoolBacklogGrowing",
    "EnvironmentsOperatorWorkerStartTimeouts", "EnvironmentsOperatorEnvironmentsNotReady",
}


def operator_sample_names() -> set[str]:
    return {name for family, metric in operator_metrics().items() for name in sample_names(family, metric)}


def dashboard_config_map(values: JSON) -> JSON:
    (config_map,) = [o for o in of_kind(render(values), "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    return config_map


def with_monitoring(**overrides: JSON) -> JSON:
    return {"metrics": {key: {"enabled": True, **overrides.get(key, {})}
                        for key in ("grafanaDashboard", "prometheusRule")}}


# ---- the name extractor ------------------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (namespace, pool) (rate(a_total{x="y", z=~"p|q"}[5m] offset 1h)) > 0', {"a_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[$__rate_interval])))", {"b_bucket"}),
    ('(c >= on (pool) group_left (x) max by (pool) (d)) and on (pool) e{k="{not a metric}"} > bool 3',
     {"c", "d", "e"}),
    ("absent(f{job=\"x\"}) or vector(0) unless g:recorded:rate5m * 1e3", {"f", "g:recorded:rate5m"}),
    ("sum without (instance) (h) / ignoring (a) i", {"h", "i"}),
    ("count(j) by (version)", {"j"}),
])
def test_the_extractor_finds_every_metric_name_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
    assert balanced(expr)


def test_grafana_label_values_queries_are_read_as_their_selector() -> None:
    assert grafana_query_names("label_values(m_total, namespace)") == {"m_total"}
    assert grafana_query_names('label_values(m{namespace=~"$namespace"}, pool)') == {"m"}
    assert grafana_query_names("label_values(namespace)") == set()


def test_the_syntax_guard_catches_unbalanced_expressions() -> None:
    assert not balanced("sum(rate(a[5m])")
    assert not balanced('a{b="c"')
    assert balanced('a{b=")"}')


# ---- off by default ----------------------------------------------------------------------------------

def test_dashboard_and_rule_are_off_by_default() -> None:
    objects = render()
    assert of_kind(objects, "PrometheusRule") == []
    assert not [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]


# ---- the dashboard -----------------------------------------------------------------------------------

def test_the_dashboard_configmap_carries_the_sidecars_label_and_the_dashboard_file() -> None:
    config_map = dashboard_config_map(MONITORING_VALUES)
    assert config_map["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert config_map["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(config_map["data"]) == ["environments-operator.json"]
    assert json.loads(config_map["data"]["environments-operator.json"]) == load_dashboard()


def test_the_dashboard_configmap_label_namespace_and_annotations_are_configurable() -> None:
    config_map = dashboard_config_map(with_monitoring(grafanaDashboard={
        "namespace": "grafana", "label": "dashboards.example.com/load", "labelValue": "yes",
        "annotations": {"grafana_folder": "Operators"}}))
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["labels"]["dashboards.example.com/load"] == "yes"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Operators"}


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "environments-operator" and dashboard["title"]
    assert "\t" not in DASHBOARD_FILE.read_text()  # it is indented into a YAML block scalar
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        position = panel["gridPos"]
        assert 0 <= position["x"] and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(target["datasource"] == panel["datasource"] for target in panel["targets"]), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, variable["name"]
    for where, query in dashboard_queries(dashboard).items():
        assert balanced(query), where
        # Only variables the dashboard defines (and Grafana's own $__ ones).
        for used in re.findall(r"\$\{?(\w+)", query):
            assert used.startswith("__") or used in variables, (where, used)


def test_the_dashboard_names_only_the_operators_metrics_and_charts_each_of_them() -> None:
    known = operator_sample_names()
    used = dashboard_metric_names(load_dashboard())
    assert {where: names - known for where, names in used.items() if names - known} == {}
    assert all(used.values()), [where for where, names in used.items() if not names]
    charted = set().union(*used.values())
    uncharted = [family for family, metric in operator_metrics().items()
                 if not sample_names(family, metric) & charted]
    assert uncharted == []


# ---- the PrometheusRule ------------------------------------------------------------------------------

def test_the_rule_has_the_operators_alerts_naming_only_its_metrics() -> None:
    rule = prometheus_rule()
    assert rule["metadata"]["name"] == FULLNAME and rule["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert {r["alert"] for r in alerting_rules(rule)} == ALERTS
    known = operator_sample_names()
    for alert, names in rule_metric_names(rule).items():
        assert names and names <= known, (alert, names - known)
    for alert in alerting_rules(rule):
        assert balanced(alert["expr"]), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning")
        # Prometheus' template syntax survives Helm's: the annotations still say which pool or namespace.
        if alert["alert"] != "EnvironmentsOperatorDown":
            assert "{{ $labels.namespace }}" in alert["annotations"]["summary"], alert["alert"]


def test_operator_down_watches_the_targets_the_servicemonitor_makes() -> None:
    objects = render({"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}})
    (down,) = [r for r in alerting_rules(only(objects, "PrometheusRule")) if r["alert"] == "EnvironmentsOperatorDown"]
    # The Prometheus Operator names a ServiceMonitor's job after the Service it scrapes.
    monitor = only(objects, "ServiceMonitor")
    (service,) = [s for s in of_kind(objects, "Service")
                  if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert down["expr"] == (f'absent(environments_operator_build_info{{job="{service["metadata"]["name"]}",'
                            f'namespace="{RELEASE_NAMESPACE}"}})')
    # The metrics' own namespace label (a pool's, an Environment's) is kept, as the expressions expect.
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_the_rules_thresholds_labels_and_namespace_are_configurable() -> None:
    rule = prometheus_rule(with_monitoring(prometheusRule={
        "namespace": "monitoring", "labels": {"release": "prom"}, "alertLabels": {"team": "platform"},
        "operatorSelector": 'service="custom"', "downMinutes": 2, "dispatchFailingMinutes": 3, "backlogMinutes": 25,
        "startTimeouts": 7, "startTimeoutsWindowMinutes": 45, "notReadyMinutes": 20}))
    assert rule["metadata"]["namespace"] == "monitoring" and rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r for r in alerting_rules(rule)}
    assert all(r["labels"]["team"] == "platform" and r["labels"]["severity"] for r in alerts.values())
    down = alerts["EnvironmentsOperatorDown"]
    assert down["expr"] == 'absent(environments_operator_build_info{service="custom"})' and down["for"] == "2m"
    assert alerts["EnvironmentsOperatorDispatchFailing"]["for"] == "3m"
    backlog = alerts["EnvironmentsOperatorPoolBacklogGrowing"]
    assert "[25m]" in backlog["expr"] and backlog["for"] == "25m"
    timeouts = alerts["EnvironmentsOperatorWorkerStartTimeouts"]
    assert "[45m]" in timeouts["expr"] and timeouts["expr"].endswith(">= 7") and "for" not in timeouts
    assert alerts["EnvironmentsOperatorEnvironmentsNotReady"]["for"] == "20m"
    defaults = {r["alert"]: r for r in alerting_rules(prometheus_rule())}
    assert "[10m]" in defaults["EnvironmentsOperatorPoolBacklogGrowing"]["expr"]
    assert defaults["EnvironmentsOperatorWorkerStartTimeouts"]["expr"].endswith(">= 3")
