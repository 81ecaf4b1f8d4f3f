"""``make bench``'s features phase, end to end in its quick size: it runs, every job
succeeds, and its rows reach the table and the JSON figures."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FEATURE_ROWS = (
    "embed provider calls/1k jobs, batching on",
    "embed jobs/s, SubmitBatch x100, batching on",
    "embed p50 @100/s, batching on (ms)",
    "TTFD p50, Run streamed chat (ms)",
)


@pytest.mark.timeout(300)
async def test_quick_features_bench(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--quick", "--only", "features", "--output", str(output),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    except TimeoutError:
        proc.terminate()  # the bench stops its children and removes its temp dirs on SIGTERM
        await proc.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    for metric in FEATURE_ROWS:
        assert metric in stdout, f"{metric!r} missing from the table:\n{stdout}"
    assert "failed or lost jobs: 0" in stdout
    # Only the features ran: the other phases' rows are left out of the table.
    assert "e2e jobs/s, unary Submit" not in stdout

    figures = json.loads(output.read_text())
    rows = {row["metric"]: row for row in figures["comparison"]}
    calls = rows["embed provider calls/1k jobs, batching on"]
    assert calls["baseline"] == pytest.approx(1000.0)  # batching off: one call per job
    assert calls["laneway"] < calls["baseline"]
    ttfd = rows["TTFD p50, Run streamed chat (ms)"]
    assert ttfd["target_on"] == "compared"
    assert ttfd["verdict"] in ("PASS", "FAIL")
    assert figures["results"]["features.embed.on.calls"]["jobs"] == figures["settings"]["embed_jobs"]


@pytest.mark.timeout(300)
async def test_quick_auth_tls_bench(tmp_path: Path) -> None:
    """Auth+TLS on against off: both stacks run, every job succeeds, the rows are printed."""
    output = tmp_path / "latest.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--quick", "--only", "auth_tls", "--output", str(output),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    except TimeoutError:
        proc.terminate()
        await proc.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "failed or lost jobs: 0" in stdout
    rows = {row["metric"]: row for row in json.loads(output.read_text())["comparison"]}
    for metric in (
        "e2e jobs/s, unary Submit, auth+TLS on",
        "e2e jobs/s, SubmitBatch x100, auth+TLS on",
        "latency p50 @100/s, auth+TLS on (ms)",
    ):
        assert metric in stdout, f"{metric!r} missing from the table:\n{stdout}"
        assert rows[metric]["laneway"] > 0 and rows[metric]["baseline"] > 0
        assert rows[metric]["baseline_name"] == "auth+TLS off"
