"""The scenario harness end to end, briefly: the overflow scenario for a few seconds
through the command line's code path (real processes: nats-server, two fake
providers, a broker, four workers). Its targets need minutes of load, so this checks
only that the harness measures something and that jobs went through."""

from __future__ import annotations

import json
from pathlib import Path

from bench.scenarios.__main__ import main


def test_overflow_scenario_produces_figures(tmp_path: Path) -> None:
    out = tmp_path / "overflow.json"
    status = main(["overflow", "--duration", "4", "--output", str(out)])
    assert status in (0, 1), "the scenario could not run"  # 1: a target missed, fine in 4 s
    body = json.loads(out.read_text())
    (scenario,) = body["scenarios"]
    assert scenario["scenario"] == "overflow"
    figures = {f["name"]: f for f in scenario["figures"]}
    assert figures["completed per minute"]["value"] > 0
    assert figures["completed per minute"]["target"] == ">= 570"
    assert figures["jobs failed to the caller"]["value"] == 0
    outcomes = scenario["info"]["outcomes"]
    assert outcomes.get("JOB_STATE_SUCCEEDED", 0) > 0
    assert "submit_error" not in outcomes
    assert sum(scenario["info"]["completed_by_provider"].values()) > 0
