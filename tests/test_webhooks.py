"""Signed webhooks with durable delivery, end to end: a real nats-server, broker,
worker and webhook delivery process, and a real HTTP receiver on loopback
(allowed through ``webhooks.allow_hosts``) that verifies every signature with the
``standardwebhooks`` package."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.server.process import BrokerServer
from laneway.broker.webhooks.delivery import Tuning
from laneway.broker.webhooks.guard import AddressRefused, check_url, ip_allowed
from laneway.broker.webhooks.service import WebhookService
from laneway.v1 import job_pb2
from tests.conftest import eventually, make_config


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


MAIN = _secret()
NEW, OLD = _secret(), _secret()


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: str
    at: float
    status: int

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """Answers by path: the statuses in ``plans[path]`` first, then 200. Every request
    must verify with each secret in ``secrets[path]`` (default: MAIN)."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    plans: dict[str, list[int]] = field(default_factory=dict)
    secrets: dict[str, list[str]] = field(default_factory=dict)
    bad_signatures: list[str] = field(default_factory=list)
    holds: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    """Awaited before answering the next request to that path (once)."""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        headers = dict(request.headers)
        for secret in self.secrets.get(request.path, [MAIN]):
            try:
                Webhook(secret).verify(body, headers)
            except Exception as exc:
                self.bad_signatures.append(f"{request.path}: {exc}")
        plan = self.plans.get(request.path, [])
        status = plan.pop(0) if plan else 200
        hold = self.holds.pop(request.path, None)
        if hold is not None:
            await hold()
        self.calls.append(Call(request.path, headers, body, time.time(), status))
        return web.Response(status=status, text="ok")

    def at(self, path: str, status: int | None = None) -> list[Call]:
        return [c for c in self.calls if c.path == path and (status is None or c.status == status)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    server = web.Server(rec.handle)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@pytest.fixture
def config(receiver: Receiver) -> LanewayConfig:
    return make_config(f"""
webhooks:
  secrets: {{main: ["{MAIN}"], rot: ["{NEW}", "{OLD}"]}}
  allow_hosts: ["127.0.0.1"]
  max_age_s: 3
  timeout_s: 2
  subscriptions:
    - {{route: embed, url: "{receiver.url}/sub", events: final, secret: main}}
providers:
  mock:
    type: mock
    concurrency: 64
    token_delay_ms: 1
""")


@pytest.fixture
async def webhooks(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> AsyncIterator[WebhookService]:
    tuning = Tuning(backoff_base_s=0.05, backoff_max_s=0.3, circuit_failures=1000)
    async with WebhookService(config, nats_url=nats_server.url, tuning=tuning) as service, watched(service):
        yield service


@contextlib.asynccontextmanager
async def watched(service: WebhookService) -> AsyncIterator[None]:
    """Fails the test at teardown with the error of a service loop that died during it.
    Nothing else would tell: its deliveries would just stop, and the test would fail
    on a timeout that says nothing of why."""
    watcher = asyncio.create_task(service.wait())
    try:
        yield
    finally:
        if watcher.done():
            watcher.result()
        watcher.cancel()


def _job(route: str, *notify: tuple[str, int, str], stream: bool = False) -> job_pb2.JobSpec:
    spec = laneway.job(
        route, laneway.embedding("hi") if route == "embed" else laneway.chat("hello there you", stream=stream)
    )
    for url, events, secret in notify:
        spec.notify.add(url=url, events=events, secret=secret)
    return spec


FINAL = job_pb2.NOTIFY_EVENTS_FINAL
ALL = job_pb2.NOTIFY_EVENTS_ALL
CHANGES = job_pb2.NOTIFY_EVENTS_STATE_CHANGES


@dataclass
class CliResult:
    exit_code: int
    output: str


async def _cli(*args: str) -> CliResult:
    """``laneway webhooks ...`` as its own process, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "webhooks", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=os.path.dirname(__file__),
    )  # fmt: skip
    out, err = await proc.communicate()
    return CliResult(proc.returncode or 0, out.decode() + err.decode())


# --- the address guard ----------------------------------------------------------------


def test_guard_refuses_internal_addresses() -> None:
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "224.0.0.1"):  # fmt: skip
        assert not ip_allowed(ipaddress.ip_address(address)), address
    assert ip_allowed(ipaddress.ip_address("93.184.216.34"))
    assert ip_allowed(ipaddress.ip_address("2606:4700::1111"))
    assert ip_allowed(ipaddress.ip_address("10.1.2.3"), ["10.0.0.0/8"])
    assert not ip_allowed(ipaddress.ip_address("127.0.0.2"), ["127.0.0.1"])


async def test_guard_checks_urls() -> None:
    for url in (
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "https://[::1]/",
        "http://169.254.169.254/latest",
    ):
        with pytest.raises(AddressRefused):
            await check_url(url)
    with pytest.raises(AddressRefused):
        await check_url("ftp://example.com/x")
    await check_url("http://127.0.0.1:9/x", ["127.0.0.1"])
    await check_url("http://localhost/x", ["localhost"])
    await check_url("http://93.184.216.34/x")


# --- the contract ---------------------------------------------------------------------


async def test_notify_is_validated(client: laneway.AsyncClient, receiver: Receiver) -> None:
    with pytest.raises(laneway.InvalidArgument, match=r"notify\[0\]\.url"):
        await client.submit_spec(_job("chat", ("file:///etc/passwd", FINAL, "main")))
    with pytest.raises(laneway.InvalidArgument, match=r"notify\[0\]\.secret"):
        await client.submit_spec(_job("chat", (receiver.url, FINAL, "nope")))
    with pytest.raises(laneway.InvalidArgument, match=r"notify\[0\]\.secret"):
        await client.submit_spec(_job("chat", (receiver.url, FINAL, "")))


# --- delivery -------------------------------------------------------------------------


async def test_final_event_is_delivered_signed(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    job = await client.submit_spec(_job("chat", (f"{receiver.url}/final", FINAL, "main")))
    final = await client.wait(job.job_id, timeout=10)
    await eventually(lambda: _true(len(receiver.at("/final")) >= 1))
    [call] = receiver.at("/final")
    assert not receiver.bad_signatures
    assert call.event["jobId"] == job.job_id and call.event["state"] == "JOB_STATE_SUCCEEDED"
    assert call.event["seq"] == str(final.seq)
    assert call.headers["webhook-id"].startswith(f"msg_{job.job_id}_{final.seq}_")
    assert call.headers["Content-Type"] == "application/json"
    # The route's standing subscription (embed only) saw nothing of a chat job.
    assert not receiver.at("/sub")


async def test_final_event_written_by_the_broker_is_delivered(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    # The broker writes CANCELLED from the stored event, which does not carry the
    # job's webhooks: the fan-out remembers them from the job's first event.
    spec = _job("chat", (f"{receiver.url}/cancel", FINAL, "main"))
    spec.delay.FromSeconds(600)  # scheduled: no worker ever sees it
    job = await client.submit_spec(spec)
    await client.cancel_job(job.job_id)
    final = await client.wait(job.job_id, timeout=10)
    assert final.state == job_pb2.JOB_STATE_CANCELLED
    await eventually(lambda: _true(len(receiver.at("/cancel")) >= 1))
    assert [c.event["state"] for c in receiver.at("/cancel")] == ["JOB_STATE_CANCELLED"]


async def test_route_subscription_gets_final_events(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    job = await client.submit_spec(_job("embed"))
    await client.wait(job.job_id, timeout=10)
    await eventually(lambda: _true(len(receiver.at("/sub")) >= 1))
    assert receiver.at("/sub")[0].event["jobId"] == job.job_id
    assert not receiver.bad_signatures


async def test_all_events_arrive_in_seq_order(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    receiver.plans["/all"] = [200, 500, 503]  # the second event fails twice: later ones must wait
    job = await client.submit_spec(
        _job(
            "chat",
            (f"{receiver.url}/all", ALL, "main"),
            (f"{receiver.url}/changes", CHANGES, "main"),
            stream=True,
        )
    )
    events = [e async for e in client.stream_results(job.job_id, timeout=10)]
    last = events[-1].seq
    assert any(e.HasField("delta") for e in events)
    await eventually(lambda: _true(len(receiver.at("/all", 200)) >= last))
    delivered = [int(c.event["seq"]) for c in receiver.at("/all", 200)]
    assert delivered == list(range(1, last + 1))
    attempted = [int(c.event["seq"]) for c in receiver.at("/all")]
    assert attempted[:3] == [1, 2, 2]  # nothing overtook the failing one
    await eventually(lambda: _true(any(c.event["seq"] == str(last) for c in receiver.at("/changes"))))
    changes = [c.event for c in receiver.at("/changes")]
    assert changes and not any("delta" in e for e in changes)
    assert {e["state"] for e in changes} >= {"JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"}
    assert not receiver.bad_signatures


async def test_retries_keep_the_webhook_id(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    receiver.plans["/flaky"] = [500, 500, 502]
    jobs = [
        await client.submit_spec(_job("chat", (f"{receiver.url}/flaky", FINAL, "main"))) for _ in range(3)
    ]
    for job in jobs:
        await client.wait(job.job_id, timeout=10)
    await eventually(lambda: _true(len(receiver.at("/flaky", 200)) == 3))
    by_id: dict[str, list[Call]] = {}
    for call in receiver.at("/flaky"):
        by_id.setdefault(call.headers["webhook-id"], []).append(call)
    assert sorted(c.event["jobId"] for calls in by_id.values() for c in calls[-1:]) == sorted(
        j.job_id for j in jobs
    )
    assert sum(len(calls) for calls in by_id.values()) == 6  # 3 failures retried, none lost
    for calls in by_id.values():
        assert len({c.body for c in calls}) == 1 and calls[-1].status == 200
    assert not receiver.bad_signatures


async def test_exhausted_delivery_is_dead_lettered_and_redelivered(
    client: laneway.AsyncClient,
    worker: object,
    webhooks: WebhookService,
    receiver: Receiver,
    broker: BrokerServer,
) -> None:
    receiver.plans["/down"] = [500] * 10_000
    job = await client.submit_spec(_job("chat", (f"{receiver.url}/down", FINAL, "main")))
    await client.wait(job.job_id, timeout=10)

    async def listed() -> list[dict[str, Any]]:
        result = await _cli("list", "--addr", broker.address)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]

    async def dead_lettered() -> bool:
        return len(await listed()) == 1

    await eventually(dead_lettered, timeout=15, interval=0.2)
    [entry] = await listed()
    assert entry["job_id"] == job.job_id and "HTTP 500" in entry["reason"]
    failed = receiver.at("/down")
    assert failed and len({c.headers["webhook-id"] for c in failed}) == 1
    shown = await _cli("show", str(entry["seq"]), "--addr", broker.address)
    assert shown.exit_code == 0 and json.loads(shown.output)["body"]["jobId"] == job.job_id

    receiver.plans["/down"] = []  # fixed
    result = await _cli("redeliver", str(entry["seq"]), "--addr", broker.address)
    assert result.exit_code == 0, result.output
    await eventually(lambda: _true(len(receiver.at("/down", 200)) == 1))
    assert receiver.at("/down", 200)[0].headers["webhook-id"] == failed[0].headers["webhook-id"]
    assert await listed() == []
    assert not receiver.bad_signatures


async def test_gone_disables_the_webhook(
    client: laneway.AsyncClient,
    worker: object,
    webhooks: WebhookService,
    receiver: Receiver,
    nats_server: EmbeddedNats,
) -> None:
    receiver.plans["/gone"] = [410] * 100
    nc = await nats.connect(nats_server.url)

    async def later_events_in_flight() -> None:
        # The race a loaded machine hit: the later deliveries are fetched (and wait for
        # their turn) while the first one's 410 is still on its way. Held here until
        # they are, so the test fails whenever a waiting delivery is sent anyway.
        async def waiting() -> bool:
            info = await nc.jetstream().consumer_info(t.WEBHOOKS_STREAM, t.WEBHOOK_DELIVERY_CONSUMER)
            return (info.num_ack_pending or 0) >= 2

        await eventually(waiting, timeout=30)

    receiver.holds["/gone"] = later_events_in_flight
    # Every event, so in order: RUNNING is not attempted before QUEUED's 410 is recorded.
    job = await client.submit_spec(_job("chat", (f"{receiver.url}/gone", ALL, "main")))
    await client.wait(job.job_id, timeout=10)

    def disabled() -> float:
        value = webhooks.metrics.registry.get_sample_value(
            "laneway_webhook_deliveries_total", {"endpoint": "job", "outcome": "disabled"}
        )
        return value or 0.0

    # QUEUED got 410; RUNNING and SUCCEEDED are dropped without a request.
    try:
        await eventually(lambda: _true(disabled() >= 2), timeout=30)  # ordered deliveries wait their turn
    finally:
        await nc.close()
    assert len(receiver.at("/gone")) == 1


async def test_guard_refuses_a_private_address_end_to_end(
    client: laneway.AsyncClient,
    worker: object,
    webhooks: WebhookService,
    receiver: Receiver,
    broker: BrokerServer,
) -> None:
    port = receiver.url.rsplit(":", 1)[1]
    job = await client.submit_spec(_job("chat", (f"http://127.0.0.2:{port}/private", FINAL, "main")))
    await client.wait(job.job_id, timeout=10)

    async def refused() -> bool:
        result = await _cli("list", "--addr", broker.address)
        return "address refused" in result.output

    await eventually(refused, timeout=10, interval=0.2)
    assert not receiver.at("/private")


async def test_rotation_signs_with_every_secret(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    receiver.secrets["/rot"] = [NEW, OLD]
    job = await client.submit_spec(_job("chat", (f"{receiver.url}/rot", FINAL, "rot")))
    await client.wait(job.job_id, timeout=10)
    await eventually(lambda: _true(len(receiver.at("/rot")) == 1))
    [call] = receiver.at("/rot")
    assert len(call.headers["webhook-signature"].split(" ")) == 2
    assert not receiver.bad_signatures  # each secret alone verifies it
    with pytest.raises(WebhookVerificationError):
        Webhook(MAIN).verify(call.body, call.headers)


async def test_measure_delivery_lag(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    """Reported, not asserted: final event -> first delivery attempt, 200 jobs at ~100/s."""
    ids = []
    for _ in range(200):
        ids.append((await client.submit_spec(_job("chat", (f"{receiver.url}/lag", FINAL, "main")))).job_id)
        await asyncio.sleep(0.01)  # pacing the load, not synchronisation
    await eventually(lambda: _true(len(receiver.at("/lag")) >= 200), timeout=60)
    lags = []
    for call in receiver.at("/lag"):
        finished = datetime.fromisoformat(call.event["eventTime"].replace("Z", "+00:00")).timestamp()
        lags.append((call.at - finished) * 1000)
    lags.sort()
    p50, p99 = statistics.median(lags), lags[int(len(lags) * 0.99) - 1]
    print(
        f"\nwebhook lag, final event -> first attempt: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(lags)} jobs)"
    )
    assert len({c.event["jobId"] for c in receiver.at("/lag")}) == 200


async def _true(value: bool) -> bool:
    return value
