"""``python -m bench.scenarios NAME``: run one scenario (or ``all``), print its
figures against the targets, write them as JSON with ``--output``.

Exits 0 when every target passed, 1 when one failed, 2 when a scenario could not
run (its stack did not start, a process died; the others still run), 130 when
interrupted. Every process
a scenario started is stopped on the way out, whichever way that is.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.scenarios import (
    failover,
    goodput,
    header_rpm,
    outage,
    overflow,
    priority,
    retry_after,
    tiers,
    tokens,
)
from bench.scenarios.report import ScenarioResult, print_result, write_results
from bench.stack import BenchError

Runner = Callable[[float], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, tuple[Runner, float]] = {
    "goodput": (goodput.run, goodput.DEFAULT_DURATION),
    "overflow": (overflow.run, overflow.DEFAULT_DURATION),
    "failover": (failover.run, failover.DEFAULT_DURATION),
    "retry_after": (retry_after.run, retry_after.DEFAULT_DURATION),
    "priority": (priority.run, priority.DEFAULT_DURATION),
    "tiers": (tiers.run, tiers.DEFAULT_DURATION),
    "tokens": (tokens.run, tokens.DEFAULT_DURATION),
    "header_rpm": (header_rpm.run, header_rpm.DEFAULT_DURATION),
    "outage": (outage.run, outage.DEFAULT_DURATION),
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scenarios", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=[*SCENARIOS, "all"], help="the scenario to run, or all of them in turn")
    defaults = ", ".join(f"{n} {d:.0f}" for n, (_, d) in SCENARIOS.items())
    p.add_argument(
        "--duration", type=float, default=None, help=f"seconds of load per scenario (defaults: {defaults})"
    )
    p.add_argument("--output", type=Path, default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be positive")
    return args


async def run_scenarios(names: list[str], duration: float | None) -> list[ScenarioResult]:
    # SIGTERM cancels the run like Ctrl-C does, so children are stopped and temp dirs removed.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    results: list[ScenarioResult] = []
    try:
        for name in names:
            runner, default = SCENARIOS[name]
            try:
                result = await runner(duration if duration is not None else default)
            except BenchError as err:
                # The others can still run: one broken stack should not hide their figures.
                print(f"scenarios: {name}: {err}", file=sys.stderr)
                result = ScenarioResult(name, "", error=str(err))
            print_result(result)
            results.append(result)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    started = time.perf_counter()
    try:
        results = asyncio.run(run_scenarios(names, args.duration))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("scenarios: interrupted; child processes stopped", file=sys.stderr)
        return 130
    if args.output is not None:
        meta = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "duration_override_s": args.duration,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        write_results(args.output, results, meta)
        print(f"\nfigures written to {args.output}")
    broken = [r.name for r in results if r.error]
    failed = [r.name for r in results if not r.passed and not r.error]
    summary = f"\nscenarios: {len(results) - len(failed) - len(broken)} of {len(results)} met every target"
    summary += f"; missed a target: {', '.join(failed)}" if failed else ""
    summary += f"; could not run: {', '.join(broken)}" if broken else ""
    print(summary)
    return 2 if broken else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
