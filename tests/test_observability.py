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

from gateway import __version__
from gateway.build import revision
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.processes import RedisServer
from tests.support.prometheus import (
    JOB,
    PROMETHEUS_DIR,
    ROOT,
    PrometheusServer,
    promtool,
    scraping,
    shipped_config,
)
from tests.support.waiting import until

DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "isales-gateway.json"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/{}"
GRAFANA_VARIABLES = {
    "${instance}": ".*",
    "$instance": ".*",
    "$job": ".*",
    "$namespace": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1m",
}
_METRIC = re.compile(r"\b((?:isales_gateway|process)_[a-z0-9_]+)(\{[^}]*\})?")
_SELECTED = 'job=~"$job", namespace=~"$namespace", instance=~"$instance"'
_ROW = re.compile(r"^\| `(isales_gateway_\w+)` \| (\w+) \|\s*(.*?)\s*\| (.+) \|$")
_ALERT_ROW = re.compile(r'^\| <a id="([a-z]+)"></a>`(IsalesGateway\w+)` \|', re.MULTILINE)
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


async def fresh_metrics(start_gateway: StartGateway, upstream: Upstream, **env: str) -> str:
    gateway = await start_gateway(gateway_settings(upstream.url, **env))
    response = await gateway.get("/metrics")
    assert response.status == 200
    return await response.text()


async def busy_metrics(start_gateway: StartGateway, upstream: Upstream, redis_url: str) -> str:
    """/metrics of a gateway in Redis mode after one of each kind of answer."""
    gateway = await start_gateway(
        gateway_settings(upstream.url, redis__url=redis_url, upstream__retries=0)
    )
    for campaign in (1, 2, 1, 5000):  # misses, a hit, a campaign that does not exist
        await gateway.post(PATH.format(campaign), json={"pageSize": 5})
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
    return await (await gateway.get("/metrics")).text()


async def test_every_metric_in_the_readme_table_is_exported_with_its_type_and_labels(
    start_gateway: StartGateway, upstream: Upstream, redis_server: RedisServer
) -> None:
    table = metrics_table()
    text = await busy_metrics(start_gateway, upstream, redis_server.url)
    exposed = {exposed_name(f): f for f in gateway_families(text)}

    missing = sorted(set(table) - set(exposed))
    assert not missing, f"in the README table but not on /metrics: {missing}"
    for name, row in table.items():
        family = exposed[name]
        assert family.type == row.type, f"{name}: README says {row.type}, /metrics {family.type}"
        assert family.samples, f"{name} has no series"
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert labels == row.labels, (
            f"{name}: README labels {sorted(row.labels)}, /metrics {sorted(labels)}"
        )
        for label, listed in row.values.items():
            seen = {s.labels[label] for s in family.samples}
            assert seen <= listed, (
                f"{name}{{{label}}}: /metrics has {sorted(seen - listed)}, not in the README"
            )


async def test_every_gateway_metric_is_in_the_readme_table(
    start_gateway: StartGateway, upstream: Upstream, redis_server: RedisServer
) -> None:
    table = metrics_table()
    families = gateway_families(await busy_metrics(start_gateway, upstream, redis_server.url))

    undocumented = sorted(
        exposed_name(f)
        for f in families
        if exposed_name(f) not in table and not created_companion(f, table)
    )
    assert not undocumented, f"on /metrics but not in the README table: {undocumented}"


async def test_a_fresh_gateway_has_no_series_its_configuration_cannot_produce(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """No ``route="healthz",cache="HIT"``: request series appear with their requests; the
    Redis series only with Redis; the cache series only with a cache."""
    embedded = series(await fresh_metrics(start_gateway, upstream))
    no_cache = series(await fresh_metrics(start_gateway, upstream, cache__enabled="false"))
    names = {name for name, _ in embedded}

    routes = {
        dict(labels).get("route")
        for name, labels in embedded
        if name.startswith(("isales_gateway_requests", "isales_gateway_request_duration"))
    }
    codes = {
        dict(labels).get("code")
        for name, labels in embedded
        if name.startswith("isales_gateway_requests")
    }
    assert routes == {"callresult"}, "other routes' series come with their first request"
    assert "GW40100" not in codes, "no 401 on the route with authentication off"
    assert "isales_gateway_redis_errors_total" not in names
    assert "isales_gateway_degraded" not in names
    assert (
        "isales_gateway_upstream_requests_total",
        (("code", "none"), ("outcome", "ok")),
    ) not in (embedded)
    assert not {n for n, _ in no_cache if n.startswith("isales_gateway_cache_lookups")}
    assert not {n for n, _ in no_cache if n.startswith("isales_gateway_stale_served")}


async def test_the_process_platform_and_gc_collectors_are_exported(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    names = {
        f.name for f in text_string_to_metric_families(await fresh_metrics(start_gateway, upstream))
    }

    assert {"process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"} <= names
    assert {"process_start_time_seconds", "python_info", "python_gc_collections"} <= names


async def test_answers_are_counted_by_a_bounded_gateway_code(
    start_gateway: StartGateway, upstream: Upstream, redis_server: RedisServer
) -> None:
    text = await busy_metrics(start_gateway, upstream, redis_server.url)
    codes = {
        sample.labels["code"]
        for family in gateway_families(text)
        if family.name == "isales_gateway_requests"
        for sample in family.samples
        if sample.name == "isales_gateway_requests_total" and sample.value > 0
    }
    auth = {
        sample.labels["reason"]: sample.value
        for family in gateway_families(text)
        if family.name == "isales_gateway_auth_failures"
        for sample in family.samples
        if sample.name == "isales_gateway_auth_failures_total"
    }

    assert {"none", "parameter", "GW40500", "GW41500", "GW40400", "GW40100", "GW50201"} <= codes
    assert auth["missing_key"] == 1


async def test_build_info_carries_the_version_and_the_git_revision(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    text = await fresh_metrics(start_gateway, upstream)
    (info,) = [f for f in gateway_families(text) if f.name == "isales_gateway_build_info"]
    (sample,) = info.samples

    assert sample.labels["version"] == __version__
    assert sample.labels["revision"] == revision()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", sample.labels["revision"])


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
    expected = {
        "job": "label_values(isales_gateway_build_info, job)",
        "namespace": 'label_values(isales_gateway_build_info{job=~"$job"}, namespace)',
        "instance": 'label_values(isales_gateway_build_info{job=~"$job", '
        'namespace=~"$namespace"}, instance)',
    }
    for name, query in expected.items():
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["query"]["query"] == query
        assert variable["multi"] is True
        assert variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["datasource"]["uid"] == "${datasource}"
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


def test_every_dashboard_query_filters_by_the_selected_job_namespace_and_instances() -> None:
    for title, expr in dashboard_queries():
        if expr.startswith("vector("):
            continue  # a constant line (the memory limit)
        selectors = _METRIC.findall(expr)
        assert selectors, f"{title}: no gateway metric in {expr}"
        for metric, matchers in selectors:
            assert _SELECTED in matchers, f"{title}: {metric} unfiltered in {expr}"


def test_the_dashboard_draws_every_metric_of_the_readme_table() -> None:
    table = {
        name.removesuffix("_total") if row.type == "counter" else name
        for name, row in metrics_table().items()
    }
    used = {
        family_of(m).removesuffix("_total")
        for _, expr in dashboard_queries()
        for m, _ in _METRIC.findall(expr)
        if m.startswith("isales_gateway_")
    }

    assert table - used == set(), "metrics no panel draws"
    assert used - table == set(), "panels query metrics the gateway does not export"


def test_the_dashboard_opens_with_stat_panels_and_draws_memory_cpu_and_auth_failures() -> None:
    board = dashboard()
    top = [p for p in board["panels"] if p["gridPos"]["y"] <= 1 and p["type"] != "row"]
    titles = {p["title"] for p in top}
    queries = " ".join(expr for _, expr in dashboard_queries())

    assert {p["type"] for p in top} == {"stat"}
    assert titles == {
        "Budget used",
        "Hit ratio",
        "Queue depth",
        "Caller-facing 5xx",
        "Degraded components",
        "Breaker",
    }
    for panel in top:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert len(steps) >= 2, f"{panel['title']} has no threshold"
    for metric in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "isales_gateway_auth_failures_total",
    ):
        assert metric in queries


# --- the alert rules ------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_summary_description_and_a_runbook_url_to_its_readme_line() -> None:
    section = readme_section("Dashboards and alerts")
    anchors = {name: anchor for anchor, name in _ALERT_ROW.findall(section)}
    names = [rule["alert"] for rule in alert_rules()]

    for rule in alert_rules():
        name, notes = rule["alert"], rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert notes["summary"].strip(), name
        assert notes["description"].strip(), name
        assert notes["runbook_url"].startswith("https://"), name
        assert notes["runbook_url"].endswith("README.md#" + anchors[name]), name
        assert anchors[name] == name.lower()
        assert rule["labels"]["severity"] in ("warning", "critical"), name
    assert len(names) == len(set(names))
    assert set(names) == set(anchors), "alerts and README runbook lines differ"


def test_the_alerts_file_names_no_file_that_does_not_exist() -> None:
    for path in re.findall(r"\b((?:config|tests)/[\w./-]+\.(?:yml|yaml|py))\b", ALERTS.read_text()):
        assert (ROOT / path).exists(), path


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


def _answers(status_class: str, values: str) -> dict[str, str]:
    code = "none" if status_class == "2xx" else "GW50300"
    return _series(
        "isales_gateway_requests_total",
        values,
        route="callresult",
        status_class=status_class,
        cache="NONE" if code != "none" else "MISS",
        code=code,
    )


def _durations(fast: str, total: str) -> list[dict[str, str]]:
    metric = "isales_gateway_request_duration_seconds"
    labels = {"route": "callresult", "cache": "MISS"}
    return [
        _series(f"{metric}_bucket", fast, le="5.0", **labels),
        _series(f"{metric}_bucket", total, le="+Inf", **labels),
        _series(f"{metric}_count", total, **labels),
    ]


CALLS = _answers("2xx", "0+600x20")
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
        "IsalesGatewayUpstreamRateLimited",
        "5m",
        [
            OK,
            _series(
                "isales_gateway_upstream_requests_total",
                "0 1 2 3 3 3",
                outcome="rate_limited",
                code="none",
            ),
        ],
        severity="warning",
    ),
    _quiet(  # one 429 now and then is the vendor's right; the fleet pauses and goes on
        "IsalesGatewayUpstreamRateLimited",
        "10m",
        [
            OK,
            _series(
                "isales_gateway_upstream_requests_total",
                "0 1 1 1 1 1 1 1 1 1 1",
                outcome="rate_limited",
                code="none",
            ),
        ],
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
        [_series("isales_gateway_rejections_total", "0+60x20", reason="queue_full"), CALLS],
        severity="warning",
        reason="queue_full",
    ),
    _quiet(  # a trickle: one rejection a minute among 600 requests
        "IsalesGatewayRejecting",
        "10m",
        [_series("isales_gateway_rejections_total", "0+1x20", reason="queue_full"), CALLS],
    ),
    _fires("IsalesGatewayAbsent", "10m", [], severity="critical", job=JOB),
    _quiet("IsalesGatewayAbsent", "10m", [_series("up", "1x20")]),
    _fires(
        "IsalesGatewayCallerErrors", "10m", [CALLS, _answers("5xx", "0+60x20")], severity="critical"
    ),
    _quiet("IsalesGatewayCallerErrors", "10m", [CALLS, _answers("5xx", "0+1x20")]),
    _fires(
        "IsalesGatewayLatencyObjective",
        "20m",
        _durations(fast="0+50x30", total="0+100x30"),
        severity="warning",
    ),
    _quiet("IsalesGatewayLatencyObjective", "20m", _durations(fast="0+99x30", total="0+100x30")),
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
    start_simulator: StartSimulator,
    start_gateway: StartGateway,
    prometheus_for: Any,
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    upstream = await start_simulator(latency_ms=300)
    # Two upstream permits and no queue: the third distinct miss within 1.1 s gets a 503.
    settings = gateway_settings(upstream.url, limit__max_concurrent=2, limit__max_queue=0)
    gateway = await start_gateway(settings)
    # An idle second replica in Redis mode, so the Redis panels have series too.
    redis_mode = await start_gateway(gateway_settings(upstream.url, redis__url=redis_server.url))
    target = f"127.0.0.1:{gateway.server.port}"
    targets = [target, f"127.0.0.1:{redis_mode.server.port}"]
    prometheus: PrometheusServer = await prometheus_for(targets)
    await prometheus.wait_until(f'sum(up{{job="{JOB}"}})', 2)

    statuses = [(await gateway.post(PATH.format(1), json={"pageSize": 5})).status]  # MISS
    statuses.append((await gateway.post(PATH.format(1), json={"pageSize": 5})).status)  # HIT
    lone_begin = {"beginTime": "2026-01-01"}
    statuses.append((await gateway.post(PATH.format(1), json=lone_begin)).status)  # 0200008
    burst = [asyncio.ensure_future(gateway.post(PATH.format(2), json={})) for _ in range(4)]
    await until(lambda: upstream.requests == 2, "the burst's one call holds the second permit")
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
    assert instances["data"] == sorted(targets), "the instance variable's query finds both"
    await rules_evaluated_without_error(prometheus)


async def panel_values(prometheus: PrometheusServer, title: str, label: str) -> dict[str, float]:
    (expr,) = [expr for panel_title, expr in dashboard_queries() if panel_title == title]
    body = await prometheus.query(concrete(expr))
    return {r["metric"][label]: float(r["value"][1]) for r in body["data"]["result"]}


async def rules_evaluated_without_error(prometheus: PrometheusServer) -> None:
    """Prometheus loaded every shipped rule and evaluates each one cleanly."""
    rules: list[dict[str, Any]] = []

    async def every_rule_evaluated() -> bool:
        nonlocal rules
        body = await prometheus.api("rules")
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return bool(rules) and all(rule["health"] != "unknown" for rule in rules)

    await until(every_rule_evaluated, within=10, every=0.2)
    assert sorted(rule["name"] for rule in rules) == sorted(r["alert"] for r in alert_rules())
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not unhealthy
