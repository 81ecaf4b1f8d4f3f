"""Webhook delivery, run by hand: ``.venv/bin/python -m bench.webhook_bench``.

1. Lag: jobs submitted at a steady ``--rate`` (paced, not bursts) for ``--seconds``,
   each with a ``notify`` webhook (final event); per job, the receiver's first
   attempt minus the final event's ``eventTime`` (p50, p99, max).
2. Outage: the receiver answers 500 for ``--outage-s`` seconds (60; 300 for the
   five-minute case), then 200, while jobs are submitted at ``--rate`` through the
   outage and a little after; then waits until every delivery is acknowledged and
   reports counts (nothing lost, no duplicate after an ack, nothing dead-lettered),
   attempts (requests) per delivery, the calls the receiver saw during the outage (the circuit
   keeps them low) and how long after the outage the last delivery was acknowledged.

It starts its own nats-server, broker, worker and webhook delivery service (in this
process, with the production retry tuning, printed) and a receiver: an aiohttp server
on loopback verifying every signature with ``standardwebhooks`` as a real receiver
would. Prints the figures; exits 1 when a delivery was lost, duplicated after its ack
or dead-lettered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig, parse_config
from laneway.broker.observability.logs import configure_logging
from laneway.broker.server.process import BrokerServer
from laneway.broker.webhooks.delivery import Tuning
from laneway.broker.webhooks.service import WebhookService
from laneway.v1 import job_pb2
from laneway.workers.pool import WorkerPool

__all__ = ["main"]

_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
_CONFIG = f"""
broker: {{grpc_addr: "127.0.0.1:0"}}
providers:
  mock: {{type: mock, concurrency: 64}}
routes:
  chat: {{targets: [{{provider: mock, model: mock-chat}}]}}
webhooks:
  secrets: {{main: ["{_SECRET}"]}}
  allow_hosts: ["127.0.0.1"]
"""


@dataclass
class Receiver:
    """Answers 500 until ``fail_until`` (monotonic), then 200; verifies every request."""

    fail_until: float = 0.0
    first: dict[str, float] = field(default_factory=dict)  # webhook-id -> wall time of 1st attempt
    lag_ms: dict[str, float] = field(default_factory=dict)  # webhook-id -> 1st attempt - eventTime
    attempts: Counter[str] = field(default_factory=Counter)
    acked: Counter[str] = field(default_factory=Counter)  # 200s per webhook-id (>1 = duplicate)
    outage_calls: int = 0
    first_ack: float = 0.0  # monotonic
    last_ack: float = 0.0
    bad_signatures: int = 0
    _verifier: Webhook = field(default_factory=lambda: Webhook(_SECRET))

    async def handle(self, request: web.Request) -> web.Response:
        now = time.time()
        body = await request.text()
        try:
            event: Any = self._verifier.verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400, text="bad signature")
        wid = request.headers["webhook-id"]
        self.attempts[wid] += 1
        if wid not in self.first:
            self.first[wid] = now
            finished = datetime.fromisoformat(event["eventTime"].replace("Z", "+00:00")).timestamp()
            self.lag_ms[wid] = (now - finished) * 1000
        if time.monotonic() < self.fail_until:
            self.outage_calls += 1
            return web.Response(status=500, text="down")
        self.acked[wid] += 1
        self.last_ack = time.monotonic()
        self.first_ack = self.first_ack or self.last_ack
        return web.Response(status=200, text="ok")


async def _submit_paced(client: laneway.AsyncClient, url: str, rate: float, seconds: float) -> int:
    """Submits one job every 1/rate s against a fixed schedule (no drift, no bursts)."""
    total = max(1, int(rate * seconds))
    start = time.monotonic()
    for i in range(total):
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)  # pacing the load, not synchronisation
        spec = laneway.job("chat", laneway.chat("hello"))
        spec.notify.add(url=url, events=job_pb2.NOTIFY_EVENTS_FINAL, secret="main")
        await client.submit_spec(spec)
    return total


async def _wait_for(predicate: Any, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return bool(predicate())


def _dead_lettered(service: WebhookService) -> int:
    total = 0.0
    for metric in service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("outcome") == "dead_lettered":
                total += sample.value
    return int(total)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q + 0.5) - 1))]


def _since(at: float, origin: float) -> str:
    return f"{at - origin:.1f}" if at else "-"


async def _serve(rec: Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/hook"


async def _stack_run(config: LanewayConfig, tuning: Tuning, body: Any) -> int:
    rec = Receiver()
    runner, url = await _serve(rec)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with (
                EmbeddedNats(Path(tmp) / "nats") as nats,
                BrokerServer(config, nats_url=nats.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
                WorkerPool(config, nats_url=nats.url, providers=["mock"]),
                WebhookService(config, nats_url=nats.url, tuning=tuning) as service,
                laneway.AsyncClient(b.address, timeout=30) as client,
            ):
                result: int = await body(client, url, rec, service)
                return result
    finally:
        await runner.cleanup()


async def _lag(client: laneway.AsyncClient, url: str, rec: Receiver, _: WebhookService, a: Any) -> int:
    jobs = await _submit_paced(client, url, a.rate, a.seconds)
    await _wait_for(lambda: len(rec.first) >= jobs, 120)
    lags = list(rec.lag_ms.values())
    print(f"\n== lag: {jobs} jobs at {a.rate:g}/s, final event -> first delivery attempt")
    print(f"  {'delivered':<12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(f"  {len(lags):<12}{statistics.median(lags):>10.1f}{_pct(lags, 0.99):>10.1f}{max(lags):>10.1f}")
    return 0 if len(lags) == jobs and rec.bad_signatures == 0 else 1


async def _outage(client: laneway.AsyncClient, url: str, rec: Receiver, svc: WebhookService, a: Any) -> int:
    rec.fail_until = time.monotonic() + a.outage_s
    jobs = await _submit_paced(client, url, a.rate, a.outage_s + a.after_s)
    done = await _wait_for(lambda: len(rec.acked) >= jobs, a.outage_s + a.deadline_s)
    attempts = list(map(float, rec.attempts.values())) or [0.0]
    dupes = sum(1 for n in rec.acked.values() if n > 1)
    dead = _dead_lettered(svc)
    print(f"\n== outage: receiver answers 500 for {a.outage_s:g} s, then 200; {a.rate:g} jobs/s for "
          f"{a.outage_s + a.after_s:g} s")  # fmt: skip
    rows = [
        ("jobs submitted", jobs),
        ("deliveries expected", jobs),
        ("distinct webhook-ids acknowledged", len(rec.acked)),
        ("attempts per delivery p50 / max", f"{statistics.median(attempts):g} / {max(attempts):g}"),
        ("duplicates after ack", dupes),
        ("dead-lettered", dead),
        ("calls seen during the outage", rec.outage_calls),
        ("s from end of outage to first ack", _since(rec.first_ack, rec.fail_until)),
        ("s from end of outage to last ack", _since(rec.last_ack, rec.fail_until)),
        ("bad signatures", rec.bad_signatures),
    ]
    for name, value in rows:
        print(f"  {name:<36}{value!s:>14}")
    if not done:
        print(f"  NOT ALL ACKNOWLEDGED within the deadline ({a.outage_s + a.deadline_s:g} s)")
    return 0 if done and len(rec.acked) == jobs and not dupes and not dead and not rec.bad_signatures else 1


async def _main(a: Any) -> int:
    config = parse_config(_CONFIG, source="<bench>")
    # Production defaults unless overridden (the smoke test shortens the circuit).
    overrides = (("circuit_open_s", a.circuit_open_s), ("circuit_open_max_s", a.circuit_open_max_s))
    tuning = Tuning(**{k: v for k, v in overrides if v is not None})
    print(
        f"retry tuning: backoff base {tuning.backoff_base_s:g} s, max "
        f"{tuning.backoff_max_s:g} s (x2 per real attempt, jitter 50-100%); circuit opens after "
        f"{tuning.circuit_failures} failures for {tuning.circuit_open_s:g} s, x2 per failed probe up to "
        f"{tuning.circuit_open_max_s:g} s, holds spread over {tuning.hold_spread:.0%} of it; "
        f"max_age_s {config.webhooks.max_age_s}, timeout_s {config.webhooks.timeout_s:g}"
    )
    status = 0
    if not a.skip_lag:
        status |= await _stack_run(config, tuning, lambda c, u, r, s: _lag(c, u, r, s, a))
    status |= await _stack_run(config, tuning, lambda c, u, r, s: _outage(c, u, r, s, a))
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=100.0, help="jobs per second (paced)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the lag part")
    parser.add_argument("--jobs", type=int, default=0, help="lag part: this many jobs (overrides --seconds)")
    parser.add_argument("--outage-s", type=float, default=60.0, help="seconds the receiver answers 500")
    parser.add_argument(
        "--after-s", type=float, default=5.0, help="keep submitting this long after the outage"
    )
    parser.add_argument("--deadline-s", type=float, default=600.0, help="wait for acks up to outage + this")
    parser.add_argument(
        "--circuit-open-s", type=float, default=None, help="override the circuit's first open period (5)"
    )
    parser.add_argument(
        "--circuit-open-max-s", type=float, default=None, help="override the longest open period (15)"
    )
    parser.add_argument("--skip-lag", action="store_true", help="run the outage part only")
    args = parser.parse_args(argv)
    if args.jobs:
        args.seconds = args.jobs / args.rate
    os.environ.setdefault("LANEWAY_LOG_LEVEL", "warning")
    configure_logging()  # the stack runs in this process: keep its per-job logs out
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
