"""Webhook delivery through a receiver outage (issue 16): the retry schedule
(``laneway.broker.webhooks.retry``) on its own, then end to end with a real
nats-server, broker, worker, webhook delivery process and a loopback receiver that
answers 500 until it is switched back to 200."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.server.process import BrokerServer
from laneway.broker.webhooks.retry import Admission, Circuit, Tuning, retry_delay
from laneway.broker.webhooks.service import WebhookService
from laneway.v1 import job_pb2
from tests.conftest import eventually, make_config
from tests.test_webhooks import MAIN

# --- the schedule, without a server ---------------------------------------------------

SMALL = Tuning(
    circuit_failures=3, circuit_open_s=1.0, circuit_open_max_s=4.0, hold_spread=0.2, probe_hold_s=0.5
)


@given(
    attempt=st.integers(1, 500),
    base=st.floats(0.01, 10.0),
    cap=st.floats(0.01, 7200.0),
)
def test_backoff_doubles_per_attempt_within_its_cap(attempt: int, base: float, cap: float) -> None:
    tuning = Tuning(backoff_base_s=base, backoff_max_s=cap)
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 60))
    assert 0.5 * ceiling <= tuning.backoff(attempt) <= ceiling


def test_circuit_opens_holds_then_lets_one_probe_through() -> None:
    c = Circuit(SMALL)
    assert c.admit(0.0) == (Admission.SEND, 0)
    assert not c.failed(0.0) and not c.failed(0.1)
    assert c.failed(0.2)  # the third consecutive failure opens it, for 1 s
    assert c.open_until == pytest.approx(1.2) and c.holding(0.5)
    assert c.admit(0.5)[0] is Admission.HOLD
    assert 0.7 <= c.hold_delay(0.5) <= 0.7 + 0.2 * 1.0  # to the end, spread over 20% of it
    assert not c.failed(0.6)  # a request sent before it opened, failing late: no change
    assert c.open_until == pytest.approx(1.2)

    admission, probe = c.admit(1.2)
    assert admission is Admission.PROBE and probe
    assert c.admit(1.21)[0] is Admission.HOLD  # one probe at a time
    assert 0.5 <= c.hold_delay(1.21) <= 1.0
    assert c.failed(1.3, probe)  # a failed probe reopens it for twice as long
    assert c.period == 2.0 and c.open_until == pytest.approx(3.3)
    periods = []
    now = 3.3
    for _ in range(4):
        _, probe = c.admit(now)
        c.failed(now, probe)
        periods.append(c.period)
        now = c.open_until
    assert periods == [4.0, 4.0, 4.0, 4.0]  # capped at circuit_open_max_s

    _, probe = c.admit(now)
    assert c.succeeded()  # the probe's 2xx closes it
    assert c.closed and c.admit(now) == (Admission.SEND, 0)
    assert not c.failed(now) and not c.failed(now)
    assert c.failed(now) and c.period == 1.0  # the next outage starts from the first period


def test_a_probe_without_an_answer_lets_the_next_delivery_probe() -> None:
    c = Circuit(SMALL)
    for _ in range(3):
        c.failed(0.0)
    _, probe = c.admit(1.0)
    c.release(probe)  # e.g. its address was refused: no verdict on the endpoint
    assert c.admit(1.0)[0] is Admission.PROBE
    c.release(probe)  # a stale token changes nothing
    assert c.admit(1.0)[0] is Admission.HOLD


@given(
    st.lists(
        st.tuples(st.sampled_from(["fail", "ok", "probe_fail", "probe_ok", "release"]), st.floats(0, 10))
    )
)
def test_circuit_invariants(ops: list[tuple[str, float]]) -> None:
    c = Circuit(SMALL)
    now = 0.0
    outstanding = 0
    for op, step in ops:
        now += step
        if op == "fail":
            c.failed(now)
        elif op == "ok":
            c.succeeded()
            outstanding = 0
        else:
            admission, probe = c.admit(now)
            if c.closed:
                assert admission is Admission.SEND
            if admission is Admission.PROBE:
                assert outstanding == 0  # never two probes in flight
                outstanding = probe
                if op == "probe_fail":
                    assert c.failed(now, probe) and c.holding(now)
                    outstanding = 0
                elif op == "probe_ok":
                    assert c.succeeded() and c.closed
                    outstanding = 0
                else:
                    c.release(probe)
                    outstanding = 0
        assert 0 <= c.period <= SMALL.circuit_open_max_s
        assert c.closed == (c.opens == 0)
        if c.holding(now):
            assert c.hold_delay(now) > 0


def test_retry_delay_follows_the_circuit_and_the_horizon() -> None:
    tuning = Tuning(backoff_base_s=1.0, backoff_max_s=3600.0, circuit_failures=1, circuit_open_s=3.0)
    closed = Circuit(tuning)
    assert 4.0 <= (retry_delay(tuning, closed, 4, 86_400.0, 0.0) or 0) <= 8.0  # backoff by attempts
    # The horizon counts from the first enqueue: many attempts give up nothing early;
    # the last retry is made at the horizon.
    assert retry_delay(tuning, closed, 40, 1800.0, 0.0) == 1800.0  # 1 h backoff, 30 min left
    assert retry_delay(tuning, closed, 1, 0.0, 0.0) is None
    # The circuit open: the endpoint's schedule (its open period), however many attempts.
    opened = Circuit(tuning)
    opened.failed(10.0)
    delay = retry_delay(tuning, opened, 40, 86_400.0, 10.0)
    assert delay is not None and 3.0 <= delay <= 3.0 * (1 + tuning.hold_spread)


# --- end to end: a receiver down, then back -------------------------------------------

E2E = Tuning(
    circuit_failures=3,
    circuit_open_s=0.2,
    circuit_open_max_s=0.5,
    backoff_base_s=0.5,
    backoff_max_s=120.0,  # large: a count inflated by holds would show as a long wait
    hold_spread=0.2,
    probe_hold_s=0.05,
)
JOBS = 20
RECOVERY_DEADLINE_S = 5.0


@dataclass
class FlakyReceiver:
    """Answers 500 while ``down``, then 200; counts requests by path and webhook-id."""

    url: str = ""
    down: bool = True
    up_at: float = 0.0
    calls: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    """path -> (webhook-id, event seq, status) in arrival order."""
    last_ok: float = 0.0

    async def handle(self, request: web.BaseRequest) -> web.Response:
        event = await request.json()
        status = 500 if self.down else 200
        self.calls.setdefault(request.path, []).append(
            (request.headers["webhook-id"], int(event["seq"]), status)
        )
        if status == 200:
            self.last_ok = time.monotonic()
        return web.Response(status=status, text="ok")

    def at(self, path: str, status: int | None = None) -> list[tuple[str, int, int]]:
        return [c for c in self.calls.get(path, []) if status is None or c[2] == status]


@pytest.fixture
async def receiver() -> AsyncIterator[FlakyReceiver]:
    rec = FlakyReceiver()
    runner = web.ServerRunner(web.Server(rec.handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(f"""
webhooks:
  secrets: {{main: ["{MAIN}"]}}
  allow_hosts: ["127.0.0.1"]
  max_age_s: 600
  timeout_s: 2
providers:
  mock: {{type: mock, concurrency: 64, token_delay_ms: 1}}
""")


@pytest.fixture
async def webhooks(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> AsyncIterator[WebhookService]:
    async with WebhookService(config, nats_url=nats_server.url, tuning=E2E) as service:
        yield service


def _holds(service: WebhookService) -> float:
    value = service.metrics.registry.get_sample_value(
        "laneway_webhook_deliveries_total", {"endpoint": "job", "outcome": "circuit_open"}
    )
    return value or 0.0


async def test_backlog_drains_promptly_after_an_outage(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: FlakyReceiver
) -> None:
    final_jobs = []
    for _ in range(JOBS):
        spec = laneway.job("chat", laneway.chat("hello"))
        spec.notify.add(url=f"{receiver.url}/final", events=job_pb2.NOTIFY_EVENTS_FINAL, secret="main")
        final_jobs.append((await client.submit_spec(spec)).job_id)
    ordered = laneway.job("chat", laneway.chat("hello there you", stream=True))
    ordered.notify.add(url=f"{receiver.url}/ordered", events=job_pb2.NOTIFY_EVENTS_ALL, secret="main")
    ordered_id = (await client.submit_spec(ordered)).job_id
    for job_id in final_jobs:
        await client.wait(job_id, timeout=10)
    last_seq = (await client.wait(ordered_id, timeout=10)).seq
    started = time.monotonic()

    # Down until both endpoints' circuits have opened and been probed at least once,
    # and their deliveries held many times over (each hold a JetStream redelivery).
    async def well_into_the_outage() -> bool:
        return (
            len(receiver.at("/final")) >= E2E.circuit_failures + 2
            and len(receiver.at("/ordered")) >= E2E.circuit_failures + 2
            and _holds(webhooks) >= 5 * JOBS
        )

    await eventually(well_into_the_outage, timeout=30, interval=0.05)
    outage_s = time.monotonic() - started
    failed_final = len(receiver.at("/final"))
    receiver.down, receiver.up_at = False, time.monotonic()

    async def all_delivered() -> bool:
        final_ok = {wid for wid, _, _ in receiver.at("/final", 200)}
        return len(final_ok) == JOBS and len(receiver.at("/ordered", 200)) >= last_seq

    await eventually(all_delivered, timeout=30, interval=0.02)
    recovery_s = receiver.last_ok - receiver.up_at
    print(f"\noutage {outage_s:.1f} s, {_holds(webhooks):g} holds; all delivered {recovery_s:.2f} s after")
    # Prompt: within the longest open period and a few short backoffs. A delivery count
    # inflated by holds (the old schedule) waits minutes here.
    assert recovery_s < RECOVERY_DEADLINE_S

    # The outage cost the receiver the first failures and about one probe per open
    # period, not one request per hold.
    assert failed_final <= JOBS + 2 + math.ceil(outage_s / E2E.circuit_open_s)

    # Every event of the ordered webhook arrived once, in seq order, and nothing was
    # attempted before the event ahead of it was delivered.
    assert [seq for _, seq, _ in receiver.at("/ordered", 200)] == list(range(1, last_seq + 1))
    attempted = [seq for _, seq, _ in receiver.at("/ordered")]
    assert attempted == sorted(attempted)

    # The delivery record counts requests, not holds: exactly what the receiver saw.
    requests = Counter(wid for path in ("/final", "/ordered") for wid, _, _ in receiver.at(path))
    recorded: dict[str, int] = {}

    async def recorded_delivered() -> bool:
        recorded.clear()
        for job_id in [*final_jobs, ordered_id]:
            for d in (await client.get_job(job_id)).deliveries:
                if d.state == job_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED:
                    recorded[d.webhook_id] = d.attempts
        return len(recorded) == JOBS + last_seq

    await eventually(recorded_delivered, timeout=10, interval=0.05)
    assert recorded == dict(requests)
    assert sum(recorded.values()) < _holds(webhooks)  # held far more often than tried
