"""The chart's monitoring (the Grafana dashboard and the PrometheusRule) and the metrics they name.

Shared by the chart tests (structure), the unit tests (the README's Metrics table) and the end-to-end
metrics test (every name the rules and the dashboard use is one the real operator exposed). It only
reads: the dashboard file, the rendered chart and the operator's ``metrics`` module.

PromQL is read by a small extractor, not a parser (no PromQL parser is among the project's
dependencies): strings, label matchers, ranges and grouping clauses are cut out, and what is left of
the identifiers, less those called as functions and PromQL's keywords, are metric names. Grafana's
``label_values(<series selector>, <label>)`` template queries are read as their selector.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from environments_operator import metrics
from tests.chart.rendering import CHART_DIR, JSON, of_kind, render

DASHBOARD_FILE = CHART_DIR / "dashboards" / "environments-operator.json"
MONITORING_VALUES: JSON = {"metrics": {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}}

# Words of PromQL that are not metric names when they stand alone (functions are recognised by their "(").
PROMQL_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "inf", "nan", "atan2", "start", "end",
})
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_GRAFANA_VARIABLES = re.compile(r"\$\{?\w+(?::\w+)?\}?")
_OFFSETS = re.compile(r"\boffset\s+-?\w+")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"\s*label_values\((?:(.*),)?\s*\w+\s*\)\s*", re.DOTALL)


def balanced(expr: str) -> bool:
    """Parentheses, brackets and braces outside strings nest properly (a cheap syntax guard)."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _STRINGS.sub('""', expr):
        if char in "([{":
            stack.append(char)
        elif char in closing:
            if not stack or stack.pop() != closing[char]:
                return False
    return not stack


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _GRAFANA_VARIABLES.sub(" ", text)
    text = _OFFSETS.sub(" ", text)
    return {m[1] for m in _IDENTIFIER.finditer(text) if not m[2] and m[1] not in PROMQL_KEYWORDS}


def grafana_query_names(query: str) -> set[str]:
    """The metric names of a Grafana query: PromQL, or ``label_values([selector,] label)``."""
    found = _LABEL_VALUES.fullmatch(query)
    if found is not None:
        return metric_names(found[1] or "")
    return metric_names(query)


# ----- the dashboard ----------------------------------------------------------------------------------

def load_dashboard(path: Path = DASHBOARD_FILE) -> JSON:
    dashboard: JSON = json.loads(path.read_text())
    return dashboard


def dashboard_panels(dashboard: JSON) -> list[JSON]:
    """Every panel, those inside collapsed rows included."""
    panels: list[JSON] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries(dashboard: JSON) -> dict[str, str]:
    """Where -> query: every panel target's expression and every query variable's query."""
    queries: dict[str, str] = {}
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            queries[f"panel {panel['title']!r} target {target.get('refId')}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries[f"variable {variable['name']}"] = query["query"] if isinstance(query, dict) else query
    return queries


def dashboard_metric_names(dashboard: JSON) -> dict[str, set[str]]:
    return {where: grafana_query_names(query) for where, query in dashboard_queries(dashboard).items()}


# ----- the PrometheusRule -----------------------------------------------------------------------------

def prometheus_rule(values: JSON | None = None) -> JSON:
    (rule,) = of_kind(render(values if values is not None else MONITORING_VALUES), "PrometheusRule")
    return rule


def alerting_rules(rule: JSON) -> list[JSON]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def rule_metric_names(rule: JSON) -> dict[str, set[str]]:
    return {r["alert"]: metric_names(str(r["expr"])) for r in alerting_rules(rule)}


# ----- the operator's metrics -------------------------------------------------------------------------

def operator_metrics() -> dict[str, MetricWrapperBase]:
    """Family name -> metric, for every metric the ``metrics`` module defines."""
    found: dict[str, MetricWrapperBase] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            found[family.name] = value
    return found


def sample_names(family: str, metric: Any) -> set[str]:
    """The names a family's samples are exposed under (a counter's ``_total``, a histogram's ``_bucket``...)."""
    (described,) = metric.describe()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family + suffix for suffix in suffixes[described.type]}


def exposed_name(name: str) -> str:
    """The name a metric is known by in the README and the exposition (a counter with ``_total``)."""
    metric = operator_metrics()[name]
    (described,) = metric.describe()
    return name + "_total" if described.type == "counter" else name
