"""The Prometheus alert rules and the Grafana dashboard under ``deploy/``: they parse,
every rule carries what an on-call needs, and every metric they name is one Laneway
really exports (taken from the registries of fresh metrics objects, not a list)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from ruamel.yaml import YAML

from laneway.broker.server.metrics import BrokerMetrics
from laneway.broker.webhooks.metrics import WebhookMetrics
from laneway.workers.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "laneway.json"

# Sample names each family type exposes, from the family's name.
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}  # fmt: skip


def exported_names() -> set[str]:
    names: set[str] = set()
    registries: list[CollectorRegistry] = [
        WorkerMetrics().registry,
        BrokerMetrics().registry,
        WebhookMetrics().registry,
    ]
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions,
    keywords, label names (matchers, ``by (...)`` lists) or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    text = re.sub(r"\$\{?\w+\}?", "", text)  # $__rate_interval, ${route}
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        after = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or after.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word) or text[match.start() - 1 : match.start()].isdigit():
            continue  # a duration (offset 1h) or a number's exponent
        names.add(word)
    return names


def load_rules() -> list[dict[str, Any]]:
    doc = YAML(typ="safe").load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", text)
            assert found, f"unexpected variable query {text!r}"
            exprs.append(found.group(1))
    return exprs


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.5, sum by (route, le) (rate(laneway_job_wait_seconds_bucket{route=~"$route",'
        ' gen_ai_token_type="in"}[$__rate_interval] offset 1h))) > 1.5e3 and on (route) laneway_queue_depth'
    )
    assert metric_names(expr) == {"laneway_job_wait_seconds_bucket", "laneway_queue_depth"}


def test_alert_rules_are_complete_and_use_real_metrics() -> None:
    known = exported_names()
    rules = load_rules()
    assert len(rules) >= 7
    for rule in rules:
        name = rule.get("alert")
        assert name, f"not an alerting rule: {rule}"
        for key in ("expr", "for", "labels", "annotations"):
            assert key in rule, f"{name}: no {key}"
        assert rule["labels"].get("severity") in ("info", "warning", "critical"), name
        for key in ("summary", "description", "runbook"):
            assert str(rule["annotations"].get(key, "")).strip(), f"{name}: no {key} annotation"
        assert "\n" not in rule["annotations"]["runbook"].strip(), f"{name}: runbook is one line"
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{name} reads metrics Laneway does not export: {sorted(unknown)}"
    # What the rules must cover, by the metric they watch.
    watched = {n for rule in rules for n in metric_names(rule["expr"])}
    for metric in (
        "laneway_queue_depth",
        "laneway_queue_oldest_job_age_seconds",
        "laneway_job_processing_seconds_bucket",
        "laneway_jobs_finished_total",
        "laneway_dead_lettered_total",
        "laneway_provider_circuit_state",
        "laneway_provider_limiter_budget",
        "laneway_provider_limiter_rate_rpm",
        "laneway_webhook_backlog",
    ):
        assert metric in watched, f"no alert watches {metric}"


def test_dashboard_uses_real_metrics_and_covers_every_area() -> None:
    known = exported_names()
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert any(i["name"] == "DS_PROMETHEUS" for i in dashboard["__inputs"])
    exprs = dashboard_exprs(dashboard)
    for expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"dashboard expression reads unknown metrics {sorted(unknown)}: {expr}"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert rows == {"Lanes", "Providers", "Limiter and circuit", "Dead letters"}
    shown = {n for e in exprs for n in metric_names(e)}
    areas = {
        "lanes": ["laneway_queue_depth", "laneway_queue_oldest_job_age_seconds"],
        "lane times": [
            "laneway_job_wait_seconds_bucket",
            "laneway_job_processing_seconds_bucket",
            "laneway_job_end_to_end_seconds_bucket",
        ],
        "providers": [
            "laneway_provider_calls_total",
            "laneway_provider_errors_total",
            "laneway_provider_rate_limited_total",
            "gen_ai_client_operation_duration_seconds_bucket",
            "gen_ai_client_operation_time_to_first_chunk_seconds_bucket",
            "gen_ai_client_token_usage_sum",
            "laneway_provider_cost_total",
        ],
        "limiter": ["laneway_provider_limiter_rate_rpm", "laneway_provider_limiter_budget"],
        "circuit": ["laneway_provider_circuit_state"],
        "dead letters": ["laneway_dead_letters", "laneway_dead_lettered_total"],
    }
    for area, metrics in areas.items():
        missing = [m for m in metrics if m not in shown]
        assert not missing, f"dashboard has no {area} panel for {missing}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_promtool_checks_rules_and_dashboard_queries(tmp_path: Path) -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Synthetic series that must fire (or not) the rules.
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yaml"], cwd=ALERTS.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Dashboard queries, with Grafana's variables filled in, as recording rules: promtool
    # parses every expression.
    exprs = [
        e.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$route", ".*")
        for e in dashboard_exprs(load_dashboard())
    ]
    exprs = [e.replace("$provider", ".*") for e in exprs]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
