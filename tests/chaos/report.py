"""``python -m tests.chaos.report FILE``: the chaos reports (JSON lines) as the Markdown tables of RELIABILITY.md."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from tests.chaos import harness


def _seconds(values: list[float]) -> str:
    """A few values listed, more as median / max."""
    if not values:
        return "-"
    if len(values) <= 3:
        return ", ".join(f"{v:.1f}" for v in sorted(values))
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def scenarios(reports: list[dict[str, Any]]) -> str:
    """One row per scenario: faults, events written and applied, duplicates, gaps, recovery, lost, doubled."""
    lines = [
        ("| scenario | faults | load s | written | applied (each projection) | duplicates skipped | gaps filled "
         "| recover s (each, or median / max) | drain s | lost | doubled |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        recovers = [i["recover_seconds"] for i in r["injections"] if i["recover_seconds"] is not None]
        missed = len(r["injections"]) - len(recovers)
        recover = _seconds(recovers) + (f" ({missed} not before the next fault)" if missed else "")
        kinds: dict[str, int] = {}
        for i in r["injections"]:
            kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
        faults = ", ".join(f"{k} x{n}" for k, n in kinds.items())
        applied = sorted(set(r["applied"].values()))
        lines.append(
            f"| {r['scenario']} | {faults} | {r['load_seconds']:.0f} | {r['written']} | "
            f"{'/'.join(map(str, applied))} | {r['duplicates']} | {r['gaps_filled']} | {recover} | "
            f"{r['drain_seconds']:.1f} | {r['lost']} | {r['doubled']} |")
    return "\n".join(lines)


def faults(reports: list[dict[str, Any]]) -> str:
    """One row per fault kind over every run: how long the fault took and how long the fleet took after it."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        for i in r["injections"]:
            by_kind.setdefault(i["kind"], []).append(i)
    lines = [("| fault | injected | fault lasted s (median / max) | recover s (median / max) "
             "| not back to steady state before the next fault |"), "|---|---|---|---|---|"]
    for kind, injections in by_kind.items():
        lasted = [i["ended"] - i["started"] for i in injections]
        recovers = [i["recover_seconds"] for i in injections if i["recover_seconds"] is not None]
        lines.append(f"| {kind} | {len(injections)} | {statistics.median(lasted):.1f} / {max(lasted):.1f} | "
                     f"{_seconds_always(recovers)} | {len(injections) - len(recovers)} |")
    return "\n".join(lines)


def _seconds_always(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} / {max(values):.1f}" if values else "-"


def recompute(report: dict[str, Any]) -> dict[str, Any]:
    """Recovery figures recomputed from the stored lag samples with the harness's current rules."""
    samples = report.get("samples")
    if samples and report["injections"]:
        steady = harness.steady_lag(samples, report["injections"][0]["started"])
        faults = [(i["started"], i["ended"]) for i in report["injections"]]
        backs = harness.recoveries(samples, faults, steady, report["rate"])
        for injection, back in zip(report["injections"], backs, strict=True):
            injection["recover_seconds"] = back
        report["steady_lag"] = steady
    return report


def main(argv: list[str]) -> int:
    reports = [recompute(json.loads(line)) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    print(scenarios(reports))
    print()
    print(faults(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
