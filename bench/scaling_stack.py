"""A stack of several processes for the sizing guide: one nats-server or a 3-node
cluster, B broker processes and W worker processes on one config.

``bench/stack.py`` starts one broker and one worker; the sizing figures need CPU per
process kind as the counts change, so this starts any number of each, names every
pid (``broker1``, ``worker2``, ``nats3``, ...) for ``CpuMeter`` and sums them back
per kind. The cluster is ``tests/cluster.py``'s launcher, imported only when asked
for, so the single-server cells run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from bench.laneway_bench import CONFIG
from bench.settings import ROUTE
from bench.stack import BenchError, Child, Workspace, wait_grpc_health
from laneway.broker.cli.natsd import free_port
from laneway.broker.config.model import load_config
from laneway.broker.core import topology as topo

__all__ = ["KINDS", "ScalingStack", "cluster_available", "per_kind", "rss_mb", "scaling_stack"]

KINDS = ("broker", "worker", "nats", "bench")
"""Process kinds CPU is summed over; a pid's name is its kind plus a number."""


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of a process in MiB, from /proc (None if unknown)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def per_kind(values: Mapping[str, float]) -> dict[str, float]:
    """Sum ``{"broker1": x, "broker2": y, ...}`` into ``{"broker": x + y, ...}``."""
    out = dict.fromkeys(KINDS, 0.0)
    for name, value in values.items():
        kind = name.rstrip("0123456789")
        out[kind] = out.get(kind, 0.0) + value
    return out


def cluster_available() -> str | None:
    """None when the 3-node launcher can be imported; otherwise why not."""
    try:
        from tests.cluster import Cluster  # noqa: F401
    except Exception as err:  # a missing file or one being edited: skip the column
        return f"tests/cluster.py cannot be imported ({type(err).__name__}: {err})"
    return None


@dataclass
class ScalingStack:
    nats_url: str
    nats_pids: list[int]
    nc: NatsClient
    brokers: list[tuple[str, Child]] = field(default_factory=list)
    """(address, process) of each broker."""
    workers: list[Child] = field(default_factory=list)
    ws: Workspace | None = None
    config: Path | None = None

    @property
    def addrs(self) -> list[str]:
        return [addr for addr, _ in self.brokers]

    def pids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {"bench1": os.getpid()}
        pids.update({f"nats{i + 1}": pid for i, pid in enumerate(self.nats_pids)})
        pids.update({f"broker{i + 1}": c.pid for i, (_, c) in enumerate(self.brokers)})
        pids.update({f"worker{i + 1}": c.pid for i, c in enumerate(self.workers)})
        return pids

    def check_alive(self) -> None:
        for _, broker in self.brokers:
            broker.check_alive()
        for worker in self.workers:
            worker.check_alive()

    def _cli(self, command: str) -> list[str]:
        assert self.config is not None
        return [
            sys.executable, "-m", "laneway.broker.cli", command,
            "--config", str(self.config), "--nats-url", self.nats_url,
        ]  # fmt: skip

    async def add_broker(self) -> str:
        assert self.ws is not None
        addr = f"127.0.0.1:{free_port()}"
        child = await self.ws.spawn(
            f"broker{len(self.brokers) + 1}", [*self._cli("broker"), "--grpc-addr", addr]
        )
        await wait_grpc_health(addr, child)
        self.brokers.append((addr, child))
        return addr

    async def add_workers(self, count: int, timeout: float = 60.0, *, wait_pulling: bool = True) -> None:
        """Start ``count`` more workers; return once the lane has that many more pulls
        waiting. Without ``wait_pulling``, at once: on a deep queue every pull is
        answered as soon as it is made, so none is ever seen waiting."""
        assert self.ws is not None
        js = self.nc.jetstream()
        consumer = topo.consumer_name(ROUTE, "normal")
        started = [
            await self.ws.spawn(f"worker{len(self.workers) + i + 1}", self._cli("worker"))
            for i in range(count)
        ]
        self.workers.extend(started)
        if not wait_pulling:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(Exception):
                info = await js.consumer_info(topo.JOBS_STREAM, consumer)
                # Each worker keeps at least one pull request waiting once it is ready.
                if (info.num_waiting or 0) >= len(self.workers):
                    return
            if loop.time() > deadline:
                raise BenchError(f"{len(self.workers)} workers did not all pull within {timeout:.0f}s")
            await asyncio.sleep(0.05)  # poll interval under a deadline

    async def stop_workers(self) -> None:
        for worker in self.workers:
            await worker.stop()
        self.workers.clear()


def _config_body(cluster: bool) -> str:
    # Replicas 3 on the cluster: the figure a deployment that survives a node loss pays.
    head = "nats:\n  replicas: 3\n" if cluster else ""
    return head + CONFIG.format(route=ROUTE)


@contextlib.asynccontextmanager
async def scaling_stack(
    name: str, *, cluster: bool, brokers: int, workers: int
) -> AsyncIterator[ScalingStack]:
    """nats (one server or three), ``brokers`` brokers, ``workers`` workers, all ready."""
    async with Workspace(name) as ws, contextlib.AsyncExitStack() as stack:
        if cluster:
            from tests.cluster import Cluster

            c = await stack.enter_async_context(Cluster(ws.dir / "cluster"))
            url, urls = c.url, c.urls
            pids = [n.pid for n in c.nodes if n.pid is not None]
        else:
            server = await ws.start_nats()
            url, urls = server.url, [server.url]
            pid = ws.nats_pid
            pids = [pid] if pid is not None else []
        config = ws.dir / "laneway.yaml"
        config.write_text(_config_body(cluster))
        load_config(config)  # fail here, with the config error, rather than in a child
        nc: Any = await nats.connect(urls, name="bench-observer")
        stack.push_async_callback(nc.close)
        s = ScalingStack(url, pids, nc, ws=ws, config=config)
        # The first broker creates the topology; the others and the workers check it.
        for _ in range(brokers):
            await s.add_broker()
        if workers:
            await s.add_workers(workers)
        try:
            yield s
        finally:
            # Brokers and workers before the cluster: stopping them needs NATS up.
            for child in reversed(ws.children):
                await child.stop()
