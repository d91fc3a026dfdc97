"""The shipped Grafana dashboard charts only metrics that rayrag defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray.util.metrics import Histogram, Metric

from cluster import metrics as index_metrics
from services.serving import metrics as app_metrics

DASHBOARD = Path(__file__).parents[3] / "examples" / "grafana_dashboard.json"


def _exported_names() -> set[str]:
    """Prometheus names: Ray prefixes `ray_`; a histogram is read through its `_bucket` series."""
    modules = (index_metrics, app_metrics)
    defined = [m for module in modules for m in vars(module).values() if isinstance(m, Metric)]
    return {f"ray_{m._name}" + ("_bucket" if isinstance(m, Histogram) else "") for m in defined}


def test_the_dashboard_queries_defined_metrics():
    queries = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    used = {name for query in queries for name in re.findall(r"ray_rayrag_\w+", query)}
    assert len(used) >= 8 and used <= _exported_names(), used - _exported_names()
