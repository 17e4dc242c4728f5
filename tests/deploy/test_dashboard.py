"""deploy/grafana/eventfleet.json: a well-formed dashboard whose queries parse and use exported metrics."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.support import DASHBOARD, ROOT, SYNTHETIC, exported_series_names, metric_names

#: Grafana's built-in variables and what to put in their place to get plain PromQL.
BUILTINS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return doc


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def plain_promql(expr: str) -> str:
    """The query with its variables replaced as Grafana would ("All" is .*)."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    for name in re.findall(r"\$(\w+)", expr):
        assert name in variables, f"undefined variable ${name}"
        expr = expr.replace(f"${name}", ".*")
    return expr


def test_dashboard_shape() -> None:
    doc = dashboard()
    assert doc["uid"] == "eventfleet"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_queries_use_only_exported_metrics() -> None:
    exported = exported_series_names()
    for expr in expressions():
        names = metric_names(expr)
        assert names, expr
        assert names <= set(exported) | SYNTHETIC, expr
        for name in names:
            if exported.get(name) == "histogram":  # buckets only make sense through histogram_quantile
                assert name.endswith("_bucket")
                assert expr.startswith("histogram_quantile(")
                assert "by (le, projection)" in expr


def test_the_panels_the_issue_asks_for() -> None:
    used = {name for expr in expressions() for name in metric_names(expr)}
    assert {
        "eventfleet_projection_lag_events",
        "eventfleet_projection_applied_total",
        "eventfleet_projection_duplicates_total",
        "eventfleet_end_to_end_seconds_bucket",
        "eventfleet_outbox_pending",
        "eventfleet_outbox_oldest_age_seconds",
        "eventfleet_projection_dead_lettered_total",
    } <= used
    quantiles = {m.group(1) for e in expressions()
                 if (m := re.match(r"histogram_quantile\(([0-9.]+), .*eventfleet_end_to_end_seconds_bucket", e))}
    assert {"0.5", "0.95", "0.99"} <= quantiles
    assert any("max by (projection) (eventfleet_projection_lag_events" in e for e in expressions())


def test_publications_show_beside_the_projections() -> None:
    """A publication's lag and parked events are its projection series; what it published has a panel."""
    titles = {p["title"]: p for p in dashboard()["panels"]}
    assert "Publications" in titles
    published = titles["Integration events published per second"]["targets"][0]["expr"]
    assert metric_names(published) == {"eventfleet_publication_published_total"}
    assert "by (publication)" in published


def test_queries_parse(tmp_path: pathlib.Path) -> None:
    """promtool has no query checker: make every panel query a recording rule and check those."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install prometheus (.ci/run does)")
    rules = [{"record": f"dashboard:query_{i}", "expr": plain_promql(e)} for i, e in enumerate(expressions())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                         check=False, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_variables_query_exported_labels() -> None:
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
            assert match is not None
            assert metric_names(match.group(1)) <= set(exported_series_names()) | SYNTHETIC
            assert variable["allValue"] == ".*"  # also matches series without the label (compose)
