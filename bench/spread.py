"""The spread of ``make bench`` figures over several runs.

    .venv/bin/python -m bench.spread bench/results/run1.json bench/results/run2.json ...

For each row of the comparison table: Laneway's figure and its ratio or difference
to the same run's baseline, as min / median / max over the runs, and how many runs
met the target. One run on a shared machine says little; the spread says how much.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "spread_table"]


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"bench.spread: {path}: {err}") from err
    rows = data.get("comparison")
    if not isinstance(rows, list):
        raise SystemExit(f"bench.spread: {path}: no 'comparison' list (not a bench result file)")
    return rows


def _span(values: list[float], fmt: str, unit: str = "") -> str:
    if not values:
        return "-"
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)}{unit} [{fmt.format(lo)} .. {fmt.format(hi)}]"


def spread_table(runs: list[list[dict[str, Any]]]) -> list[list[str]]:
    """Rows: metric, baseline, Laneway median [min .. max], compared likewise, target, runs met."""
    order: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            key = (str(row["metric"]), str(row["baseline_name"]))
            if key not in seen:
                order.append(key)
                seen[key] = []
            seen[key].append(row)
    out: list[list[str]] = []
    for key in order:
        rows = seen[key]
        latency = str(rows[0].get("compared_as", "")).endswith("(ms)")
        own = [float(r["laneway"]) for r in rows if r.get("laneway") is not None]
        compared = [float(r["compared"]) for r in rows if r.get("compared") is not None]
        verdicts = [r.get("verdict") for r in rows if r.get("verdict") in ("PASS", "FAIL")]
        target = rows[0].get("target")
        passed = f"{verdicts.count('PASS')}/{len(verdicts)}" if verdicts else "-"
        out.append(
            [
                key[0],
                key[1],
                _span(own, "{:,.2f}" if latency else "{:,.0f}"),
                _span(compared, "{:+,.2f}" if latency else "{:.2f}", " ms" if latency else "x"),
                "-" if target is None else f"{target:g}",
                passed,
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spread", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="result files written by python -m bench --output")
    args = p.parse_args(argv)
    table = spread_table([_load(f) for f in args.files])
    header = ["metric", "baseline", "Laneway median [min .. max]", "vs baseline", "target", "met"]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"{len(args.files)} runs")
    for row in [header, ["-" * w for w in widths], *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
