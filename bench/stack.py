"""Child processes of a bench phase: start, wait until ready, stop.

A ``Workspace`` owns a temp dir, an optional embedded nats-server and child
processes whose stdout/stderr go to log files there. Leaving it stops every child
(SIGTERM, then SIGKILL after a timeout) and removes the dir; on failure it first
prints the tail of every log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc

import laneway
from bench.procstat import child_pid
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.config.model import load_config
from laneway.broker.core import topology as topo
from laneway.v1 import job_pb2

__all__ = [
    "REPO",
    "BenchError",
    "Child",
    "Workspace",
    "diagnose",
    "start_stack",
    "wait_grpc_health",
    "wait_pull_waiting",
    "wait_stream_empty",
]

REPO = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """The bench could not run a phase (as opposed to a job failing)."""


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _problems(path: Path, lines: int = 30) -> str:
    """The [WRN] and [ERR] lines of a nats-server log (its tail is mostly the start banner)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    found = [line for line in text.splitlines() if "[WRN]" in line or "[ERR]" in line or "[FTL]" in line]
    return "\n".join(found[-lines:]) or "(none)"


class Child:
    """A child process with its output in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self._proc: asyncio.subprocess.Process | None = None

    def _open_log(self) -> IO[bytes]:
        self._log = self.log_path.open("ab")
        return self._log

    async def start(self) -> None:
        log = self._open_log()
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.returncode is not None:
            raise BenchError(f"{self.name} exited with status {self._proc.returncode}")

    async def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    print(
                        f"bench: {self.name} ignored SIGTERM for {timeout:.0f}s; killing it\n{self.tail()}",
                        file=sys.stderr,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)


class Workspace:
    """``async with Workspace("name") as ws``: temp dir, nats-server, children; all cleaned up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"laneway-bench-{name}-"))
        self.children: list[Child] = []
        self.nats: EmbeddedNats | None = None
        self.failed = False
        """Set when a phase lost jobs: logs are printed on exit."""

    async def __aenter__(self) -> Workspace:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.failed or (e is not None and not isinstance(e, asyncio.CancelledError | KeyboardInterrupt)):
            print(self.tails(), file=sys.stderr)
        await self.close()

    async def start_nats(self) -> EmbeddedNats:
        self.nats = EmbeddedNats(self.dir / "nats", log_file=self.dir / "nats-server.log")
        await self.nats.start()
        return self.nats

    @property
    def nats_pid(self) -> int | None:
        return child_pid("nats-server") if self.nats is not None else None

    async def spawn(self, name: str, argv: Sequence[str]) -> Child:
        child = Child(name, argv, self.dir / f"{name}.log")
        self.children.append(child)
        await child.start()
        return child

    def tails(self, lines: int = 30) -> str:
        parts = [
            f"--- {c.name} ({c.log_path}), last {lines} lines ---\n{c.tail(lines)}" for c in self.children
        ]
        if self.nats is not None:
            parts.append(
                f"--- nats-server, last {lines} lines ---\n{_tail(self.dir / 'nats-server.log', lines)}"
            )
        return "\n".join(parts)

    async def close(self) -> None:
        try:
            for child in reversed(self.children):
                await child.stop()
            if self.nats is not None:
                await self.nats.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


async def wait_grpc_health(addr: str, child: Child, timeout: float = 30.0) -> None:
    """Poll the standard gRPC health service until SERVING, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            child.check_alive()
            with contextlib.suppress(grpc.RpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)  # poll interval under a deadline
    raise BenchError(f"{child.name} did not report SERVING on {addr} within {timeout:.0f}s")


async def wait_pull_waiting(js: Any, stream: str, consumer: str, child: Child, timeout: float = 30.0) -> None:
    """Wait until a worker has a pull request waiting on ``consumer``: it is ready for work."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        child.check_alive()
        with contextlib.suppress(Exception):
            info = await js.consumer_info(stream, consumer)
            if (info.num_waiting or 0) > 0:
                return
        await asyncio.sleep(0.05)  # poll interval under a deadline
    raise BenchError(f"{child.name} did not pull from {stream}/{consumer} within {timeout:.0f}s")


async def wait_stream_empty(js: Any, stream: str, timeout: float = 10.0) -> int:
    """Messages left on a work-queue stream once acks have landed (0: every job was acked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = int((await js.stream_info(stream)).state.messages)
        if left == 0 or loop.time() >= deadline:
            return left
        await asyncio.sleep(0.1)  # acks are applied asynchronously: poll under a deadline


async def start_stack(ws: Workspace, config_body: str, route: str) -> tuple[str, Any, dict[str, int | None]]:
    """Start nats, broker and worker on ``config_body`` (a config without its
    ``broker`` section); return the broker address, a NATS connection and pids."""
    server = await ws.start_nats()
    port = free_port()
    addr = f"127.0.0.1:{port}"
    config = ws.dir / "laneway.yaml"
    config.write_text(f'broker:\n  grpc_addr: "{addr}"\n' + config_body)
    load_config(config)  # fail here, with the config error, rather than in a child
    cli = [sys.executable, "-m", "laneway.broker.cli"]
    common = ["--config", str(config), "--nats-url", server.url]
    broker = await ws.spawn("broker", [*cli, "broker", *common, "--grpc-addr", addr])
    await wait_grpc_health(addr, broker)
    # The broker created the topology; the worker only checks it.
    worker = await ws.spawn("worker", [*cli, "worker", *common])
    nc = await nats.connect(server.url, name="bench-observer")
    try:
        await wait_pull_waiting(nc.jetstream(), topo.JOBS_STREAM, topo.consumer_name(route, "normal"), worker)
    except BaseException:
        await nc.close()
        raise
    pids = {"bench": os.getpid(), "nats-server": ws.nats_pid, "broker": broker.pid, "worker": worker.pid}
    return addr, nc, pids


async def diagnose(client: laneway.AsyncClient, job_id: str, why: str) -> str:
    """Why a job has no final event in its stream, with its state according to GetJob."""
    try:
        state = job_pb2.JobState.Name((await client.get_job(job_id)).state)
    except Exception as err:
        state = f"GetJob failed: {type(err).__name__}"
    return f"{why} (GetJob says {state})"
