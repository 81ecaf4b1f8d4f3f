"""Printing the figures: progress lines, the comparison table, per-phase details, JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench import targets as goal
from bench.measure import Count, Latency, Throughput

__all__ = ["Row", "comparison_rows", "print_report", "progress", "write_json"]

Results = Mapping[str, Throughput | Latency | Count]
_T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Row:
    metric: str
    laneway: float | None
    baseline_name: str
    baseline: float | None
    latency: bool
    """Latency rows compare by difference (ms), throughput rows by ratio."""
    target: float | None = None
    """>= for throughput, <= for latency (on Laneway's own figure)."""
    lost: int = 0
    """Failed or lost jobs in the phase behind Laneway's figure."""
    target_on_difference: bool = False
    """The target bounds Laneway's difference (ms) or ratio to the baseline, not its own figure."""
    at_most: bool = False
    """For a throughput-style row (ratio): the target is an upper bound (a cost ratio)."""

    @property
    def compared(self) -> float | None:
        if self.laneway is None or self.baseline is None:
            return None
        if self.latency:
            return self.laneway - self.baseline
        return self.laneway / self.baseline if self.baseline else None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        value = self.compared if self.target_on_difference else self.laneway
        if value is None:
            return "n/a"
        ok = value <= self.target if self.latency or self.at_most else value >= self.target
        return "PASS" if ok else "FAIL"

    def cells(self) -> list[str]:
        def num(v: float | None) -> str:
            if v is None:
                return "-"
            return f"{v:,.2f}" if self.latency else f"{v:,.0f}"

        c = self.compared
        compared = "-" if c is None else (f"{c:+,.2f} ms" if self.latency else f"{c:.2f}x")
        target = "-"
        if self.target is not None and self.target_on_difference:
            bound = "<=" if self.at_most else ">="
            target = f"<= {self.target:+g} ms" if self.latency else f"{bound} {self.target:g}x"
        elif self.target is not None:
            target = f"<= {self.target:g} ms" if self.latency else f">= {self.target:,.0f}/s"
        mark = f" ({self.lost} lost)" if self.lost else ""
        return [
            self.metric,
            num(self.laneway) + mark,
            self.baseline_name,
            num(self.baseline),
            compared,
            target,
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "laneway": self.laneway,
            "baseline_name": self.baseline_name,
            "baseline": self.baseline,
            "compared": self.compared,
            "compared_as": "laneway - baseline (ms)" if self.latency else "laneway / baseline",
            "target": self.target,
            "target_on": "compared" if self.target_on_difference else "laneway",
            "verdict": self.verdict,
            "laneway_failed_jobs": self.lost,
        }


def _rate(results: Results, key: str) -> float | None:
    r = results.get(key)
    return r.rate if isinstance(r, Throughput) else None


def _pct(results: Results, key: str, p: int) -> float | None:
    r = results.get(key)
    if not isinstance(r, Latency):
        return None
    return r.p50 if p == 50 else r.p99


def _per_1000(results: Results, key: str) -> float | None:
    r = results.get(key)
    return r.per_1000 if isinstance(r, Count) else None


def _lost(results: Results, key: str) -> int:
    r = results.get(key)
    return r.failures.count if r is not None else 0


def _cpu(results: Results, key: str, *processes: str, per: int = 1) -> float | None:
    r = results.get(key)
    per_job = r.cpu_ms_per_job(*processes) if isinstance(r, Throughput) else None
    return None if per_job is None else per_job * per


def comparison_rows(results: Results) -> list[Row]:
    """Laneway against the same run's baselines, with issue 19's targets (``bench.targets``)."""
    nats_rate = _rate(results, "raw_nats.throughput")
    grpc_rate = _rate(results, "grpc_echo.throughput")
    batch, unary, lat = "laneway.batch.throughput", "laneway.unary.throughput", "laneway.unary.latency"
    raw = "raw_nats.latency"
    lb, lu, ll = _lost(results, batch), _lost(results, unary), _lost(results, lat)
    run, run_lat = "laneway.run.throughput", "laneway.run.latency"
    grouped = "laneway.unary_grouped.throughput"
    lg = _lost(results, grouped)
    lr, lrl = _lost(results, run), _lost(results, run_lat)
    return [
        Row("e2e jobs/s, SubmitBatch x100", _rate(results, batch), "raw NATS loop", nats_rate,
            latency=False, target=goal.BATCH_VS_RAW_NATS, lost=lb, target_on_difference=True),
        Row("e2e jobs/s, unary Submit + stream", _rate(results, unary), "gRPC echo rps", grpc_rate,
            latency=False, target=goal.UNARY_VS_GRPC_ECHO, lost=lu, target_on_difference=True),
        Row("e2e jobs/s, unary Submit + stream", _rate(results, unary), "raw NATS loop", nats_rate,
            latency=False, lost=lu),
        Row("e2e jobs/s, unary, bulk follow", _rate(results, grouped), "gRPC echo rps", grpc_rate,
            latency=False, lost=lg),
        Row("e2e jobs/s, Run RPC", _rate(results, run), "gRPC echo rps", grpc_rate,
            latency=False, target=goal.RUN_VS_GRPC_ECHO, lost=lr, target_on_difference=True),
        Row("latency p50 @100/s (ms)", _pct(results, lat, 50), "raw NATS loop", _pct(results, raw, 50),
            latency=True, target=goal.UNARY_P50_MS, lost=ll),
        Row("latency p99 @100/s (ms)", _pct(results, lat, 99), "raw NATS loop", _pct(results, raw, 99),
            latency=True, target=goal.P99_MS, lost=ll),
        Row("latency p50 @100/s (ms)", _pct(results, lat, 50), "gRPC echo seq.",
            _pct(results, "grpc_echo.sequential", 50), latency=True, lost=ll),
        Row("Run p50 @100/s (ms)", _pct(results, run_lat, 50), "raw NATS loop", _pct(results, raw, 50),
            latency=True, target=goal.RUN_P50_MS, lost=lrl),
        Row("Run p99 @100/s (ms)", _pct(results, run_lat, 99), "raw NATS loop", _pct(results, raw, 99),
            latency=True, target=goal.P99_MS, lost=lrl),
        Row("broker CPU ms/job, unary Submit + stream", _cpu(results, unary, "broker"), "-", None,
            latency=True, target=goal.UNARY_BROKER_CPU_MS, lost=lu),
        Row("worker CPU ms/job, unary Submit + stream", _cpu(results, unary, "worker"), "-", None,
            latency=True, lost=lu),
        Row("broker CPU ms/job, Run", _cpu(results, run, "broker"), "-", None, latency=True, lost=lr),
        Row("broker+worker CPU ms/1k jobs, SubmitBatch", _cpu(results, batch, "broker", "worker", per=1000),
            "-", None, latency=True, target=goal.BATCH_CPU_MS_PER_1000, lost=lb),
        Row("nats-server CPU ms/1k jobs, SubmitBatch", _cpu(results, batch, "nats-server", per=1000),
            "raw NATS loop", _cpu(results, "raw_nats.throughput", "nats-server", per=1000),
            latency=True, lost=lb),
        *_feature_rows(results),
    ]  # fmt: skip


def _feature_rows(results: Results) -> list[Row]:
    """Embedding batching on against off (both Laneway), and time to first delta
    through Laneway against calling the provider directly."""
    on, off = "features.embed.on", "features.embed.off"
    lt = _lost(results, f"{on}.throughput") + _lost(results, f"{off}.throughput")
    ll = _lost(results, f"{on}.latency") + _lost(results, f"{off}.latency")
    ttfd, direct = "features.ttfd.laneway", "features.ttfd.direct"
    lf = _lost(results, ttfd)
    return [
        Row("embed provider calls/1k jobs, batching on", _per_1000(results, f"{on}.calls"),
            "batching off", _per_1000(results, f"{off}.calls"), latency=False, lost=lt),
        Row("embed jobs/s, SubmitBatch x100, batching on", _rate(results, f"{on}.throughput"),
            "batching off", _rate(results, f"{off}.throughput"), latency=False, lost=lt),
        Row("embed p50 @100/s, batching on (ms)", _pct(results, f"{on}.latency", 50),
            "batching off", _pct(results, f"{off}.latency", 50), latency=True, lost=ll),
        Row("embed p99 @100/s, batching on (ms)", _pct(results, f"{on}.latency", 99),
            "batching off", _pct(results, f"{off}.latency", 99), latency=True, lost=ll),
        Row("TTFD p50, Run streamed chat (ms)", _pct(results, ttfd, 50), "direct HTTP stream",
            _pct(results, direct, 50), latency=True, target=goal.TTFD_ADDED_P50_MS, lost=lf,
            target_on_difference=True),
        Row("TTFD p99, Run streamed chat (ms)", _pct(results, ttfd, 99), "direct HTTP stream",
            _pct(results, direct, 99), latency=True, lost=lf),
    ]  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _detail(name: str, r: Throughput | Latency | Count) -> str:
    if isinstance(r, Count):
        text = f"{r.count:,} {r.what} for {r.jobs:,} jobs = {r.per_1000:,.1f} per 1,000 jobs"
    elif isinstance(r, Throughput):
        text = f"{r.jobs} jobs in {r.seconds:.2f}s = {r.wall_rate:,.0f}/s, {r.concurrency} in flight"
        if r.active_seconds and abs(r.active_seconds - r.seconds) > 0.01:
            text += f"; {r.rate:,.0f}/s until the last clean call at {r.active_seconds:.2f}s"
    else:
        head = f"paced {r.rate:.0f}/s" if r.rate else "sequential"
        j = r.to_json()
        text = (
            f"{head}, {len(r.samples_ms)} ok: p50 {r.p50:.2f} ms, p90 {j['p90_ms']} ms, p99 {r.p99:.2f} ms, "
            f"max {j['max_ms']} ms"
        )
        if r.rate and r.max_lag_ms:
            text += f", worst schedule lag {r.max_lag_ms:.1f} ms"
    if r.failures.count or r.failures.kinds:
        text += f"\n      FAILURES: {r.failures.count}: {r.failures.summary()}"
    if r.cpu:
        text += "\n      cpu % of one core: " + ", ".join(f"{k} {v:.0f}" for k, v in r.cpu.items())
    return f"  {name:30} {text}"


def print_report(results: Results, rows: list[Row], *, header: str) -> None:
    print()
    print(header)
    print()
    if any(r.laneway is not None for r in rows):
        # Rows of phases that did not run at all (``--only``) are left out.
        shown = [r for r in rows if r.laneway is not None or r.baseline is not None]
        cols = ["metric", "Laneway", "baseline", "baseline value", "vs baseline", "target", "result"]
        print(_table(cols, [[*r.cells(), r.verdict] for r in shown]))
        if any(r.lost for r in rows):
            print(
                "(N lost): jobs of that phase failed or never reached a final event (see phases below); "
                "its rate counts successful jobs up to the last clean call, not the time spent waiting "
                "for lost jobs."
            )
        print()
    print("phases:")
    for name, r in results.items():
        print(_detail(name, r))
    failed = sum(r.failures.count for r in results.values())
    print(f"\nfailed or lost jobs: {failed}")


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
