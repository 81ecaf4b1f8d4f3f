"""The sizing guide's measurements (docs/scaling.md): throughput and CPU per job per
process kind with 1, 2, 4 worker processes and 1, 2 brokers, on one nats-server and
on a 3-node cluster; what 100,000 queued jobs cost in memory; what open StreamResults
calls cost a broker.

    .venv/bin/python -m bench.scaling_bench [--jobs N] [--workers 1,2,4] [--brokers 1,2]
        [--nats single|cluster|both] [--depth N] [--streams 1000,5000] [--skip depth,streams]

Prints tables and writes the figures to ``bench/results/scaling.json`` (``--output``),
those of the phases that ran when one could not (with its ``error``). Exits 1 when a
job failed or was lost, or a phase could not run. On a shared
machine every figure is noisy: re-run it on a quiet one before trusting a digit.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import Failures
from bench.report import progress, write_json
from bench.scaling_phases import depth_phase, streams_phase, throughput_cell
from bench.scaling_stack import cluster_available
from bench.stack import BenchError

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--jobs", type=int, default=2000, help="unary jobs per cell; 3x that batched (default 2000)"
    )
    p.add_argument(
        "--workers", type=_ints, default=[1, 2, 4], help="worker processes per cell (default 1,2,4)"
    )
    p.add_argument("--brokers", type=_ints, default=[1, 2], help="broker processes per cell (default 1,2)")
    p.add_argument("--nats", choices=("single", "cluster", "both"), default="both")
    p.add_argument(
        "--depth", type=int, default=100_000, help="jobs queued in the depth phase (default 100000)"
    )
    p.add_argument(
        "--streams", type=_ints, default=[1000, 5000], help="open StreamResults calls (default 1000,5000)"
    )
    p.add_argument("--idle-seconds", type=float, default=5.0, help="window for the idle CPU of open streams")
    p.add_argument("--skip", default="", help="phases to leave out, comma-separated: cells,depth,streams")
    p.add_argument("--output", type=Path, default=RESULTS, help="default bench/results/scaling.json")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.depth < 1:
        p.error("--jobs and --depth must be at least 1")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := args.skip - {"cells", "depth", "streams"}:
        p.error(f"--skip: unknown phases {sorted(unknown)}")
    return args


def _nats_kinds(choice: str) -> tuple[list[bool], str | None]:
    """Which NATS setups to run (False: one server, True: cluster) and why one is skipped."""
    kinds = {"single": [False], "cluster": [True], "both": [False, True]}[choice]
    why = cluster_available() if True in kinds else None
    if why is not None:
        kinds = [k for k in kinds if not k]
    return kinds, why


async def _run(args: argparse.Namespace, failures: Failures, out: dict[str, Any]) -> None:
    """Run the phases, adding each one's figures to ``out`` as it ends (so a phase that
    fails later leaves the earlier figures to write)."""
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM cancels the run like Ctrl-C does, so children are stopped and temp dirs removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    kinds, skipped = _nats_kinds(args.nats)
    if skipped:
        progress(f"cluster column skipped: {skipped}")
    out["cluster_skipped"] = skipped
    if "cells" not in args.skip:
        for cluster in kinds:
            for brokers in args.brokers:
                for workers in args.workers:
                    out["cells"].append(
                        await throughput_cell(
                            cluster=cluster,
                            workers=workers,
                            brokers=brokers,
                            jobs=args.jobs,
                            failures=failures,
                        )
                    )
    if "depth" not in args.skip:
        for cluster in kinds:
            out["depth"].append(
                await depth_phase(
                    cluster=cluster, depth=args.depth, workers=max(args.workers), failures=failures
                )
            )
    if "streams" not in args.skip:
        for n in args.streams:
            out["streams"].append(
                await streams_phase(streams=n, idle_seconds=args.idle_seconds, failures=failures)
            )


def _print_cells(cells: list[dict[str, Any]]) -> None:
    print("\nThroughput and CPU ms per job (sum over the processes of each kind)")
    kinds = ("broker", "worker", "nats", "bench")
    head = f"{'nats':<8}{'B':>2}{'W':>3} | {'shape':<7}{'jobs/s':>8} | " + "".join(f"{k:>7}" for k in kinds)
    print(head)
    print("-" * len(head))
    for c in cells:
        for shape in ("unary", "batch"):
            r = c[shape]
            ms = r["cpu_ms_per_job"]
            print(
                f"{c['nats']:<8}{c['brokers']:>2}{c['workers']:>3} | {shape:<7}{r['jobs_per_s']:>8.0f} | "
                + "".join(f"{ms.get(k, 0):>7.2f}" for k in kinds)
            )


def _print_depth(rows: list[dict[str, Any]]) -> None:
    for d in rows:
        print(
            f"\nQueue depth ({d['nats']}): {d['depth']} jobs queued at {d['enqueue_jobs_per_s']:.0f} jobs/s"
        )
        for name, st in d["streams_queued"].items():
            print(f"  stream {name:<28}{st['messages']:>9} msgs {st['bytes'] / 2**20:>9.1f} MiB")
        print(f"  jobs stream bytes per queued job: {d['jobs_stream_bytes_per_job']:.0f}")
        print(f"  nats-server RSS MiB: {d['rss_mb_before']['nats']} -> {d['rss_mb_queued']['nats']}")
        print(f"  broker RSS MiB:      {d['rss_mb_before']['broker']} -> {d['rss_mb_queued']['broker']}")
        print(
            f"  drain with {d['drain_workers']} worker(s): {d['drain_jobs_per_s']:.0f} jobs/s "
            f"({d['drain_seconds']:.1f} s); worker RSS MiB half-way {d['worker_rss_mb_half_drained']}, "
            f"at the end {d['worker_rss_mb_drain_end']}"
        )


def _print_streams(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"\nOpen StreamResults calls: {r['streams']} over {r['channels']} channel(s), open in "
            f"{r['open_seconds']} s; broker RSS MiB {r['broker_rss_mb_before']} -> {r['broker_rss_mb_open']} "
            f"({r['broker_kb_per_stream']} KiB per call); idle CPU % {r['idle_cpu_percent']}; "
            f"final events {r['finals']}/{r['streams']} in {r['finish_seconds']} s"
        )


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    failures = Failures()
    started = time.perf_counter()
    out: dict[str, Any] = {"cells": [], "depth": [], "streams": [], "cluster_skipped": None}
    error: str | None = None
    try:
        asyncio.run(_run(args, failures, out))
    except BenchError as err:
        print(f"scaling bench: {err}", file=sys.stderr)
        error = str(err)  # what was measured before it is still written, with the error
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("scaling bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
    meta = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else argv,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "note": "shared machine: every figure is noisy and per-core indicative",
    }
    if out["cluster_skipped"]:
        print(f"\ncluster column skipped: {out['cluster_skipped']}")
    _print_cells(out["cells"])
    _print_depth(out["depth"])
    _print_streams(out["streams"])
    print(f"\nfailed or lost jobs: {failures.count}" + (f" ({failures.summary()})" if failures.count else ""))
    write_json(args.output, {"meta": meta, **out, "failures": failures.to_json(), "error": error})
    print(f"figures written to {args.output}" + (" (incomplete: a phase failed)" if error else ""))
    return 1 if failures.count or error else 0


if __name__ == "__main__":
    raise SystemExit(main())
