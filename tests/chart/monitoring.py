"""The operator's metrics as the tests read them: each family the ``metrics`` module defines, and the
names its samples are exposed under."""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from environments_operator import metrics

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
