"""``python -m tests.chaos.report FILE``: the chaos reports (JSON lines) as the Markdown table of RELIABILITY.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _recover(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(reports: list[dict[str, Any]]) -> str:
    """One row per scenario: faults, events written and applied, duplicates, gaps, recovery, lost, doubled."""
    lines = [
        ("| scenario | faults | load s | written | applied (each projection) | duplicates skipped | gaps filled "
         "| recover s (median / max) | drain s | lost | doubled |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        recovers = sorted(i["recover_seconds"] for i in r["injections"] if i["recover_seconds"] is not None)
        median = recovers[len(recovers) // 2] if recovers else None
        kinds: dict[str, int] = {}
        for i in r["injections"]:
            kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
        faults = ", ".join(f"{k} x{n}" for k, n in kinds.items())
        applied = sorted(set(r["applied"].values()))
        lines.append(
            f"| {r['scenario']} | {faults} | {r['load_seconds']:.0f} | {r['written']} | "
            f"{'/'.join(map(str, applied))} | {r['duplicates']} | {r['gaps_filled']} | "
            f"{_recover(median)} / {_recover(max(recovers, default=None))} | {r['drain_seconds']:.1f} | "
            f"{r['lost']} | {r['doubled']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    reports = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
