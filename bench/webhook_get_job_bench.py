"""What the webhook deliveries cost ``GetJob``, run by hand:
``.venv/bin/python -m bench.webhook_get_job_bench``.

``GetJob`` latency (p50, p90 over ``--calls`` sequential calls) of one finished job in
three set-ups: a broker without webhooks (no lookup at all), a broker with webhooks
configured and a job without any (one KV miss), and a job whose record lists
``--deliveries`` deliveries (one KV get of that record, decoded). It starts its own
nats-server and broker in this process and writes the delivery record the way the
delivery process does (no HTTP). Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import parse_config
from laneway.broker.core import topology as t
from laneway.broker.core.webhook_status import DeliveryStatus, StatusWriter
from laneway.broker.server.process import BrokerServer

__all__ = ["main"]

_BASE = """
broker: {grpc_addr: "127.0.0.1:0"}
providers:
  mock: {type: mock, concurrency: 8}
routes:
  chat: {targets: [{provider: mock, model: mock-chat}]}
"""
_WEBHOOKS = """
webhooks:
  secrets: {main: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}
"""


async def _latencies(client: laneway.AsyncClient, job_id: str, calls: int) -> tuple[float, float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.get_job(job_id)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9) - 1]


async def _setup(webhooks: bool, deliveries: int, calls: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats") as nats_server:
            config = parse_config(_BASE + (_WEBHOOKS if webhooks else ""), source="<bench>")
            async with (
                BrokerServer(
                    config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False
                ) as b,
                laneway.AsyncClient(b.address, timeout=10) as client,
            ):
                spec = laneway.job("chat", laneway.chat("hi"))
                spec.delay.FromSeconds(600)  # never runs: the job stays put, no worker needed
                job_id = (await client.submit_spec(spec)).job_id
                if deliveries:
                    nc = await nats.connect(nats_server.url)
                    try:
                        writer = StatusWriter(await nc.jetstream().key_value(t.WEBHOOKS_BUCKET))
                        await writer.record(
                            job_id,
                            [
                                DeliveryStatus.new(
                                    webhook_id=f"msg_{job_id}_{i}_jx",
                                    url="https://hooks.example.com/x",
                                    source="job",
                                    event_seq=i,
                                    state="delivered",
                                    attempts=1,
                                    last_status=200,
                                )
                                for i in range(1, deliveries + 1)
                            ],
                        )
                    finally:
                        await nc.close()
                await _latencies(client, job_id, min(calls, 200))  # warm-up
                return await _latencies(client, job_id, calls)


async def _main(calls: int, deliveries: int) -> None:
    cases = [
        ("no webhooks configured", False, 0),
        ("webhooks configured, job without any (KV miss)", True, 0),
        (f"job with {deliveries} recorded deliveries", True, deliveries),
    ]
    for name, webhooks, n in cases:
        p50, p90 = await _setup(webhooks, n, calls)
        print(f"GetJob, {name}: p50 {p50:.3f} ms, p90 {p90:.3f} ms ({calls} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--deliveries", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(_main(args.calls, args.deliveries))


if __name__ == "__main__":
    main()
