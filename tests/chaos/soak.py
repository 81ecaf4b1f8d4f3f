"""The long soak (``make soak``, not in CI): 20,000 jobs at a steady rate while a
worker is killed (SIGKILL) every 10 s and the broker twice, then the same counts
as the chaos tests. Exits 1 when a promise was broken.

    .venv/bin/python -m tests.chaos.soak [--jobs 20000] [--rate 80] [--workers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import laneway
from tests.stack import Stack

from .load import Load, Report, account

__all__ = ["main", "soak"]


async def _kill_workers(stack: Stack, workers: int, every_s: float) -> None:
    n = 0
    while True:
        await asyncio.sleep(every_s)  # the fault schedule, not synchronisation
        i = n % workers
        await stack.kill_worker(i)
        await stack.start_worker(i)
        n += 1


async def soak(root: Path, *, jobs: int, rate: float, workers: int) -> Report:
    async with (
        Stack(root, workers=workers) as stack,
        laneway.AsyncClient(stack.address, timeout=30) as client,
        Load(client, rate=rate, prefix="soak") as load,
    ):
        killer = asyncio.create_task(_kill_workers(stack, workers, 10.0), name="soak-killer")
        try:
            for share in (1, 2):
                await load.until(jobs * share // 3)
                await stack.kill_broker()
                await stack.start_broker()
                print(f"soak: broker restarted after {jobs * share // 3} jobs", file=sys.stderr)
            await load.until(jobs)
            await load.stop()
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
        for i in range(workers):  # every worker up for the last jobs
            if stack.worker_down(i):
                await stack.start_worker(i)
        return await account(stack, load, settle_s=180.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=80.0)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="laneway-soak-") as tmp:
        report = asyncio.run(soak(Path(tmp), jobs=args.jobs, rate=args.rate, workers=args.workers))
    print(json.dumps(report.as_dict(), indent=2))
    broken = (
        report.refused_that_ran
        or report.stuck
        or report.more_than_one_final
        or report.calls_after_final
        or report.streams_missed_final
        or report.non_json_log_lines
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
