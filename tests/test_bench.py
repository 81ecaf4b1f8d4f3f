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


@pytest.mark.timeout(120)
async def test_tiny_scaling_bench(tmp_path: Path) -> None:
    """The sizing guide's bench end to end at tiny sizes: every phase runs, no job is
    lost, and the JSON carries CPU per job per process kind and the memory figures."""
    output = tmp_path / "scaling.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.scaling_bench", "--jobs", "60", "--workers", "1", "--brokers", "1",
        "--nats", "single", "--depth", "300", "--streams", "30", "--idle-seconds", "0.2",
        "--output", str(output),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 100)
    except TimeoutError:
        proc.terminate()  # the bench stops its children and removes its temp dirs on SIGTERM
        await proc.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "failed or lost jobs: 0" in stdout
    figures = json.loads(output.read_text())
    (cell,) = figures["cells"]
    assert (cell["nats"], cell["workers"], cell["brokers"]) == ("single", 1, 1)
    for shape in ("unary", "batch"):
        assert cell[shape]["jobs_per_s"] > 0
        assert cell[shape]["cpu_ms_per_job"]["broker"] > 0
    (depth,) = figures["depth"]
    assert depth["streams_queued"]["LANEWAY_JOBS"]["messages"] == 300
    assert depth["jobs_stream_bytes_per_job"] > 0
    (streams,) = figures["streams"]
    assert streams["finals"] == 30


async def _run_module(*args: str, timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.terminate()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out.decode()}\n{err.decode()}"
    return out.decode()


@pytest.mark.timeout(120)
async def test_webhook_bench_smoke() -> None:
    """Both parts run in their tiny size: every delivery acknowledged once, none lost."""
    out = await _run_module(
        "bench.webhook_bench", "--jobs", "20", "--outage-s", "2", "--after-s", "0.5",
        "--circuit-open-s", "1", "--deadline-s", "60", timeout=100,
    )  # fmt: skip
    assert "== lag: 20 jobs" in out
    # The outage table: "  <name>   <value>" rows.
    rows = dict(line.strip().rsplit(None, 1) for line in out.splitlines() if line.startswith("  "))
    assert rows["jobs submitted"] == rows["distinct webhook-ids acknowledged"] == "250", out
    assert rows["duplicates after ack"] == "0" and rows["dead-lettered"] == "0", out


@pytest.mark.timeout(120)
async def test_gateway_bench_smoke() -> None:
    """SSE and WebSocket rows are printed next to each other, and the memory line."""
    out = await _run_module("bench.gateway_bench", "--jobs", "3", "--subscribers", "20", timeout=100)
    assert "  SSE " in out and "  WebSocket " in out and "gateway RSS:" in out, out
