"""The shipped Grafana dashboard and Prometheus alerts use only metrics the daemon exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.fakes.mailgun import FakeMailgun

DOCS = Path(__file__).parent.parent / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "prometheus-alerts.yml"
METRIC = re.compile(r"\bratatoskr_[a-z0-9_]+\b")
# Label names in `by (...)`, `without (...)` and `{name=...}` matchers.
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
# What the exposition writes for a family of each type (prometheus_client adds _created).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time


@pytest.fixture
async def exposition(running_daemon: Callable[..., Any], fake_mailgun: FakeMailgun, tmp_path: Path) -> str:
    """/metrics of a daemon that has seen one of everything (a refusal, a failover, a delivery),
    so every family carries samples and so its label names."""
    fake_mailgun.fail(503, route="send")
    outbox = {"name": "outbox", "kind": "outbox", "path": str(tmp_path / "outbox")}
    daemon = await running_daemon(providers=[fake_mailgun.provider_entry(), outbox])
    base = f"http://127.0.0.1:{daemon.http_port}"
    message = {"from": "ada@example.com", "to": ["bob@example.net"], "subject": "Hi", "text": "x"}
    async with aiohttp.ClientSession() as session:
        for body in ({**message, "to": []}, message):
            async with session.post(f"{base}/v1/messages", json=body):
                pass
        await wait_until(lambda: list((tmp_path / "outbox").glob("*.eml")), what="the delivery")
        async with session.get(f"{base}/metrics") as response:
            return await response.text()


def exposed(text: str) -> dict[str, set[str]]:
    """Every sample name a query may use → the label names it carries."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = {k for s in family.samples for k in s.labels}
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set()).update(labels)
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = dashboard["templating"]["list"]
    queries += [v["definition"] for v in variables if v.get("type") == "query"]
    return queries


def alert_rules() -> dict[str, str]:
    """alert name → its expression, read without a YAML library (the file is plain block YAML)."""
    text = ALERTS.read_text()
    rules = re.findall(r"- alert: (\w+)\n(?:\s*#.*\n)*\s*expr: (>-\n(?:\s{10}.*\n)+|.*\n)", text)
    return {name: expr.removeprefix(">-").strip() for name, expr in rules}


def check_queries(queries: list[str], names: dict[str, set[str]]) -> set[str]:
    """Assert every metric and label in ``queries`` exists; return the metrics referenced."""
    used: set[str] = set()
    known_labels = set().union(*names.values()) | TARGET_LABELS
    for query in queries:
        found = set(METRIC.findall(query))
        assert found, f"no ratatoskr metric in {query!r}"
        missing = found - names.keys()
        assert not missing, f"{query!r} uses {missing}, which /metrics does not expose"
        labels = {x.strip() for group in GROUPING.findall(query) for x in group.split(",")}
        labels |= set(MATCHER.findall(query))
        assert labels <= known_labels, f"{query!r} uses unknown labels {labels - known_labels}"
        used |= found
    return used


def family(name: str) -> str:
    return re.sub(r"_(total|created|bucket|count|sum)$", "", name)


def test_dashboard_uses_only_exposed_metrics_and_shows_every_one(exposition: str) -> None:
    """Each query's metric and label names exist in the live exposition; every interface
    metric has a panel."""
    names = exposed(exposition)
    used = check_queries(dashboard_queries(), names)
    interface = {n for n in map(family, names) if n.startswith("ratatoskr_")}
    assert {family(n) for n in used} == interface


def test_alerts_use_only_exposed_metrics_and_cover_the_outages(exposition: str) -> None:
    """Provider down, queue growing, oldest message too old and dead letters each have a rule,
    built on names /metrics really exposes."""
    names = exposed(exposition)
    rules = alert_rules()
    assert {
        "RatatoskrProviderDown",
        "RatatoskrQueueGrowing",
        "RatatoskrOldestMessageTooOld",
        "RatatoskrDeadLetters",
    } <= rules.keys()
    assert len(rules) == ALERTS.read_text().count("- alert:")
    check_queries(list(rules.values()), names)
    assert "ratatoskr_provider_up" in rules["RatatoskrProviderDown"]
    assert 'state="dead"' in rules["RatatoskrDeadLetters"]
    assert "ratatoskr_queue_oldest_age_seconds" in rules["RatatoskrOldestMessageTooOld"]


def test_dashboard_panels_are_well_formed() -> None:
    """Unique panel ids, each query panel on the data source variable with a refId per target."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and ref_ids
