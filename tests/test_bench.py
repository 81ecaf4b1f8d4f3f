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


def test_report_targets_and_spread_over_runs(tmp_path: Path) -> None:
    """The table's CPU rows come from each phase's CPU and jobs; ``bench.spread``
    summarises several result files row by row (median, range, targets met)."""
    from bench.measure import Failures, Throughput
    from bench.report import comparison_rows
    from bench.spread import main, spread_table

    # 2,000 batched jobs in 1 s with the broker at 50 % and the worker at 30 % of a core.
    batch = Throughput(2000, 1.0, 6, Failures(), {"broker": 50.0, "worker": 30.0, "nats-server": 10.0})
    unary = Throughput(500, 1.0, 64, Failures(), {"broker": 40.0, "worker": 30.0})
    rows = {
        r.metric: r
        for r in comparison_rows({"laneway.batch.throughput": batch, "laneway.unary.throughput": unary})
    }
    cpu = rows["broker+worker CPU ms/1k jobs, SubmitBatch"]
    assert cpu.laneway == pytest.approx(400.0) and cpu.verdict == "PASS"  # the target is <= 400
    assert rows["broker CPU ms/job, unary Submit + stream"].laneway == pytest.approx(0.8)

    def run(value: float, verdict: str) -> list[dict[str, object]]:
        return [
            {
                "metric": "m",
                "baseline_name": "b",
                "laneway": value,
                "compared": value / 100,
                "compared_as": "laneway / baseline",
                "target": 0.3,
                "verdict": verdict,
            }
        ]

    table = spread_table([run(20, "FAIL"), run(40, "PASS"), run(35, "PASS")])
    assert table == [["m", "b", "35 [20 .. 40]", "0.35x [0.20 .. 0.40]", "0.3", "2/3"]]
    files = []
    for i, value in enumerate((20, 40)):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps({"comparison": run(value, "PASS")}))
        files.append(str(path))
    assert main(files) == 0
