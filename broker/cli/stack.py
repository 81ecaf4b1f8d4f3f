"""``laneway up``: the whole stack on one machine, as separate processes.

An embedded nats-server (unless a URL is given), one broker process and N
worker processes: the same parts a multi-machine deployment runs, so what works
here works there. Ctrl-C (or SIGTERM) stops the children gracefully, then NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.nats.connection import connect_nats
from laneway.errors import TopologyError

__all__ = ["run_stack"]

log = structlog.get_logger("laneway.up")

_DEFAULT_NATS_PORT = 4222


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _wait_serving(addr: str, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise TopologyError(f"broker exited with status {proc.returncode} during start-up")
            with contextlib.suppress(grpc.RpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)  # poll with a deadline
    raise TopologyError(f"broker did not become ready on {addr} within {timeout:.0f}s")


async def run_stack(
    config: LanewayConfig,
    *,
    config_path: Path | None,
    nats_url: str,
    grpc_addr: str,
    data_dir: Path,
    workers: int,
    metrics_port: int = 0,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if not nats_url:
            port = _DEFAULT_NATS_PORT if _port_free(_DEFAULT_NATS_PORT) else free_port()
            natsd = await stack.enter_async_context(EmbeddedNats(data_dir / "nats", port=port))
            nats_url = natsd.url
            log.info("embedded nats-server started", url=nats_url, store_dir=str(natsd.store_dir))
        # Create the topology once here, so the children never race to create it.
        nc = await connect_nats(nats_url, name="laneway-up", connect_timeout=config.nats.connect_timeout_s)
        try:
            await t.ensure_topology(nc.jetstream(), t.TopologySettings.from_config(config))
        finally:
            await nc.close()

        base = [sys.executable, "-m", "laneway.broker.cli"]
        common = ["--nats-url", nats_url, *(["--config", str(config_path)] if config_path else [])]
        children: list[asyncio.subprocess.Process] = []
        stack.push_async_callback(_stop_children, children, config.workers.shutdown_grace_s + 5)
        if config.fake_provider is not None:
            children.append(await _start_fake_provider(base, config))
        ports = _metrics_ports(metrics_port, 1 + workers)
        metrics = [["--metrics-port", str(p)] if p else [] for p in ports]
        broker_proc = await asyncio.create_subprocess_exec(
            *base, "broker", *common, "--grpc-addr", grpc_addr, *metrics[0]
        )
        children.append(broker_proc)
        for i in range(workers):
            children.append(await asyncio.create_subprocess_exec(*base, "worker", *common, *metrics[1 + i]))
        await _wait_serving(grpc_addr, broker_proc)
        route = next(iter(config.routes))
        print(
            f"\nLaneway is up: broker on {grpc_addr}, NATS at {nats_url}, {workers} worker process(es).\n"
            + (
                f"Metrics: http://127.0.0.1:{ports[0]}/metrics (broker), "
                + ", ".join(f"http://127.0.0.1:{p}/metrics" for p in ports[1:])
                + " (workers).\n"
                if metrics_port
                else ""
            )
            + f"Try:  laneway submit --route {route} --priority high --text hello --wait\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        await _until_stop(children)


def _metrics_ports(first: int, count: int) -> list[int]:
    """``count`` free loopback ports from ``first`` up (all 0 when metrics are off)."""
    if not first:
        return [0] * count
    ports: list[int] = []
    port = first
    while len(ports) < count and port <= 65535:
        if _port_free(port):
            ports.append(port)
        port += 1
    return ports + [0] * (count - len(ports))


async def _start_fake_provider(base: list[str], config: LanewayConfig) -> asyncio.subprocess.Process:
    """``laneway fake-provider`` for the config's openai-type providers, ready to answer."""
    fake = config.fake_provider
    assert fake is not None
    args = [
        "fake-provider", "--port", str(fake.port), "--rpm", str(fake.rpm), "--tpm", str(fake.tpm),
        "--latency-ms", str(fake.latency_ms), "--latency-jitter-ms", str(fake.latency_jitter_ms),
        "--token-delay-ms", str(fake.token_delay_ms),
        *(a for status, rate in fake.error_rates.items() for a in ("--error-rate", f"{status}={rate}")),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*base, *args, stdout=asyncio.subprocess.DEVNULL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while loop.time() < deadline:
        if proc.returncode is not None:
            raise TopologyError(
                f"fake-provider exited with status {proc.returncode} (port {fake.port} in use?)"
            )
        with contextlib.suppress(OSError):
            _reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
            writer.close()
            await writer.wait_closed()
            log.info("fake provider started", base_url=f"http://127.0.0.1:{fake.port}/v1")
            return proc
        await asyncio.sleep(0.1)  # poll with a deadline
    proc.kill()
    await proc.wait()
    raise TopologyError(f"fake-provider did not listen on port {fake.port} within 30s")


async def _until_stop(children: list[asyncio.subprocess.Process]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(p.wait()) for p in children]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            log.error("a child process exited; stopping the stack")
    finally:
        for task in [stopper, *waits]:
            task.cancel()
        await asyncio.gather(stopper, *waits, return_exceptions=True)


async def _stop_children(children: list[asyncio.subprocess.Process], timeout: float) -> None:
    for proc in children:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in children:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
