"""``laneway up --workers auto`` end to end (issue 18): the stack comes up with the
autoscaler as a child, which starts the pool's ``min`` worker; a job submitted
through the broker is called at the fake provider over HTTP and succeeds; SIGTERM
stops ``up``, and every process it started, the autoscaler's workers included, is
gone when it has exited (no orphan keeps pulling jobs or holding ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import laneway
from laneway.broker.cli.natsd import free_port
from laneway.v1 import job_pb2
from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings
from tests.cli_process import ROOT
from tests.conftest import eventually

CONFIG = """
queue: {{ack_wait_s: 5}}
workers: {{shutdown_grace_s: 2}}
providers:
  paced: {{type: openai, base_url: "{base_url}", api_key_env: "", concurrency: 2}}
routes:
  chat: {{targets: [{{provider: paced, model: fake-chat}}]}}
autoscale:
  interval_s: 0.3
  pools:
    paced: {{min: 1, max: 2, idle_s: 60}}
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderSettings(latency_ms=10), seed=5) as server:
        yield server


def _descendants(root: int) -> dict[int, str]:
    """Every live process below ``root`` (pid: command line), from /proc."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue  # exited, not yet reaped: nothing runs
        parents[int(entry.name)] = int(fields[1])
        commands[int(entry.name)] = cmdline.strip()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands[pid]
                frontier.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_up_with_autoscaled_workers_runs_a_job_and_leaves_no_orphans(
    tmp_path: Path, fake: FakeProvider
) -> None:
    config = tmp_path / "laneway.yaml"
    config.write_text(CONFIG.format(base_url=fake.base_url))
    addr = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up", "--workers", "auto",
        "--config", str(config), "--grpc-addr", addr, "--nats-port", str(free_port()),
        "--data-dir", str(tmp_path / "data"), "--metrics-port", "0",
        cwd=ROOT, env=os.environ.copy(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # on a failure, its children go with the group
    )  # fmt: skip
    seen: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C stops everything."), 60)).decode()
        assert "autoscaled workers" in banner

        def workers() -> dict[int, str]:
            return {p: c for p, c in _descendants(proc.pid).items() if " worker " in f"{c} "}

        async def min_workers_running() -> bool:
            return len(workers()) >= 1

        # The autoscaler starts the pool's min (1) on its own, without any load.
        await eventually(min_workers_running, timeout=30, interval=0.1)
        async with laneway.AsyncClient(addr, timeout=30) as client:
            final = await client.run("chat", laneway.chat("autoscaled"), timeout=30)
        assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final
        assert final.result.chat.text
        called = [
            str(r.json["messages"][0]["content"]) for r in fake.requests if r.path.endswith("/completions")
        ]
        assert "autoscaled" in called, called  # over HTTP, by a worker the autoscaler started
        seen = _descendants(proc.pid)
        kinds = " ".join(seen.values())
        assert " broker" in kinds and " autoscale" in kinds and " worker" in kinds, seen
        assert len(workers()) <= 2, workers()  # the pool's max

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert code == 0, err.decode()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Whatever the outcome, nothing this test started may outlive it.
        for pid in seen:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    orphans = {pid: cmd for pid, cmd in seen.items() if _alive(pid)}
    assert not orphans, f"still running after `laneway up` exited: {orphans}"


async def test_sigterm_during_start_up_stops_every_child(tmp_path: Path, fake: FakeProvider) -> None:
    """A SIGTERM before `up` has announced the stack (a supervisor giving up on a slow
    start, `docker stop`) stops what was started so far, rather than `up` alone."""
    config = tmp_path / "laneway.yaml"
    config.write_text(CONFIG.format(base_url=fake.base_url))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "up", "--workers", "auto",
        "--config", str(config), "--grpc-addr", f"127.0.0.1:{free_port()}", "--nats-port", str(free_port()),
        "--data-dir", str(tmp_path / "data"), "--metrics-port", "0",
        cwd=ROOT, env=os.environ.copy(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    seen: dict[int, str] = {}
    try:

        async def children_started() -> bool:
            seen.update(_descendants(proc.pid))
            # The broker and the autoscaler exist; neither has reported ready yet, or
            # only just: either way the banner is not out.
            kinds = " ".join(seen.values())
            return " broker" in kinds and " autoscale" in kinds

        await eventually(children_started, timeout=30, interval=0.02)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert code == 0, err.decode()
        assert b"Laneway is up" not in out
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        leftover = {pid for pid in seen if _alive(pid)}
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not leftover, f"still running after `laneway up` exited: {[seen[p] for p in leftover]}"
