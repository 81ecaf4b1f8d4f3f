"""Webhook deliveries as callers see them through the broker: each delivery's state in
``GetJob``, and the webhook dead letters through ``ListWebhookDeadLetters``,
``GetWebhookDeadLetter`` and ``RedeliverWebhookDeadLetters`` (and ``laneway webhooks
list|show|redeliver`` on top of them), with tenants and roles. A real nats-server,
broker, worker and webhook delivery process, and a real HTTP receiver on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import nats
import pytest
from aiohttp import web

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core.api_keys import hash_key
from laneway.broker.core.key_store import create_key
from laneway.broker.core.webhook_status import MAX_ENTRIES, DeliveryStatus, _bounded, redact_endpoint
from laneway.broker.server.process import BrokerServer
from laneway.broker.webhooks.delivery import Tuning
from laneway.broker.webhooks.service import WebhookService
from laneway.v1 import errors_pb2, job_pb2
from tests.cli_process import run_laneway
from tests.conftest import eventually, make_config
from tests.test_webhooks import MAIN, Receiver, watched

FINAL = job_pb2.NOTIFY_EVENTS_FINAL
S = job_pb2.WebhookDeliveryState
ACME_SUBMITTER = "acme-submitter-key-for-webhook-tests"
ADMIN = "ops-admin-key-for-webhook-tests"
GLOBEX_SUBMITTER = "globex-submitter-key-for-webhook-tests"

_WEBHOOKS = """
webhooks:
  secrets: {{main: ["{secret}"]}}
  allow_hosts: ["127.0.0.1"]
  max_age_s: 3
  timeout_s: 2
  subscriptions:
    - {{route: embed, url: "{url}/sub", events: final, secret: main}}
providers:
  mock:
    type: mock
    concurrency: 64
    token_delay_ms: 1
"""
_AUTH = f"""
auth:
  enabled: true
  static_keys:
    ci: {{key_sha256: {hash_key(ACME_SUBMITTER)}, tenant: acme, role: submitter}}
    globex: {{key_sha256: {hash_key(GLOBEX_SUBMITTER)}, tenant: globex, role: submitter}}
    ops: {{key_sha256: {hash_key(ADMIN)}, tenant: ops, role: admin}}
"""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    runner = web.ServerRunner(web.Server(rec.handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@pytest.fixture
def auth() -> bool:
    """Whether the broker wants API keys (a test parametrizes it to True)."""
    return False


@pytest.fixture
def config(receiver: Receiver, auth: bool) -> LanewayConfig:
    return make_config((_AUTH if auth else "") + _WEBHOOKS.format(secret=MAIN, url=receiver.url))


@pytest.fixture
async def webhooks(
    nats_server: EmbeddedNats, config: LanewayConfig, broker: BrokerServer
) -> AsyncIterator[WebhookService]:
    tuning = Tuning(backoff_base_s=0.05, backoff_max_s=0.3, circuit_failures=1000)
    async with WebhookService(config, nats_url=nats_server.url, tuning=tuning) as service, watched(service):
        yield service


def _job(url: str, route: str = "chat") -> job_pb2.JobSpec:
    spec = laneway.job(route, laneway.embedding("hi") if route == "embed" else laneway.chat("hello"))
    if url:
        spec.notify.add(url=url, events=FINAL, secret="main")
    return spec


async def _state(client: laneway.AsyncClient, job_id: str, state: int) -> job_pb2.WebhookDelivery | None:
    deliveries = (await client.get_job(job_id)).deliveries
    return deliveries[0] if len(deliveries) == 1 and deliveries[0].state == state else None


async def _reaches(
    client: laneway.AsyncClient, job_id: str, state: int, timeout: float = 20
) -> job_pb2.WebhookDelivery:
    found: list[job_pb2.WebhookDelivery] = []

    async def reached() -> bool:
        d = await _state(client, job_id, state)
        if d is not None:
            found.append(d)
        return d is not None

    await eventually(reached, timeout=timeout, interval=0.05)
    return found[0]


# --- the record ---------------------------------------------------------------------------


def test_endpoints_never_show_credentials() -> None:
    assert redact_endpoint("https://u:p@hooks.example.com:8443/a/b?token=t&x=1#frag") == (
        "https://***@hooks.example.com:8443/a/b?***"
    )
    assert redact_endpoint("https://hooks.example.com/a") == "https://hooks.example.com/a"
    assert redact_endpoint("http://[::1") == "***"  # unparsable: nothing of it


def test_a_job_record_stays_bounded_finished_ones_first() -> None:
    statuses = {
        f"w{i}": DeliveryStatus.new(
            webhook_id=f"w{i}", url="http://h/x", source="job", event_seq=i,
            state="pending" if i % 2 else "delivered", updated=float(i),
        )
        for i in range(MAX_ENTRIES + 10)
    }  # fmt: skip
    kept = _bounded(statuses)
    assert len(kept) == MAX_ENTRIES
    # The 10 oldest delivered ones made room; every pending one is still there.
    assert set(statuses) - set(kept) == {f"w{i}" for i in range(0, 20, 2)}


# --- GetJob -----------------------------------------------------------------------------


async def test_get_job_shows_attempts_and_last_status(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    receiver.plans["/flaky"] = [500]
    port = receiver.url.rsplit(":", 1)[1]
    # Credentials in the user info and the query: GetJob must never show them.
    url = f"http://hook:pw-secret-1@127.0.0.1:{port}/flaky?token=tok-secret-2"
    job = await client.submit_spec(_job(url))
    final = await client.wait(job.job_id, timeout=10)
    d = await _reaches(client, job.job_id, S.WEBHOOK_DELIVERY_STATE_DELIVERED)
    assert d.attempts >= 2 and d.last_status == 200 and d.last_error == ""
    assert d.source == "job" and d.event_seq == final.seq
    assert [c.status for c in receiver.at("/flaky")] == [500, 200]
    assert d.webhook_id == receiver.at("/flaky")[-1].headers["webhook-id"]
    assert d.HasField("last_attempt_time") and not d.HasField("next_attempt_time")
    assert "secret" not in d.endpoint and d.endpoint.startswith("http://***@127.0.0.1:")
    assert d.endpoint.endswith("/flaky?***")

    # A route's standing subscription is listed under its label; a job with neither has none.
    embed = await client.submit_spec(_job("", route="embed"))
    await client.wait(embed.job_id, timeout=10)
    sub = await _reaches(client, embed.job_id, S.WEBHOOK_DELIVERY_STATE_DELIVERED)
    assert sub.source == "embed#0" and sub.endpoint == f"{receiver.url}/sub"
    plain = await client.submit_spec(_job(""))
    await client.wait(plain.job_id, timeout=10)
    assert not (await client.get_job(plain.job_id)).deliveries


async def test_dead_letters_are_listed_paged_and_redelivered(
    client: laneway.AsyncClient, worker: object, webhooks: WebhookService, receiver: Receiver
) -> None:
    receiver.plans["/down"] = [500] * 10_000
    jobs = [(await client.submit_spec(_job(f"{receiver.url}/down"))).job_id for _ in range(3)]
    retrying = await _reaches(client, jobs[0], S.WEBHOOK_DELIVERY_STATE_RETRYING)
    assert retrying.last_status == 500 and "HTTP 500" in retrying.last_error
    assert retrying.HasField("next_attempt_time")
    for job_id in jobs:
        dead = await _reaches(client, job_id, S.WEBHOOK_DELIVERY_STATE_DEAD_LETTERED)
        assert dead.last_status == 500 and dead.attempts >= 2

    pages, token = [], ""
    while True:
        page = await client.list_webhook_dead_letters(page_size=1, page_token=token)
        pages.append(list(page.dead_letters))
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [1, 1, 1]
    listed = [p[0] for p in pages]
    assert sorted(dl.job_id for dl in listed) == sorted(jobs)
    assert [dl.seq for dl in listed] == sorted(dl.seq for dl in listed)
    assert all(dl.endpoint == "job" and dl.last_status == 500 and not dl.body for dl in listed)
    assert len((await client.list_webhook_dead_letters(endpoint="job")).dead_letters) == 3
    assert not (await client.list_webhook_dead_letters(endpoint="embed#0")).dead_letters
    [mine] = (await client.list_webhook_dead_letters(job_id=jobs[0])).dead_letters
    full = await client.get_webhook_dead_letter(mine.seq)
    assert json.loads(full.body)["jobId"] == jobs[0] and full.webhook_id == mine.webhook_id

    receiver.plans["/down"] = []  # fixed
    outcome = await client.redeliver_webhook_dead_letters([mine.seq, 999_999])
    assert [(r.seq, r.webhook_id, r.HasField("error")) for r in outcome] == [
        (mine.seq, mine.webhook_id, False),
        (999_999, "", True),
    ]
    assert outcome[1].error.reason == errors_pb2.ERROR_REASON_UNKNOWN_WEBHOOK_DEAD_LETTER
    await eventually(lambda: _true(bool(receiver.at("/down", 200))), timeout=10)
    assert [c.headers["webhook-id"] for c in receiver.at("/down", 200)] == [mine.webhook_id]
    await _reaches(client, jobs[0], S.WEBHOOK_DELIVERY_STATE_DELIVERED)
    assert len((await client.list_webhook_dead_letters()).dead_letters) == 2
    by_filter = await client.redeliver_webhook_dead_letters(job_id=jobs[1])
    assert [r.webhook_id for r in by_filter] == [d.webhook_id for d in listed if d.job_id == jobs[1]]


async def test_bad_requests_name_the_field(client: laneway.AsyncClient, webhooks: WebhookService) -> None:
    cases = [
        ("page_size", client.list_webhook_dead_letters(page_size=-1)),
        ("page_token", client.list_webhook_dead_letters(page_token="abc")),
        ("filter.endpoint", client.list_webhook_dead_letters(endpoint="no such thing")),
        ("filter.job_id", client.list_webhook_dead_letters(job_id="a b")),
        ("seq", client.get_webhook_dead_letter(0)),
        ("filter", client.redeliver_webhook_dead_letters()),
        ("seqs[1]", client.redeliver_webhook_dead_letters([3, 0])),
        ("seqs", client.redeliver_webhook_dead_letters([3], job_id="x")),
        ("limit", client.redeliver_webhook_dead_letters(all=True, limit=-1)),
    ]
    for field, call in cases:
        with pytest.raises(laneway.InvalidArgument) as err:
            await call
        assert err.value.field == field, (field, err.value)
    with pytest.raises(laneway.NotFound) as missing:
        await client.get_webhook_dead_letter(42)
    assert missing.value.reason == "UNKNOWN_WEBHOOK_DEAD_LETTER" and missing.value.metadata["seq"] == "42"


# --- tenants, roles and the CLI -----------------------------------------------------------


@pytest.mark.parametrize("auth", [True])
async def test_tenants_roles_and_the_cli(
    nats_server: EmbeddedNats,
    broker: BrokerServer,
    worker: object,
    webhooks: WebhookService,
    receiver: Receiver,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        _, reader = await create_key(nc.jetstream(), tenant="acme", role="reader")
    finally:
        await nc.close()
    receiver.plans["/down"] = [500] * 10_000
    addr = broker.address
    async with (
        laneway.AsyncClient(addr, api_key=ACME_SUBMITTER, timeout=10) as acme,
        laneway.AsyncClient(addr, api_key=GLOBEX_SUBMITTER, timeout=10) as globex,
        laneway.AsyncClient(addr, api_key=reader, timeout=10) as acme_reader,
        laneway.AsyncClient(addr, api_key=ADMIN, timeout=10) as admin,
    ):
        job_id = (await acme.submit_spec(_job(f"{receiver.url}/down"))).job_id
        await _reaches(acme, job_id, S.WEBHOOK_DELIVERY_STATE_DEAD_LETTERED)
        [dl] = (await acme.list_webhook_dead_letters()).dead_letters
        assert dl.job_id == job_id and dl.tenant == "acme"

        # Another tenant: the job, its deliveries and its dead letter do not exist.
        with pytest.raises(laneway.NotFound):
            await globex.get_job(job_id)
        assert not (await globex.list_webhook_dead_letters()).dead_letters
        assert not (await globex.list_webhook_dead_letters(job_id=job_id)).dead_letters
        with pytest.raises(laneway.NotFound):
            await globex.get_webhook_dead_letter(dl.seq)
        [refused] = await globex.redeliver_webhook_dead_letters([dl.seq])
        assert refused.HasField("error") and refused.error.code == 5  # NOT_FOUND
        assert not await globex.redeliver_webhook_dead_letters(job_id=job_id)
        # Roles: as RedriveDeadLetters (a reader may not; `all` is for admins).
        with pytest.raises(laneway.PermissionDenied):
            await acme_reader.redeliver_webhook_dead_letters([dl.seq])
        with pytest.raises(laneway.PermissionDenied):
            await acme.redeliver_webhook_dead_letters(all=True)
        assert [d.job_id for d in (await admin.list_webhook_dead_letters()).dead_letters] == [job_id]
        assert (await acme_reader.get_webhook_dead_letter(dl.seq)).job_id == job_id

        # The CLI goes through the same RPCs: the key decides what it sees and may do.
        async def cli(key: str, *args: str) -> tuple[int, str, str]:
            ran = await run_laneway("webhooks", *args, "--addr", addr, env={"LANEWAY_API_KEY": key})
            return ran.code, ran.out, ran.err

        code, out, _ = await cli(reader, "list")
        assert code == 0 and [json.loads(line)["seq"] for line in out.splitlines()] == [dl.seq]
        code, out, _ = await cli(GLOBEX_SUBMITTER, "list")
        assert code == 0 and out == ""
        code, out, _ = await cli(reader, "show", str(dl.seq))
        assert code == 0 and json.loads(out)["body"]["jobId"] == job_id
        code, _, err = await cli(reader, "redeliver", str(dl.seq))
        assert code == 2 and "PERMISSION_DENIED" in err.upper().replace(" ", "_")
        ran = await run_laneway("webhooks", "list", "--addr", addr, drop=("LANEWAY_API_KEY",))
        assert ran.code == 2 and "--api-key" in ran.err
        receiver.plans["/down"] = []
        code, out, _ = await cli(ACME_SUBMITTER, "redeliver", str(dl.seq))
        assert code == 0 and out.strip() == f"redelivered 1: {dl.seq}"
        await eventually(lambda: _true(bool(receiver.at("/down", 200))), timeout=10)
        assert receiver.at("/down", 200)[0].headers["webhook-id"] == dl.webhook_id
        await _reaches(acme, job_id, S.WEBHOOK_DELIVERY_STATE_DELIVERED)


async def _true(value: bool) -> bool:
    return value
