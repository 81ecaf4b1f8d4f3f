"""The whole stack as separate processes, for the tests that need each one on its own:
the chaos suite (a fault hits one at a time) and the fuzzer (the broker's memory
measured alone).

nats-server (``EmbeddedNats``: its store and port survive a kill), one broker and
some workers, each a ``python -m laneway.broker.cli`` child whose stderr goes to
a file, so its log lines can be checked afterwards. Faults are real signals:
SIGKILL for a crash, SIGSTOP/SIGCONT for a freeze.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import laneway
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from tests.cluster import Cluster

__all__ = ["CHAOS_CONFIG", "Stack"]

# The mock provider logs every call (one JSON line, with its start time) to count
# calls per job; its latency keeps a few dozen calls running when a fault strikes.
# The lease is the default one (queue.ack_wait_s), which is what a killed worker costs.
CHAOS_CONFIG = """\
broker:
  grpc_addr: "127.0.0.1:0"
workers:
  retry_backoff_s: 0.1
  retry_backoff_max_s: 1
  shutdown_grace_s: 2
  max_attempts: 5
providers:
  mock:
    type: mock
    concurrency: 16
    latency_ms: 150
    latency_jitter_ms: 100
    call_log: "{call_log}"
routes:
  chat:
    targets: [{{provider: mock, model: mock-chat}}]
"""


class Stack:
    """``async with Stack(tmp_path, workers=2) as stack``: everything up, torn down on exit."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 2,
        config: str = CHAOS_CONFIG,
        client_tls: dict[str, bytes] | None = None,
        nats: EmbeddedNats | Cluster | None = None,
    ) -> None:
        self.root = root
        #: AsyncClient TLS arguments (root_certificates, ...) when the config gives the broker TLS.
        self.client_tls = client_tls or {}
        self.call_log = root / "calls.jsonl"
        self.config_file = root / "laneway.yaml"
        self.config_file.write_text(config.format(call_log=self.call_log))
        # One server unless given a cluster (``tests.cluster``: its url lists every node).
        self.nats = nats if nats is not None else EmbeddedNats(root / "nats")
        self.grpc_port = free_port()
        self._broker: asyncio.subprocess.Process | None = None
        #: The log file of the broker started last.
        self.broker_log = root / "broker-0.log"
        self._workers: list[asyncio.subprocess.Process | None] = [None] * workers
        self._spawned = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def __aenter__(self) -> Stack:
        await self.nats.start()
        try:
            await self.start_broker()
            for i in range(len(self._workers)):
                await self.start_worker(i)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for i, proc in enumerate(self._workers):
            self._workers[i] = None
            await _stop(proc)
        broker, self._broker = self._broker, None
        await _stop(broker)
        await self.nats.stop()

    async def _spawn(self, kind: str, *args: str) -> asyncio.subprocess.Process:
        self._spawned += 1
        log = self.root / f"{kind}-{self._spawned}.log"
        if kind == "broker":
            self.broker_log = log
        # The child writes its log lines to the file; ours is closed once it is spawned.
        stderr = log.open("wb")
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "laneway.broker.cli", kind,
                "--config", str(self.config_file), "--nats-url", self.nats.url, *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                env={**os.environ, "LANEWAY_LOG_LEVEL": "info"},
            )  # fmt: skip
        finally:
            stderr.close()

    async def start_broker(self, within: float = 40) -> None:
        """Start a broker on the stack's address and return once it serves; on failure
        (it exited, or did not serve ``within`` seconds) the error carries its log's tail."""
        broker = self._broker = await self._spawn("broker", "--grpc-addr", self.address)
        last: BaseException | None = None
        # Serving once a read answers (GetStats goes through to NATS).
        async with laneway.AsyncClient(self.address, timeout=2, **self.client_tls) as client:
            try:
                async with asyncio.timeout(within):
                    while broker.returncode is None:
                        try:
                            await client.get_stats()
                            return
                        except laneway.ApiError as err:
                            last = err
                        await asyncio.sleep(0.1)  # poll with a deadline: the child is starting
            except TimeoutError:
                pass
        state = f"exited {broker.returncode}" if broker.returncode is not None else "still running"
        raise RuntimeError(
            f"the broker (pid {broker.pid}, {state}) did not serve on {self.address} within {within} s; "
            f"last answer: {last!r}; its log ends:\n{self.log_tail(self.broker_log)}"
        )

    @staticmethod
    def log_tail(path: Path, lines: int = 30) -> str:
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def kill_broker(self) -> None:
        broker, self._broker = self._broker, None
        await _kill(broker)

    async def start_worker(self, i: int, *, within: float = 40) -> None:
        """Start worker ``i`` and return once it pulls (its log says so): a fault
        injected before a slow start-up would otherwise meet a worker still connecting.
        On failure the error carries its log's tail."""
        proc = self._workers[i] = await self._spawn("worker")
        log = self.root / f"worker-{self._spawned}.log"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while proc.returncode is None and loop.time() < deadline:
            if log.exists() and "worker pulling" in log.read_text(errors="replace"):
                return
            await asyncio.sleep(0.05)  # poll with a deadline: the child is starting
        state = f"exited {proc.returncode}" if proc.returncode is not None else "still running"
        raise RuntimeError(
            f"worker {i} (pid {proc.pid}, {state}) did not start pulling within {within} s; "
            f"its log ends:\n{self.log_tail(log)}"
        )

    def worker_down(self, i: int) -> bool:
        return self._workers[i] is None

    async def kill_worker(self, i: int) -> None:
        proc, self._workers[i] = self._workers[i], None
        await _kill(proc)

    @property
    def broker_pid(self) -> int:
        assert self._broker is not None
        return self._broker.pid

    def broker_rss(self) -> int:
        """The broker process's resident memory, in bytes."""
        for line in Path(f"/proc/{self.broker_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        """Whether the broker and every worker are still running."""
        procs = [self._broker, *self._workers]
        return all(p is not None and p.returncode is None for p in procs)

    async def serving(self) -> bool:
        """Whether the broker answers its health check with SERVING."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="laneway.v1.BrokerService"), timeout=2
                )
            except grpc.RpcError:
                return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def freeze_nats(self) -> None:
        assert self.nats.pid is not None
        os.kill(self.nats.pid, signal.SIGSTOP)

    def thaw_nats(self) -> None:
        assert self.nats.pid is not None
        os.kill(self.nats.pid, signal.SIGCONT)

    def calls(self) -> list[dict[str, object]]:
        """Every provider call so far: job_id, attempt, input, t (its start, Unix time)."""
        if not self.call_log.exists():
            return []
        lines = self.call_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def log_problems(self) -> list[str]:
        """Lines of the brokers' and workers' logs that are not JSON (a traceback, or
        "Future exception was never retrieved"): the log format is JSON lines only."""
        bad: list[str] = []
        for path in sorted(self.root.glob("*-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError:
                    bad.append(f"{path.name}: {line[:200]}")
        return bad


async def _kill(proc: asyncio.subprocess.Process | None) -> None:
    if proc is not None and proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _stop(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
