"""Metrics, dashboard and alerts: the README table, the shipped files, a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.prometheus import (
    JOB,
    PROMETHEUS_DIR,
    ROOT,
    PrometheusServer,
    promtool,
    scraping,
    shipped_config,
)

DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "isales-gateway.json"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/{}"
GRAFANA_VARIABLES = {
    "${instance}": ".*",
    "$instance": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1m",
}
_METRIC = re.compile(r"\b(isales_gateway_[a-z0-9_]+)(\{[^}]*\})?")
_ROW = re.compile(r"^\| `(isales_gateway_\w+)` \| (\w+) \|\s*(.*?)\s*\| (.+) \|$")
_LABEL = re.compile(r"`(\w+)`(?:\s*\(([^)]*)\))?")
_VALUES = re.compile(r"^`[^`]+`(?:, `[^`]+`)*$")


# --- the README's metric table ----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    labels: frozenset[str]
    values: dict[str, frozenset[str]]  # only for the labels whose values the table lists


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def metrics_table() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for line in readme_section("Metrics").splitlines():
        match = _ROW.match(line)
        if not match:
            continue
        name, kind, label_cell, _ = match.groups()
        labels: set[str] = set()
        values: dict[str, frozenset[str]] = {}
        for label, listed in _LABEL.findall(label_cell):
            labels.add(label)
            if _VALUES.match(listed):
                values[label] = frozenset(re.findall(r"`([^`]+)`", listed))
        rows[name] = Row(name, kind, frozenset(labels), values)
    assert rows, "README ## Metrics has no table rows"
    return rows


def exposed_name(family: Metric) -> str:
    """The name a query uses: counters with ``_total``, like the README table."""
    return family.name + "_total" if family.type == "counter" else family.name


def created_companion(family: Metric, table: dict[str, Row]) -> bool:
    """prometheus_client's ``<name>_created`` gauge next to a counter or a histogram."""
    if family.type != "gauge" or not family.name.endswith("_created"):
        return False
    base = family.name.removesuffix("_created")
    histogram = base in table and table[base].type == "histogram"
    return histogram or base + "_total" in table


def gateway_families(text: str) -> list[Metric]:
    return [
        family
        for family in text_string_to_metric_families(text)
        if family.name.startswith("isales_gateway_")
    ]


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in gateway_families(text)
        for sample in family.samples
    }


async def fresh_metrics(start_gateway: StartGateway, upstream: Upstream) -> str:
    gateway = await start_gateway(gateway_settings(upstream.url))
    response = await gateway.get("/metrics")
    assert response.status == 200
    return await response.text()


async def test_every_metric_in_the_readme_table_is_on_a_fresh_gateway_with_its_type_and_labels(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    table = metrics_table()
    exposed = {
        exposed_name(f): f for f in gateway_families(await fresh_metrics(start_gateway, upstream))
    }

    missing = sorted(set(table) - set(exposed))
    assert not missing, f"in the README table but not on /metrics: {missing}"
    for name, row in table.items():
        family = exposed[name]
        assert family.type == row.type, f"{name}: README says {row.type}, /metrics {family.type}"
        assert family.samples, f"{name} has no series at start-up"
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert labels == row.labels, (
            f"{name}: README labels {sorted(row.labels)}, /metrics {sorted(labels)}"
        )
        for label, listed in row.values.items():
            seen = {s.labels[label] for s in family.samples}
            assert seen == listed, (
                f"{name}{{{label}}}: README lists {sorted(listed)}, /metrics has {sorted(seen)}"
            )


async def test_every_gateway_metric_on_a_fresh_gateway_is_in_the_readme_table(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    table = metrics_table()
    families = gateway_families(await fresh_metrics(start_gateway, upstream))

    undocumented = sorted(
        exposed_name(f)
        for f in families
        if exposed_name(f) not in table and not created_companion(f, table)
    )
    assert not undocumented, f"on /metrics but not in the README table: {undocumented}"


async def test_traffic_creates_no_series_beyond_those_present_at_start_up(
    start_gateway: StartGateway, start_simulator: StartSimulator
) -> None:
    """Labels are bounded: ids, campaigns and request details never become label values."""
    upstream = await start_simulator()
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__retries=0))
    before = series(await (await gateway.get("/metrics")).text())

    for campaign in (1, 2, 3, 1, 2, 5000):  # misses, hits, a campaign that does not exist
        await gateway.post(
            PATH.format(campaign), json={"pageSize": 5}, headers={"X-Request-ID": f"r{campaign}"}
        )
    await asyncio.gather(*(gateway.post(PATH.format(7), json={}) for _ in range(3)))
    await gateway.post(PATH.format(1), json={"beginTime": "2026-01-01"})  # a parameter error
    await gateway.post(PATH.format(1), json={}, headers={"Cache-Control": "no-cache"})
    await gateway.get(PATH.format(1))  # 405
    await gateway.post(PATH.format(1), data=b"{}", headers={"Content-Type": "text/plain"})  # 415
    await gateway.get("/no/such/route/12345")  # 404
    await gateway.delete("/admin/cache/campaigns/11/1")  # no admin key
    await gateway.get("/healthz")
    await gateway.get("/readyz")
    async with (
        ClientSession() as session,
        session.post(upstream.url + "/__sim/behaviour", json={"error_rate": 1.0}) as changed,
    ):
        assert changed.status == 200
    failed = await gateway.post(PATH.format(9), json={})
    assert failed.status == 502
    after = series(await (await gateway.get("/metrics")).text())

    assert after - before == set(), "traffic created series that were not there at start-up"
    assert before - after == set()


# --- the Grafana dashboard ----------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row carries its panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def concrete(expr: str) -> str:
    """``expr`` as Grafana sends it with "All" instances selected."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def family_of(metric: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", metric)


def test_the_dashboard_picks_its_datasource_and_instances_by_template_variables() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}

    assert board["uid"] == "isales-gateway"
    assert board["schemaVersion"] >= 36
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["query"]["query"] == "label_values(isales_gateway_build_info, instance)"
    assert instance["multi"] is True
    assert instance["includeAll"] is True
    assert instance["datasource"]["uid"] == "${datasource}"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for owner in (panel, *panel["targets"]):
            assert owner["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel[
                "title"
            ]


def test_every_dashboard_query_filters_by_the_selected_instances() -> None:
    for title, expr in dashboard_queries():
        selectors = _METRIC.findall(expr)
        assert selectors, f"{title}: no gateway metric in {expr}"
        for metric, matchers in selectors:
            assert 'instance=~"$instance"' in matchers, f"{title}: {metric} unfiltered in {expr}"


def test_the_dashboard_draws_every_metric_of_the_readme_table() -> None:
    table = {
        name.removesuffix("_total") if row.type == "counter" else name
        for name, row in metrics_table().items()
    }
    used = {
        family_of(m).removesuffix("_total")
        for _, expr in dashboard_queries()
        for m, _ in _METRIC.findall(expr)
    }

    assert table - used == set(), "metrics no panel draws"
    assert used - table == set(), "panels query metrics the gateway does not export"


# --- the alert rules ------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_a_summary_a_runbook_and_a_runbook_line_in_the_readme() -> None:
    section = readme_section("Dashboards and alerts")
    documented = set(re.findall(r"^\| `(IsalesGateway\w+)` \|", section, re.MULTILINE))
    names = [rule["alert"] for rule in alert_rules()]

    for rule in alert_rules():
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["runbook"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
    assert len(names) == len(set(names))
    assert set(names) == documented, "alerts and README runbook lines differ"


def test_promtool_accepts_the_shipped_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_shipped_prometheus_config_with_its_rule_files() -> None:
    assert shipped_config()["rule_files"] == ["alerts.yml"]
    result = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    matchers = ", ".join(
        f'{k}="{v}"' for k, v in {"job": JOB, "instance": "gw-1:8080", **labels}.items()
    )
    return {"series": f"{metric}{{{matchers}}}", "values": values}


def _fires(alert: str, at: str, series: list[dict[str, str]], **labels: str) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels}]}
        ],
    }


def _quiet(alert: str, at: str, series: list[dict[str, str]]) -> dict[str, Any]:
    case = _fires(alert, at, series)
    case["alert_rule_test"][0]["exp_alerts"] = []
    return case


INSTANCE = {"job": JOB, "instance": "gw-1:8080"}
OK = _series("isales_gateway_upstream_requests_total", "0+60x20", outcome="ok", code="0200000")
# What each alert must do: fire on its condition (labels exact), stay quiet without it.
ALERT_CASES = [
    _fires("IsalesGatewayDown", "3m", [_series("up", "1 0 0 0")], severity="critical", **INSTANCE),
    _quiet("IsalesGatewayDown", "3m", [_series("up", "1 1 1 1")]),
    _fires(
        "IsalesGatewayUpstreamErrors",
        "10m",
        [
            OK,
            _series(
                "isales_gateway_upstream_requests_total", "0+30x20", outcome="timeout", code="none"
            ),
        ],
        severity="warning",
    ),
    _quiet(
        "IsalesGatewayUpstreamErrors",
        "10m",
        [
            OK,
            _series(
                "isales_gateway_upstream_requests_total", "0+1x20", outcome="timeout", code="none"
            ),
        ],
    ),
    _fires(
        "IsalesGatewayUpstreamAuthRejected",
        "3m",
        [
            _series(
                "isales_gateway_upstream_requests_total",
                "0 0 1 1",
                outcome="auth_rejected",
                code="none",
            )
        ],
        severity="critical",
    ),
    _fires(
        "IsalesGatewayBudgetSaturated",
        "10m",
        [
            _series(
                "isales_gateway_upstream_requests_total", "0+540x20", outcome="ok", code="0200000"
            ),
            _series("isales_gateway_permits_max", "10x20"),
            _series("isales_gateway_limit_window_seconds", "1.1x20"),
            _series("isales_gateway_permits_in_flight", "3x20"),
        ],
        severity="warning",
    ),
    _quiet(
        "IsalesGatewayBudgetSaturated",
        "10m",
        [
            OK,
            _series("isales_gateway_permits_max", "10x20"),
            _series("isales_gateway_limit_window_seconds", "1.1x20"),
            _series("isales_gateway_permits_in_flight", "3x20"),
        ],
    ),
    _fires(
        "IsalesGatewayQueueWaitHigh",
        "10m",
        [
            _series("isales_gateway_queue_wait_seconds_bucket", "0x20", le="5.0"),
            _series("isales_gateway_queue_wait_seconds_bucket", "0+60x20", le="10.0"),
            _series("isales_gateway_queue_wait_seconds_bucket", "0+60x20", le="+Inf"),
        ],
        severity="warning",
    ),
    _fires(
        "IsalesGatewayRejecting",
        "10m",
        [_series("isales_gateway_rejections_total", "0+5x20", reason="queue_full")],
        severity="warning",
        reason="queue_full",
    ),
    _quiet(
        "IsalesGatewayRejecting",
        "10m",
        [_series("isales_gateway_rejections_total", "0x20", reason="queue_full")],
    ),
    _fires(
        "IsalesGatewayDegraded",
        "5m",
        [_series("isales_gateway_degraded", "1x10", component="redis")],
        severity="warning",
        instance="gw-1:8080",
        component="redis",
    ),
    _fires(
        "IsalesGatewayRedisErrors",
        "10m",
        [_series("isales_gateway_redis_errors_total", "0+60x20", operation="cache_get")],
        severity="warning",
        operation="cache_get",
    ),
    _fires(
        "IsalesGatewayBreakerOpen",
        "5m",
        [_series("isales_gateway_upstream_breaker_state", "2x10")],
        severity="critical",
        instance="gw-1:8080",
    ),
    _quiet(
        "IsalesGatewayBreakerOpen", "5m", [_series("isales_gateway_upstream_breaker_state", "1x10")]
    ),
    _fires(
        "IsalesGatewayServingStale",
        "15m",
        [_series("isales_gateway_stale_served_total", "0+10x20", reason="overload")],
        severity="warning",
        reason="overload",
    ),
    _quiet(
        "IsalesGatewayServingStale",
        "15m",
        [_series("isales_gateway_stale_served_total", "0+10x20", reason="revalidate")],
    ),
]


def test_each_alert_fires_on_its_condition_and_stays_quiet_without_it(tmp_path: Path) -> None:
    """``promtool test rules`` on the shipped expressions (annotations are checked above)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    tested = {case["alert_rule_test"][0]["alertname"] for case in ALERT_CASES}
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": ALERT_CASES}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec))

    assert tested == {rule["alert"] for rule in alert_rules()}, "an alert without a test case"
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping a gateway -----------------------------------------------------


@pytest.fixture
async def prometheus_for() -> Any:
    servers: list[PrometheusServer] = []

    async def start(targets: list[str]) -> PrometheusServer:
        server = PrometheusServer(scraping(targets))
        servers.append(server)
        return await server.launch().ready()

    yield start
    for server in servers:
        server.close()


async def test_a_real_prometheus_answers_every_dashboard_and_alert_query_with_gateway_data(
    start_simulator: StartSimulator, start_gateway: StartGateway, prometheus_for: Any
) -> None:
    upstream = await start_simulator(latency_ms=300)
    # Two upstream permits and no queue: the third distinct miss within 1.1 s gets a 503.
    settings = gateway_settings(upstream.url, limit__max_concurrent=2, limit__max_queue=0)
    gateway = await start_gateway(settings)
    target = f"127.0.0.1:{gateway.server.port}"
    prometheus: PrometheusServer = await prometheus_for([target])
    await prometheus.wait_until(f'sum(up{{job="{JOB}"}})', 1)

    statuses = [(await gateway.post(PATH.format(1), json={"pageSize": 5})).status]  # MISS
    statuses.append((await gateway.post(PATH.format(1), json={"pageSize": 5})).status)  # HIT
    lone_begin = {"beginTime": "2026-01-01"}
    statuses.append((await gateway.post(PATH.format(1), json=lone_begin)).status)  # 0200008
    burst = [asyncio.ensure_future(gateway.post(PATH.format(2), json={})) for _ in range(4)]
    for _ in range(500):  # until the burst's one call holds the second permit
        if upstream.requests == 2:
            break
        await asyncio.sleep(0.01)
    statuses.append((await gateway.post(PATH.format(3), json={})).status)  # no permit, no queue
    statuses += [(await response).status for response in burst]  # MISS + 3 COALESCED
    assert statuses == [200, 200, 200, 503, 200, 200, 200, 200]

    await prometheus.wait_until(
        f'sum(isales_gateway_requests_total{{route="callresult", job="{JOB}"}})', 8
    )
    await prometheus.wait_until(f'min(count_over_time(up{{job="{JOB}"}}[1m]))', 2)

    failures = []
    for title, expr in dashboard_queries():
        body = await prometheus.query(concrete(expr))
        if body["status"] != "success":
            failures.append(f"{title}: {expr}: {body.get('error')}")
        elif not body["data"]["result"]:
            failures.append(f"{title}: no data: {expr}")
    for rule in alert_rules():
        body = await prometheus.query(rule["expr"])
        if body["status"] != "success":
            failures.append(f"alert {rule['alert']}: {body.get('error')}")
    assert not failures, "\n".join(failures)

    by_cache = await panel_values(prometheus, "Traffic by cache result", "cache")
    assert {"HIT", "MISS", "COALESCED", "NONE"} <= {k for k, v in by_cache.items() if v > 0}
    by_reason = await panel_values(prometheus, "Rejections by reason", "reason")
    assert by_reason["queue_full"] > 0
    instances = await prometheus.api(
        "label/instance/values", **{"match[]": "isales_gateway_build_info"}
    )
    assert instances["data"] == [target], "the instance variable's query finds the gateway"
    await rules_evaluated_without_error(prometheus)


async def panel_values(prometheus: PrometheusServer, title: str, label: str) -> dict[str, float]:
    (expr,) = [expr for panel_title, expr in dashboard_queries() if panel_title == title]
    body = await prometheus.query(concrete(expr))
    return {r["metric"][label]: float(r["value"][1]) for r in body["data"]["result"]}


async def rules_evaluated_without_error(prometheus: PrometheusServer) -> None:
    """Prometheus loaded every shipped rule and evaluates each one cleanly."""
    for _ in range(50):
        body = await prometheus.api("rules")
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        await asyncio.sleep(0.2)
    assert sorted(rule["name"] for rule in rules) == sorted(r["alert"] for r in alert_rules())
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not unhealthy
