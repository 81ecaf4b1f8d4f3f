"""Shared fixtures: a real nats-server per test (free port, temp store), the
broker on a free loopback port, worker pools, clients. No mocks of NATS or gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig, parse_config
from laneway.broker.server.process import BrokerServer
from laneway.workers.pool import WorkerPool

TEST_CONFIG = """
broker:
  grpc_addr: "127.0.0.1:0"
queue:
  ack_wait_s: 2
workers:
  retry_backoff_s: 0.05
  retry_backoff_max_s: 0.2
  shutdown_grace_s: 2
providers:
  mock:
    type: mock
    concurrency: 8
  slow:
    type: mock
    concurrency: 4
    latency_ms: 300
routes:
  chat:
    targets: [{provider: mock, model: mock-chat}]
  embed:
    targets: [{provider: mock, model: mock-embedding}]
  slow:
    targets: [{provider: slow, model: mock-chat}]
"""


def make_config(extra: str = "", base: str = TEST_CONFIG) -> LanewayConfig:
    """The test config; ``extra`` YAML is merged over it key by key (top-level blocks replaced)."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    data: dict[str, Any] = yaml.load(base)
    if extra:
        for key, value in yaml.load(extra).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    import io

    buf = io.StringIO()
    YAML().dump(data, buf)
    return parse_config(buf.getvalue(), source="<test config>")


@pytest.fixture
def config() -> LanewayConfig:
    return make_config()


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def broker(nats_server: EmbeddedNats, config: LanewayConfig) -> AsyncIterator[BrokerServer]:
    async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b:
        yield b


@pytest.fixture
async def worker(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> AsyncIterator[WorkerPool]:
    async with WorkerPool(config, nats_url=nats_server.url) as pool:
        yield pool


@pytest.fixture
async def client(broker: BrokerServer) -> AsyncIterator[laneway.AsyncClient]:
    async with laneway.AsyncClient(broker.address, timeout=10) as c:
        yield c


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``check`` until true or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
