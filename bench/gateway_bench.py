"""The HTTP gateway's cost, run by hand: ``.venv/bin/python -m bench.gateway_bench``.

1. Added latency per event: the same streaming jobs followed at once over gRPC
   (``StreamResults``), over Server-Sent Events and over one WebSocket (``/v1/ws``,
   subscribed to every job; ``bench.ws_latency``) through a ``laneway gateway``
   process; per event, the SSE and the WS arrival minus the gRPC arrival (p50, p90).
2. Memory: the gateway process's resident set with N concurrent SSE subscribers
   (default 2,000) on queued jobs, against the same process idle.

It starts its own nats-server, broker and worker (in this process) and the gateway (a
child process, so its memory is its own). Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

import laneway
from bench.ws_latency import WsFollower
from laneway.broker.cli.natsd import EmbeddedNats, free_port
from laneway.broker.config.model import parse_config
from laneway.broker.observability.logs import configure_logging
from laneway.broker.server.process import BrokerServer
from laneway.workers.pool import WorkerPool

__all__ = ["main"]

_CONFIG = """
broker: {grpc_addr: "127.0.0.1:0"}
providers:
  mock: {type: mock, concurrency: 64, token_delay_ms: 5}
  idle: {type: mock, concurrency: 1}
routes:
  chat: {targets: [{provider: mock, model: mock-chat}]}
  parked: {targets: [{provider: idle, model: mock-chat}]}
"""
_TEXT = " ".join(f"word{i}" for i in range(40))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _sse_arrivals(http: aiohttp.ClientSession, job_id: str, out: dict[int, float]) -> None:
    async with http.get(f"/v1/jobs/{job_id}/events") as r:
        async for line in r.content:
            if line.startswith(b"id: "):
                out[int(line[4:])] = time.perf_counter()


async def _grpc_arrivals(client: laneway.AsyncClient, job_id: str, out: dict[int, float]) -> None:
    async for event in client.stream_results(job_id):
        out[event.seq] = time.perf_counter()


async def _latency(
    client: laneway.AsyncClient, http: aiohttp.ClientSession, ws: WsFollower, jobs: int
) -> tuple[list[float], list[float]]:
    """Per event (seq > 1: QUEUED is a replay for all three), SSE and WS arrival minus gRPC's."""
    sse_added: list[float] = []
    ws_added: list[float] = []
    for _ in range(jobs):
        # Submitted to a route no worker serves yet would be simpler, but the job must
        # run: subscribe all three before the events come (QUEUED is replayed to each).
        job = await client.submit("chat", laneway.chat(_TEXT, stream=True))
        grpc_t: dict[int, float] = {}
        sse_t: dict[int, float] = {}
        ws_t = await ws.follow(job.job_id)
        await asyncio.gather(
            _grpc_arrivals(client, job.job_id, grpc_t),
            _sse_arrivals(http, job.job_id, sse_t),
            ws.final(job.job_id),
        )
        sse_added += [(sse_t[s] - grpc_t[s]) * 1000 for s in grpc_t if s in sse_t and s > 1]
        ws_added += [(ws_t[s] - grpc_t[s]) * 1000 for s in grpc_t if s in ws_t and s > 1]
    return sse_added, ws_added


def _row(name: str, added: list[float]) -> str:
    q = statistics.quantiles(added, n=10)
    return f"  {name:<10}{len(added):>8}{statistics.median(added):>10.2f}{q[8]:>10.2f}"


async def _memory(client: laneway.AsyncClient, base: str, pid: int, subscribers: int) -> tuple[float, float]:
    idle = _rss_mib(pid)
    jobs = [(await client.submit("parked", laneway.chat("hold"))).job_id for _ in range(subscribers // 20)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url=base, connector=connector) as http:
        opened = 0
        responses: list[aiohttp.ClientResponse] = []
        try:
            for i in range(subscribers):
                r = await http.get(f"/v1/jobs/{jobs[i % len(jobs)]}/events")
                await r.content.readline()  # the first event: this stream is live
                responses.append(r)
                opened += 1
            await asyncio.sleep(1.0)  # let the process settle before reading its RSS
            loaded = _rss_mib(pid)
        finally:
            for r in responses:
                r.close()
    return idle, loaded


async def _run(jobs: int, subscribers: int) -> None:
    config = parse_config(_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats") as nats,
            BrokerServer(config, nats_url=nats.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
            WorkerPool(config, nats_url=nats.url, providers=["mock"]),
        ):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "laneway.broker.cli", "gateway",
                "--addr", broker.address, "--listen", f"127.0.0.1:{port}",
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stderr is not None
                await asyncio.wait_for(proc.stderr.readuntil(b"openapi.json"), 30)
                base = f"http://127.0.0.1:{port}"
                async with (
                    laneway.AsyncClient(broker.address, timeout=30) as client,
                    aiohttp.ClientSession(base_url=base) as http,
                ):
                    async with WsFollower(http) as ws:
                        sse_added, ws_added = await _latency(client, http, ws, jobs)
                    print(f"added latency per event against gRPC StreamResults ({jobs} streaming jobs)")
                    print(f"  {'over':<10}{'events':>8}{'p50 ms':>10}{'p90 ms':>10}")
                    print(_row("SSE", sse_added))
                    print(_row("WebSocket", ws_added))
                    idle, loaded = await _memory(client, base, proc.pid, subscribers)
                    print(
                        f"gateway RSS: {idle:.1f} MiB idle, {loaded:.1f} MiB with {subscribers} SSE "
                        f"subscribers ({(loaded - idle) * 1024 / subscribers:.1f} KiB each)"
                    )
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=50, help="streaming jobs for the latency figure")
    parser.add_argument("--subscribers", type=int, default=2000, help="concurrent SSE streams")
    args = parser.parse_args(argv)
    os.environ.setdefault("LANEWAY_LOG_LEVEL", "warning")
    configure_logging()  # broker and worker run in this process: keep their per-job logs out
    asyncio.run(_run(args.jobs, args.subscribers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
