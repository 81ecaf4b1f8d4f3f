"""The stack of one scenario, as separate processes: an embedded nats-server, one or
two ``laneway fake-provider`` servers, a ``laneway broker`` and four ``laneway worker``
processes on a generated config. Processes are ``bench.stack`` children of a
``Workspace``, so leaving the ``async with`` stops every one of them (also on Ctrl-C
and on errors) and removes the temp dir.

Each fake is watched and steered over its admin surface (``/_laneway/stats``,
``/_laneway/calls``, ``/_laneway/control``), so the figures come from what the
provider itself saw, not from what Laneway reports about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

import laneway
from bench.report import progress
from bench.stack import BenchError, Child, Workspace, wait_grpc_health
from laneway.broker.cli.natsd import free_port
from laneway.broker.config.model import load_config

__all__ = ["ROUTE", "Call", "FakeHandle", "FakeSpec", "Stack", "StackSpec", "running_stack"]

ROUTE = "scenario"
MODEL = "fake-chat"
_CLI = [sys.executable, "-m", "laneway.broker.cli"]


@dataclass(frozen=True)
class FakeSpec:
    """One fake provider process and the Laneway provider pointing at it."""

    name: str
    fake_rpm: int = 0
    """The fake's own limit (it answers 429 beyond it); 0: unlimited."""
    fake_tpm: int = 0
    """The fake's own token limit, likewise."""
    latency_ms: float = 100.0
    latency_jitter_ms: float = 0.0
    limits: dict[str, Any] = field(default_factory=dict)
    """The provider's ``limits`` block in the Laneway config ({} leaves the defaults)."""
    circuit: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 16
    """Per worker process."""
    tier: int | None = None
    """The route target's ``tier`` (None: a tier of its own)."""
    weight: int = 1


@dataclass(frozen=True)
class StackSpec:
    fakes: Sequence[FakeSpec]
    """In route preference order: the first is the primary target."""
    workers: int = 4
    when_all_down: str = "wait"

    def config(self, grpc_addr: str, base_urls: dict[str, str]) -> str:
        """The Laneway YAML: JSON-style flow values are valid YAML and need no quoting rules."""
        lines = [
            "broker:",
            f'  grpc_addr: "{grpc_addr}"',
            "queue:",
            "  ack_wait_s: 30",
            "workers:",
            "  shutdown_grace_s: 2",
            "metrics:",
            "  broker_port: 0",
            "  worker_port: 0",
            "providers:",
        ]
        for f in self.fakes:
            lines += [
                f"  {f.name}:",
                "    type: openai",
                f'    base_url: "{base_urls[f.name]}"',
                '    api_key_env: ""',
                f"    concurrency: {f.concurrency}",
                f"    limits: {_flow(f.limits)}",
                f"    circuit: {_flow(f.circuit)}",
            ]
        targets = ", ".join(
            f'{{"provider": "{f.name}", "model": "{MODEL}", "tier": {"null" if f.tier is None else f.tier},'
            f' "weight": {f.weight}}}'
            for f in self.fakes
        )
        lines += [
            "routes:",
            f"  {ROUTE}:",
            f"    targets: [{targets}]",
            f"    when_all_down: {self.when_all_down}",
        ]
        return "\n".join(lines) + "\n"


def _flow(values: dict[str, Any]) -> str:
    items = ", ".join(
        f'"{k}": {"true" if v is True else "false" if v is False else v}' for k, v in values.items()
    )
    return "{" + items + "}"


@dataclass(frozen=True)
class Call:
    """One model call as a fake logged it (unix seconds)."""

    seq: int
    arrived: float
    answered: float
    status: int
    retry_after: str | None


class FakeHandle:
    """A running fake provider: its calls (fetched incrementally) and its control."""

    def __init__(self, name: str, child: Child, base_url: str, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.child = child
        self.base_url = base_url
        self._admin = base_url.removesuffix("/v1") + "/_laneway"
        self._session = session
        self._calls: list[Call] = []
        self._cursor = 0

    async def stats(self) -> dict[str, Any]:
        async with self._session.get(f"{self._admin}/stats") as r:
            r.raise_for_status()
            body: dict[str, Any] = await r.json()
            return body

    async def control(self, **body: Any) -> dict[str, Any]:
        async with self._session.post(f"{self._admin}/control", json=body) as r:
            reply: dict[str, Any] = await r.json()
            if r.status != 200:
                raise BenchError(f"fake {self.name} refused control {body}: {reply}")
            return reply

    async def chat_tokens(self, prompt: str) -> int:
        """The tokens one chat call with ``prompt`` costs at the fake (a direct call)."""
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
        async with self._session.post(f"{self.base_url}/chat/completions", json=body) as r:
            r.raise_for_status()
            reply: dict[str, Any] = await r.json()
        return int(reply["usage"]["total_tokens"])

    async def calls(self) -> list[Call]:
        """Every call so far, in the order answered (new ones fetched from the last cursor)."""
        while True:
            params = {"after": str(self._cursor), "limit": "20000"}
            async with self._session.get(f"{self._admin}/calls", params=params) as r:
                r.raise_for_status()
                page = await r.json()
            new = [
                Call(c["seq"], c["arrived"], c["answered"], c["status"], c.get("retry_after"))
                for c in page["calls"]
            ]
            self._calls.extend(new)
            self._cursor = int(page["next"])
            if len(new) < 20000:
                return list(self._calls)


@dataclass
class Stack:
    ws: Workspace
    addr: str
    client: laneway.AsyncClient
    fakes: dict[str, FakeHandle]
    workers: list[Child]
    broker: Child

    def check_alive(self) -> None:
        for child in self.ws.children:
            child.check_alive()


async def _start_fake(ws: Workspace, spec: FakeSpec, timeout: float = 20.0) -> tuple[Child, str]:
    argv = [*_CLI, "fake-provider", "--port", "0", "--rpm", str(spec.fake_rpm), "--tpm", str(spec.fake_tpm)]
    argv += ["--latency-ms", str(spec.latency_ms), "--latency-jitter-ms", str(spec.latency_jitter_ms)]
    child = await ws.spawn(f"fake-{spec.name}", argv)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        child.check_alive()
        with contextlib.suppress(OSError):
            for line in child.log_path.read_text(errors="replace").splitlines():
                if line.startswith("http://"):  # it prints its base URL once listening
                    return child, line.strip()
        await asyncio.sleep(0.05)  # poll interval under a deadline
    raise BenchError(f"fake provider {spec.name} printed no URL within {timeout:.0f}s\n{child.tail()}")


async def _wait_log(child: Child, text: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        child.check_alive()
        with contextlib.suppress(OSError):
            if text in child.log_path.read_text(errors="replace"):
                return
        await asyncio.sleep(0.05)  # poll interval under a deadline
    raise BenchError(f"{child.name} did not log {text!r} within {timeout:.0f}s\n{child.tail()}")


@contextlib.asynccontextmanager
async def running_stack(name: str, spec: StackSpec) -> AsyncIterator[Stack]:
    """Start everything; stop everything on exit, whatever happened."""
    # Workspace prints every child's log tail when the scenario fails with an error.
    async with Workspace(f"scenario-{name}") as ws, aiohttp.ClientSession() as session:
        server = await ws.start_nats()
        fakes: dict[str, FakeHandle] = {}
        for f in spec.fakes:
            child, url = await _start_fake(ws, f)
            fakes[f.name] = FakeHandle(f.name, child, url, session)
        addr = f"127.0.0.1:{free_port()}"
        config = ws.dir / "laneway.yaml"
        config.write_text(spec.config(addr, {n: h.base_url for n, h in fakes.items()}))
        load_config(config)  # fail here, with the config error, rather than in a child
        common = ["--config", str(config), "--nats-url", server.url]
        broker = await ws.spawn("broker", [*_CLI, "broker", *common, "--grpc-addr", addr])
        await wait_grpc_health(addr, broker)
        # The broker created the topology; the workers only check it.
        workers = [await ws.spawn(f"worker-{i}", [*_CLI, "worker", *common]) for i in range(spec.workers)]
        for w in workers:  # they start in parallel: waiting in turn costs nothing
            await _wait_log(w, "worker pulling")
        progress(f"{name}: stack up in {ws.dir} ({len(fakes)} fakes, {len(workers)} workers)")
        async with laneway.AsyncClient(addr, timeout=30.0) as client:
            yield Stack(ws, addr, client, fakes, workers, broker)
