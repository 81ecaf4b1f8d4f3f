"""``laneway up``: the whole stack on one machine, as separate processes.

An embedded nats-server (unless a URL is given), one broker process and N
worker processes: the same parts a multi-machine deployment runs, so what works
here works there. Ctrl-C (or SIGTERM) stops the children gracefully, then NATS.
``up`` announces the stack once every part serves; a part that fails at start-up or
exits later stops the stack, and ``up`` exits non-zero naming it and its error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Literal

import structlog

from laneway.broker.cli.nats_flags import NatsFlags
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.cli.ready import Child, spawn, stop_children, stop_on_signals, until_one_exits
from laneway.broker.cli.server_tls import UpTls
from laneway.broker.cli.up_gateway import plan_gateway
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.errors import TopologyError
from laneway.broker.core.nats.connection import connect_nats
from laneway.broker.core.redact import redact_url

__all__ = ["run_stack"]

log = structlog.get_logger("laneway.up")

_DEFAULT_NATS_PORT = 4222
_START_TIMEOUT_S = 60.0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _embedded_port(flag: int | None, config: LanewayConfig) -> int:
    """The embedded nats-server's port: ``--nats-port``, else ``nats.embedded_port``, else
    4222 when free and any free port when not. A chosen port that is taken is an error:
    silently moving would leave clients configured for it talking to nothing."""
    chosen, key = (
        (flag, "--nats-port") if flag is not None else (config.nats.embedded_port, "nats.embedded_port")
    )
    if chosen is None:
        return _DEFAULT_NATS_PORT if _port_free(_DEFAULT_NATS_PORT) else free_port()
    if chosen and not _port_free(chosen):
        raise TopologyError(
            f"{key}: port {chosen} is in use on 127.0.0.1 (choose another, or leave it unset for a free one)"
        )
    return chosen or free_port()


async def run_stack(
    config: LanewayConfig,
    *,
    config_path: Path | None,
    nats_url: str,
    grpc_addr: str,
    data_dir: Path,
    workers: int | Literal["auto"],
    metrics_port: int = 0,
    nats_port: int | None = None,
    nats_flags: NatsFlags | None = None,
    tls: UpTls | None = None,
    insecure: bool = False,
) -> None:
    if nats_url and nats_port is not None:
        raise TopologyError(
            f"--nats-port: a NATS URL was given ({redact_url(nats_url)}), so no embedded nats-server "
            "is started; leave out --nats-port, or the URL (--nats-url, NATS_URL, nats.url)"
        )
    # First of all: a SIGTERM during start-up must stop what was started so far, not
    # kill `up` alone and leave its children running (SIGINT would raise here, SIGTERM not).
    stop = stop_on_signals()
    async with contextlib.AsyncExitStack() as stack:
        if not nats_url:
            port = _embedded_port(nats_port, config)
            natsd = await stack.enter_async_context(EmbeddedNats(data_dir / "nats", port=port))
            nats_url = natsd.url
            log.info("embedded nats-server started", url=nats_url, store_dir=str(natsd.store_dir))
        # Create the topology once here, so the children never race to create it.
        nc = await connect_nats(
            nats_url,
            name="laneway-up",
            connect_timeout=config.nats.connect_timeout_s,
            auth=config.nats.credentials.auth(),
        )
        try:
            await t.ensure_topology(nc.jetstream(), t.TopologySettings.from_config(config))
        finally:
            await nc.close()

        # The URL goes in the environment, not on the command line, where `ps` shows
        # its password to every user of the machine.
        # So are the --nats-* secrets (the other --nats-* flags name files and a user).
        nats_flags = nats_flags or NatsFlags()
        env = {**os.environ, **nats_flags.child_env(), "NATS_URL": nats_url}
        common = ["--config", str(config_path)] if config_path else []
        common += nats_flags.child_args()
        children: list[Child] = []
        stack.push_async_callback(stop_children, children, config.workers.shutdown_grace_s + 5)
        if config.fake_provider is not None:
            children.append(await _start_fake_provider(config, env))
        auto = workers == "auto"
        count = 0 if workers == "auto" else workers  # autoscaled workers serve no metrics port
        ports = _metrics_ports(metrics_port, 1 + count)
        metrics = [["--metrics-port", str(p)] if p else [] for p in ports]
        broker_args = [*(tls.broker_args if tls else []), *(["--insecure"] if insecure else [])]
        children.append(
            await spawn(
                "broker", ["broker", *common, "--grpc-addr", grpc_addr, *metrics[0], *broker_args], env=env
            )
        )
        for i in range(count):
            children.append(await spawn(f"worker {i + 1}", ["worker", *common, *metrics[1 + i]], env=env))
        if auto:  # issue 18: the autoscaler process starts and stops the workers
            children.append(await spawn("autoscaler", ["autoscale", *common], env=env))
        if config.webhooks.enabled:  # signed webhooks: their delivery process (broker/webhooks/)
            children.append(await spawn("webhooks", ["webhooks", "serve", *common], env=env))
        gateway = plan_gateway(config, grpc_addr, tls, insecure=insecure)
        if gateway is not None:
            config_args = ["--config", str(config_path)] if config_path else []
            children.append(await spawn("gateway", [*gateway.args, *config_args], env=env))
        if not await _until_ready(children, stop):
            log.info("stopped during start-up")
            return  # the exit stack stops every child started so far, then NATS
        route = next(iter(config.routes))
        print(
            f"\nLaneway is up: broker on {grpc_addr}, NATS at {redact_url(nats_url)}, "
            + ("autoscaled workers.\n" if auto else f"{workers} worker process(es).\n")
            + (
                f"Metrics: http://127.0.0.1:{ports[0]}/metrics (broker), "
                + ", ".join(f"http://127.0.0.1:{p}/metrics" for p in ports[1:])
                + (" (workers).\n" if ports[1:] else "\n")
                if metrics_port
                else ""
            )
            + (f"HTTP gateway: {gateway.url} (API: {gateway.url}/openapi.json).\n" if gateway else "")
            + (tls.note if tls else "")
            + f"Try:  laneway submit --route {route} --priority high --text hello --wait"
            + (f" {tls.client_args}" if tls else "")
            + "\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        await until_one_exits(children, stop)


async def _until_ready(children: list[Child], stop: asyncio.Event) -> bool:
    """Every child has reported it serves (True), or a signal came first (False); a
    child that failed to start raises, naming it."""

    async def all_ready() -> None:
        for child in children:
            await child.wait_ready(_START_TIMEOUT_S)

    ready = asyncio.ensure_future(all_ready())
    signalled = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({ready, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ready, signalled):
            task.cancel()
        await asyncio.gather(ready, signalled, return_exceptions=True)
    if stop.is_set():
        return False
    ready.result()  # a start-up failure, by name
    return True


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


async def _start_fake_provider(config: LanewayConfig, env: dict[str, str]) -> Child:
    """``laneway fake-provider`` for the config's openai-type providers, ready to answer."""
    fake = config.fake_provider
    assert fake is not None
    args = [
        "fake-provider", "--port", str(fake.port), "--rpm", str(fake.rpm), "--tpm", str(fake.tpm),
        "--latency-ms", str(fake.latency_ms), "--latency-jitter-ms", str(fake.latency_jitter_ms),
        "--token-delay-ms", str(fake.token_delay_ms),
        *(a for status, rate in fake.error_rates.items() for a in ("--error-rate", f"{status}={rate}")),
    ]  # fmt: skip
    child = await spawn("fake-provider", args, env=env, ready_pipe=False, quiet=True)
    proc = child.proc
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
            return child
        await asyncio.sleep(0.1)  # poll with a deadline
    proc.kill()
    await proc.wait()
    raise TopologyError(f"fake-provider did not listen on port {fake.port} within 30s")
