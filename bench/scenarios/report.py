"""A scenario's figures against its targets: the printed table and the JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Figure", "ScenarioResult", "percentile", "print_result", "write_results"]


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct``-th percentile by nearest rank (None with no data): with 60 samples,
    p99 is the largest, which is what a tail target means on so few."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Figure:
    name: str
    value: float | None
    """None: could not be measured (which fails its target)."""
    unit: str = ""
    target: float | None = None
    op: Literal[">=", "<=", "=="] = ">="
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """None when there is no target (the figure is information)."""
        if self.target is None:
            return None
        if self.value is None:
            return False
        if self.op == ">=":
            return self.value >= self.target
        if self.op == "<=":
            return self.value <= self.target
        return self.value == self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": None if self.target is None else f"{self.op} {self.target:g}",
            "passed": self.passed,
            "note": self.note,
        }


@dataclass
class ScenarioResult:
    name: str
    setup: str
    """How the scenario was run, in one or two sentences (load, limits, latencies)."""
    figures: list[Figure] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    """Details for the JSON (timelines, counts), not printed in full."""
    error: str = ""
    """Why the scenario could not run (its stack did not start, a process died)."""

    @property
    def passed(self) -> bool:
        return not self.error and all(f.passed is not False for f in self.figures)

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "setup": self.setup,
            "passed": self.passed,
            "error": self.error,
            "figures": [f.to_json() for f in self.figures],
            "info": self.info,
        }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if value == int(value) or abs(value) >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def print_result(result: ScenarioResult) -> None:
    status = "PASS" if result.passed else "FAIL"
    print(f"\n== {result.name}: {status} ==")
    print(f"   {result.setup}")
    if result.error:
        print(f"   could not run: {result.error}")
        return
    width = max(len(f.name) for f in result.figures) if result.figures else 10
    print(f"   {'figure'.ljust(width)}  {'measured':>14}  {'target':>14}  result")
    for f in result.figures:
        target = "" if f.target is None else f"{f.op} {_fmt(f.target, f.unit)}"
        verdict = {True: "PASS", False: "FAIL", None: ""}[f.passed]
        line = f"   {f.name.ljust(width)}  {_fmt(f.value, f.unit):>14}  {target:>14}  {verdict}"
        print(f"{line}   {f.note}".rstrip() if f.note else line)


def write_results(path: Path, results: Sequence[ScenarioResult], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "meta": meta,
        "passed": all(r.passed for r in results),
        "scenarios": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
