"""deploy/prometheus: the alert rules pass promtool, their unit tests pass, and they cover the issue's cases."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.support import (
    ALERTS,
    DEPLOY,
    ROOT,
    SYNTHETIC,
    alert_rules,
    exported_series_names,
    metric_names,
)

RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
COMPOSE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install prometheus (make test does it when root)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_promtool_check_rules(promtool: str) -> None:
    out = run(promtool, "check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_promtool_rule_unit_tests(promtool: str) -> None:
    out = run(promtool, "test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text("utf-8"))["tests"]
              for case in test.get("alert_rule_test", [])}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_compose_prometheus_config_is_valid_with_these_rules(promtool: str, tmp_path: pathlib.Path) -> None:
    config = yaml.safe_load(COMPOSE_CONFIG.read_text("utf-8"))
    assert config["rule_files"] == ["/etc/prometheus/alerts.yaml"]  # where compose.yaml mounts it
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "eventfleet"


def test_rules_use_only_exported_metrics() -> None:
    exported = set(exported_series_names()) | SYNTHETIC
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']}: {names - exported}"


def test_the_alerts_the_issue_asks_for() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}

    def using(metric: str) -> list[dict[str, str]]:
        return [r for r in rules.values() if metric in metric_names(r["expr"])]

    for metric in ("eventfleet_projection_lag_events", "eventfleet_projection_lag_seconds"):
        (threshold,) = [r for r in using(metric) if ">" in r["expr"]]
        assert threshold["for"] == "5m"
        assert "by (namespace, projection)" in threshold["expr"]
    assert using("eventfleet_outbox_oldest_age_seconds")
    (dead,) = using("eventfleet_projection_dead_lettered_total")
    assert "increase(" in dead["expr"]
    assert using("eventfleet_store_horizon_age_seconds")
    for component in ("relay", "worker"):
        assert any(f'component="{component}"' in r["expr"] for r in using("up")), component
    assert any(re.fullmatch(r'up\{job="eventfleet"\} == 0', r["expr"]) for r in using("up"))


def test_every_alert_is_labelled_and_documented() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ +(.+?) *$", readme, flags=re.MULTILINE)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "README.md"
        assert anchor in anchors, f"README.md has no section for {rule['alert']}"
