"""Chaos: steady load while one part of the stack fails, and the promises checked.

Each scenario runs about 16 s of load at 25 jobs/s against nats-server, a broker and
two workers as separate processes, strikes once, and then counts (``load.account``):
a refused Submit never runs, every accepted job ends exactly once, a finished job
is never called again, every stream sees its job's final event, and the processes
write JSON log lines only. The counts are printed (``-s`` shows them).
"""

from __future__ import annotations

import json
from pathlib import Path

import laneway
from tests.stack import Stack

from .load import Load, Report, account

RATE = 25.0


def _client(stack: Stack) -> laneway.AsyncClient:
    # Streams resume across a broker restart by themselves (the client's resume_timeout).
    return laneway.AsyncClient(stack.address, timeout=30)


def _check(name: str, report: Report) -> None:
    print(f"chaos {name}: {json.dumps(report.as_dict())}")
    assert report.accepted > 0
    assert report.refused_that_ran == 0, report.examples
    assert report.stuck == 0, report.examples
    assert report.more_than_one_final == 0, report.examples
    assert report.calls_after_final == 0, report.examples
    assert report.streams_missed_final == 0, report.examples
    assert report.non_json_log_lines == 0, report.examples


async def test_worker_killed_under_load(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack, _client(stack) as client, Load(client, rate=RATE) as load:
        await load.until(125)
        await stack.kill_worker(0)
        await load.until(200)
        await stack.start_worker(0)
        await load.until(400)
        await load.stop()
        report = await account(stack, load)
    _check("worker kill -9", report)
    assert report.refused == 0 and report.lost == 0


async def test_broker_killed_with_streams_open(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack, _client(stack) as client, Load(client, rate=RATE) as load:
        await load.until(125)
        assert load.streams > 0
        await stack.kill_broker()
        await stack.start_broker()
        await load.until(400)
        await load.stop()
        report = await account(stack, load)
    _check("broker kill -9", report)


async def test_nats_killed_and_restarted(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack, _client(stack) as client, Load(client, rate=RATE) as load:
        await load.until(125)
        await stack.nats.kill()
        await load.until(175)  # down for about two seconds of load
        await stack.nats.start()
        await load.until(400)
        await load.stop()
        report = await account(stack, load)
    _check("nats-server kill -9", report)


async def test_nats_frozen_for_ten_seconds(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack, _client(stack) as client, Load(client, rate=RATE) as load:
        await load.until(125)
        stack.freeze_nats()
        try:
            await load.until(125 + int(10 * RATE))  # ten seconds of load
        finally:
            stack.thaw_nats()
        await load.until(500)
        await load.stop()
        report = await account(stack, load)
    _check("nats-server SIGSTOP 10 s", report)
