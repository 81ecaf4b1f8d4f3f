"""What the fuzzer runs against: nats-server, a broker and a worker (mock provider),
each its own process, so the broker's memory is measured alone."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from laneway.broker.cli.natsd import EmbeddedNats, free_port

__all__ = ["CONFIG", "FuzzStack"]

CONFIG = """
broker:
  grpc_addr: "127.0.0.1:0"
queue:
  ack_wait_s: 2
workers:
  retry_backoff_s: 0.05
  retry_backoff_max_s: 0.2
  shutdown_grace_s: 1
providers:
  mock:
    type: mock
    concurrency: 16
routes:
  chat:
    targets: [{provider: mock, model: mock-chat}]
  embed:
    targets: [{provider: mock, model: mock-embedding}]
"""
_START_TIMEOUT_S = 30.0


class FuzzStack:
    """``async with FuzzStack(dir) as stack``: ``stack.address`` serves BrokerService."""

    def __init__(self, workdir: Path) -> None:
        self._dir = workdir
        self._nats = EmbeddedNats(workdir / "nats")
        self._procs: list[asyncio.subprocess.Process] = []
        self.address = ""
        self.broker_log = workdir / "broker.log"

    async def __aenter__(self) -> FuzzStack:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        await self._nats.start()
        config = self._dir / "laneway.yaml"
        config.write_text(CONFIG)
        self.address = f"127.0.0.1:{free_port()}"
        common = ["--config", str(config), "--nats-url", self._nats.url]
        broker = [*common, "--grpc-addr", self.address]
        for role, args, log in (
            ("broker", broker, self.broker_log),
            ("worker", common, self._dir / "worker.log"),
        ):
            with log.open("wb") as out:
                self._procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "laneway.broker.cli",
                        role,
                        *args,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                    )
                )
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not await self.serving():
                if self._procs[0].returncode is not None:
                    raise RuntimeError(f"broker exited: {self.broker_log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)  # polling a child process's start, with a deadline

    @property
    def broker_pid(self) -> int:
        return self._procs[0].pid

    def broker_rss(self) -> int:
        """The broker process's resident memory, in bytes."""
        for line in Path(f"/proc/{self.broker_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return all(p.returncode is None for p in self._procs)

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

    async def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        self._procs.clear()
        await self._nats.stop()
