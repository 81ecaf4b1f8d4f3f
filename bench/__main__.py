"""``make bench``: Laneway's throughput and latency next to baselines measured in
the same run (a raw nats-py JetStream loop and a raw grpc.aio echo), then its
features: embedding batching on against off, and the time to the first streamed
delta through Laneway against calling the provider directly; what metrics cost
(throughput with metrics off against on, in one run); and what authentication and
TLS cost (throughput and latency with an API key and TLS on against both off).

    .venv/bin/python -m bench [--jobs N] [--quick] [--only laneway|baselines|features|metrics|auth_tls]

Prints a table with ratios and the spec's targets, and writes the figures to
``bench/results/latest.json`` (or ``--output``). Exits 1 when a job failed or was
lost, or a phase could not run; targets missed are reported (FAIL) but do not
change the status.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.measure import Count, Latency, Throughput
from bench.report import comparison_rows, print_report, progress, write_json
from bench.settings import Settings, raw_payload
from bench.stack import BenchError
from laneway.broker.cli.natsd import find_nats_server

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="jobs per throughput phase (default 3000)")
    p.add_argument("--quick", action="store_true", help="small N and a short paced phase (< 60 s)")
    p.add_argument(
        "--only",
        choices=("laneway", "baselines", "features", "metrics", "auth_tls"),
        help="run only one side, or only the features, the metrics or the auth+TLS overhead",
    )
    p.add_argument("--unary-concurrency", type=int, default=64, help="unary jobs in flight (default 64)")
    p.add_argument("--batches-in-flight", type=int, default=6, help="SubmitBatch calls in flight (default 6)")
    p.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="where to write the figures (default bench/results/latest.json)",
    )
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def _nats_version() -> str:
    try:
        out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError, Exception):
        return "unknown"
    return out.stdout.strip() or "unknown"


async def _run(s: Settings, only: str | None) -> dict[str, Throughput | Latency | Count]:
    from bench.auth_tls_bench import run_auth_tls
    from bench.baselines import run_baselines
    from bench.features_bench import run_features
    from bench.laneway_bench import run_laneway
    from bench.metrics_bench import run_metrics

    # SIGTERM cancels the run like Ctrl-C does, so children are stopped and temp dirs removed.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results: dict[str, Throughput | Latency | Count] = {}
    if only in (None, "baselines"):
        results.update(await run_baselines(s))
    if only in (None, "laneway"):
        results.update(await run_laneway(s))
    if only in (None, "features"):
        results.update(await run_features(s))
    if only in (None, "metrics"):
        results.update(await run_metrics(s))
    if only in (None, "auth_tls"):
        results.update(await run_auth_tls(s))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    s = Settings.build(
        jobs=args.jobs,
        quick=args.quick,
        unary_concurrency=args.unary_concurrency,
        batches_in_flight=args.batches_in_flight,
    )
    started = time.perf_counter()
    try:
        results = asyncio.run(_run(s, args.only))
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    meta: dict[str, object] = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nats_server": _nats_version(),
        "payload_bytes": len(raw_payload()),
        "wall_seconds": round(elapsed, 1),
    }
    header = (
        f"Laneway bench ({'quick' if s.quick else 'full'}): {meta['cpus']} CPUs, Python {meta['python']}, "
        f"{meta['nats_server']}, {meta['payload_bytes']}-byte jobs, {s.jobs} jobs per throughput phase, "
        f"run took {elapsed:.0f}s"
    )
    from bench.auth_tls_bench import auth_tls_rows
    from bench.metrics_bench import metrics_rows

    rows = comparison_rows(results) + metrics_rows(results) + auth_tls_rows(results)
    print_report(results, rows, header=header)
    write_json(
        args.output,
        {
            "meta": meta,
            "settings": asdict(s),
            "results": {k: v.to_json() for k, v in results.items()},
            "comparison": [r.to_json() for r in rows if r.laneway is not None],
        },
    )
    progress(f"figures written to {args.output}")
    return 1 if any(r.failures.count for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
