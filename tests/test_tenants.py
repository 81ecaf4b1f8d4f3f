"""Tenants: every job, dead letter, idempotency key and debounce key is its submitter's
tenant's. Another tenant's job answers exactly as an unknown id does (NOT_FOUND,
UNKNOWN_JOB, the same message and details), the job itself untouched; dead letters
are listed and redriven per tenant; admins see all and may filter by tenant; the
same idempotency or debounce key in two tenants names two independent jobs.

End to end over a real broker (auth on, static keys for tenants ``acme`` and
``globex`` and an ``ops`` admin), worker and nats-server; the wire and key
functions also on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta

import grpc
import nats
import nats.errors
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.api_keys import hash_key
from laneway.broker.core.dead_letters import DeadLetterFilter
from laneway.broker.core.events import first_event
from laneway.broker.core.model import (
    ChatInput,
    ChatMessage,
    ErrorClass,
    JobError,
    JobSpec,
    JobState,
    QueuedJob,
    new_job_id,
    utcnow,
)
from laneway.broker.core.wire.dead_letters import DeadLetter, decode_dead_letter, encode_dead_letter
from laneway.broker.core.wire.events import decode_event, encode_event, event_to_pb, job_from_events
from laneway.broker.core.wire.jobs import decode_queued_job, encode_queued_job
from laneway.broker.server.principal import ANONYMOUS, Principal
from laneway.broker.server.process import BrokerServer
from laneway.broker.server.tenancy import dead_letter_scope, requested_filter, tenant_scope
from laneway.v1 import broker_service_pb2 as pb
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import dead_letter_pb2, job_pb2
from laneway.workers.pool import WorkerPool
from tests.conftest import eventually, make_config

S = job_pb2
KEYS = {"acme": "acme-submitter-key-for-tests", "globex": "globex-submitter-key-for-tests"}
ADMIN_KEY = "ops-admin-key-for-tests"
# What acme puts in its jobs; none of it may reach globex.
SECRET_TEXT = "acme-confidential-prompt-7731"
SECRET_META = "acme-private-label-4410"


def _auth_config(extra: str = "") -> LanewayConfig:
    return make_config(
        f"""
auth:
  enabled: true
  static_keys:
    acme-ci:
      key_sha256: {hash_key(KEYS["acme"])}
      tenant: acme
      role: submitter
    globex-ci:
      key_sha256: {hash_key(KEYS["globex"])}
      tenant: globex
      role: submitter
    ops:
      key_sha256: {hash_key(ADMIN_KEY)}
      tenant: ops
      role: admin
{extra}"""
    )


def _metadata(key: str) -> dict[str, str]:
    # Plaintext loopback in tests: the header goes in as metadata (api_key= needs TLS).
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def config() -> LanewayConfig:
    return _auth_config()


@contextlib.asynccontextmanager
async def _client(broker: BrokerServer, key: str) -> AsyncIterator[laneway.AsyncClient]:
    async with laneway.AsyncClient(broker.address, timeout=10, call_metadata=_metadata(key)) as c:
        yield c


@pytest.fixture
async def acme(broker: BrokerServer) -> AsyncIterator[laneway.AsyncClient]:
    async with _client(broker, KEYS["acme"]) as c:
        yield c


@pytest.fixture
async def globex(broker: BrokerServer) -> AsyncIterator[laneway.AsyncClient]:
    async with _client(broker, KEYS["globex"]) as c:
        yield c


@pytest.fixture
async def ops(broker: BrokerServer) -> AsyncIterator[laneway.AsyncClient]:
    async with _client(broker, ADMIN_KEY) as c:
        yield c


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


# --- what globex gets back, byte for byte ------------------------------------------


Answer = tuple[grpc.StatusCode, str, bytes, list[bytes]]


async def _unary_answer(call: Awaitable[object]) -> Answer:
    try:
        response = await call
    except grpc.aio.AioRpcError as err:
        trailers = dict(err.trailing_metadata() or ())
        details = trailers.get("grpc-status-details-bin", b"")
        assert isinstance(details, bytes)
        return err.code(), err.details() or "", details, []
    assert hasattr(response, "SerializeToString")
    return grpc.StatusCode.OK, "", b"", [response.SerializeToString()]


async def _stream_answer(call: grpc.aio.UnaryStreamCall[object, object]) -> Answer:
    got: list[bytes] = []
    try:
        async for response in call:
            assert hasattr(response, "SerializeToString")
            got.append(response.SerializeToString())
    except grpc.aio.AioRpcError as err:
        trailers = dict(err.trailing_metadata() or ())
        details = trailers.get("grpc-status-details-bin", b"")
        assert isinstance(details, bytes)
        return err.code(), err.details() or "", details, got
    return grpc.StatusCode.OK, "", b"", got


def _masked(answer: Answer, job_id: str) -> Answer:
    """The answer with ``job_id`` replaced (ids are all 26 characters, so encoded
    lengths stay the same and the bytes compare)."""
    mask = "X" * len(job_id)
    code, details, status, responses = answer
    return (
        code,
        details.replace(job_id, mask),
        status.replace(job_id.encode(), mask.encode()),
        [r.replace(job_id.encode(), mask.encode()) for r in responses],
    )


async def _globex_answers(stub: pb_grpc.BrokerServiceStub, job_id: str, own: str) -> list[Answer]:
    """globex's GetJob, StreamResults (alone, and beside its own job), CancelJob of ``job_id``."""
    md = tuple(_metadata(KEYS["globex"]).items())
    return [
        await _unary_answer(stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=md)),
        await _stream_answer(stub.StreamResults(pb.StreamResultsRequest(job_ids=[job_id]), metadata=md)),
        await _stream_answer(
            stub.StreamResults(pb.StreamResultsRequest(job_ids=[own, job_id], final_only=True), metadata=md)
        ),
        await _stream_answer(
            stub.StreamResults(
                pb.StreamResultsRequest(job_ids=[job_id], resume_after={job_id: 1}), metadata=md
            )
        ),
        await _unary_answer(
            stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="mine now"), metadata=md)
        ),
    ]


def _assert_nothing_of_acme(answers: list[Answer], ids: list[str], *also: str) -> None:
    """No trace of acme in ``answers`` once the job ``ids`` globex sent (or owns) are
    masked (a random id could spell "acme")."""
    for job_id in ids:
        answers = [_masked(a, job_id) for a in answers]
    blob = repr(answers).encode() + b"".join(a[2] + b"".join(a[3]) for a in answers)
    for secret in (SECRET_TEXT, SECRET_META, "acme", *also):
        assert secret.encode() not in blob, secret


# --- end to end ----------------------------------------------------------------------


async def test_another_tenants_job_is_not_found_and_untouched(worker, acme, globex, ops, stub) -> None:
    job = await acme.submit(
        "slow", laneway.chat(SECRET_TEXT), metadata={"label": SECRET_META}, idempotency_key="acme-order-1"
    )
    own = await globex.submit("chat", laneway.chat("globex's own"))
    await globex.wait(own.job_id)
    unknown = new_job_id()

    hidden = await _globex_answers(stub, job.job_id, own.job_id)
    absent = await _globex_answers(stub, unknown, own.job_id)
    # Exactly what an id that names nothing gets: code, message, details, nothing streamed.
    assert [_masked(a, job.job_id) for a in hidden] == [_masked(a, unknown) for a in absent]
    for code, details, status, responses in hidden:
        assert code == grpc.StatusCode.NOT_FOUND and responses == [], details
        assert b"UNKNOWN_JOB" in status
    # Past the id globex sent itself, nothing of acme's job comes back.
    _assert_nothing_of_acme(hidden, [job.job_id, own.job_id])
    with pytest.raises(laneway.NotFound) as err:
        await globex.get_job(job.job_id)
    assert err.value.reason == "UNKNOWN_JOB"

    # acme's job is untouched: it runs to the end, not cancelled, and is acme's throughout.
    events = [e async for e in acme.stream_results(job.job_id)]
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    assert {e.tenant for e in events} == {"acme"}
    assert SECRET_TEXT in events[-1].result.chat.text
    seen = await acme.get_job(job.job_id)
    assert (seen.tenant, seen.state, seen.metadata["label"]) == ("acme", S.JOB_STATE_SUCCEEDED, SECRET_META)
    # globex's own job is globex's; the admin sees both.
    assert (await globex.get_job(own.job_id)).tenant == "globex"
    assert (await ops.get_job(job.job_id)).tenant == "acme"
    assert {e.tenant async for e in ops.stream_results([job.job_id, own.job_id], final_only=True)} == {
        "acme",
        "globex",
    }


async def test_another_tenant_cannot_cancel_a_waiting_job_but_an_admin_can(acme, globex, ops) -> None:
    # No worker: the delayed job waits, so a cancel would take effect if it were allowed.
    job = await acme.submit("chat", laneway.chat(SECRET_TEXT), delay=60)
    with pytest.raises(laneway.NotFound):
        await globex.cancel_job(job.job_id)
    assert (await acme.get_job(job.job_id)).state == S.JOB_STATE_SCHEDULED
    cancelled = await ops.cancel_job(job.job_id, "ops says no")
    assert cancelled.cancelled
    final = await acme.get_job(job.job_id)
    assert (final.state, final.tenant) == (S.JOB_STATE_CANCELLED, "acme")


async def test_dead_letters_are_listed_and_redriven_per_tenant(worker, acme, globex, ops, stub) -> None:
    bad = {"mock.fail": "400", "label": SECRET_META}
    mine = await acme.submit("chat", laneway.chat(SECRET_TEXT), metadata=bad)
    theirs = await globex.submit("chat", laneway.chat("globex bad"), metadata={"mock.fail": "400"})
    await asyncio.gather(acme.wait(mine.job_id), globex.wait(theirs.job_id))

    async def both_stored() -> bool:
        return len((await ops.list_dead_letters()).dead_letters) == 2

    await eventually(both_stored)

    # globex sees only its own, whatever it asks for.
    listed = (await globex.list_dead_letters()).dead_letters
    assert [(d.job_id, d.tenant) for d in listed] == [(theirs.job_id, "globex")]
    assert (await globex.list_dead_letters(job_ids=[mine.job_id])).dead_letters == []
    md = tuple(_metadata(KEYS["globex"]).items())
    asked_for_acme = pb.ListDeadLettersRequest(filter=dead_letter_pb2.DeadLetterFilter(tenant="acme"))
    forced = await stub.ListDeadLetters(asked_for_acme, metadata=md)
    assert [d.job_id for d in forced.dead_letters] == [theirs.job_id]
    # Redriving acme's job by id does what an unknown id does: nothing, and says nothing.
    unknown = new_job_id()
    by_id = await _unary_answer(
        stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(filter=dead_letter_pb2.DeadLetterFilter(job_ids=[mine.job_id])),
            metadata=md,
        )
    )
    by_unknown = await _unary_answer(
        stub.RedriveDeadLetters(
            pb.RedriveDeadLettersRequest(filter=dead_letter_pb2.DeadLetterFilter(job_ids=[unknown])),
            metadata=md,
        )
    )
    assert by_id == by_unknown == (grpc.StatusCode.OK, "", b"", [b""])
    answers = [by_id, (grpc.StatusCode.OK, "", b"", [forced.SerializeToString()])]
    _assert_nothing_of_acme(answers, [theirs.job_id], mine.job_id)

    # The admin sees both, filters by tenant, and acme's dead letter is still there.
    everything = (await ops.list_dead_letters()).dead_letters
    assert {(d.job_id, d.tenant) for d in everything} == {(mine.job_id, "acme"), (theirs.job_id, "globex")}
    admin_md = tuple(_metadata(ADMIN_KEY).items())
    only_acme = await stub.ListDeadLetters(asked_for_acme, metadata=admin_md)
    assert [(d.job_id, d.tenant) for d in only_acme.dead_letters] == [(mine.job_id, "acme")]
    assert only_acme.dead_letters[0].spec.metadata["label"] == SECRET_META
    only_globex = (await ops.list_dead_letters(tenant="globex")).dead_letters
    assert [(d.job_id, d.tenant) for d in only_globex] == [(theirs.job_id, "globex")]

    # An admin's redrive of acme's dead letter makes a job that is still acme's.
    redriven = await ops.redrive_dead_letters(job_ids=[mine.job_id])
    assert [(r.job_id, r.error) for r in redriven] == [(mine.job_id, None)]
    again = await acme.get_job(redriven[0].new_job_id)
    assert again.tenant == "acme" and again.metadata["laneway.redriven_from"] == mine.job_id
    with pytest.raises(laneway.NotFound):
        await globex.get_job(redriven[0].new_job_id)
    # It fails again (mock.fail 400) and is dead-lettered as acme's once more.
    await acme.wait(redriven[0].new_job_id)

    async def back_as_acmes() -> bool:
        page = await stub.ListDeadLetters(asked_for_acme, metadata=admin_md)
        return [(d.job_id, d.tenant) for d in page.dead_letters] == [(redriven[0].new_job_id, "acme")]

    await eventually(back_as_acmes)
    # And a tenant's own redrive keeps its tenant too.
    own = await globex.redrive_dead_letters(job_ids=[theirs.job_id])
    assert (await globex.get_job(own[0].new_job_id)).tenant == "globex"


async def test_idempotency_keys_are_per_tenant(acme, globex) -> None:
    spec = laneway.job("chat", laneway.chat("same request"), idempotency_key="order-1")
    a1, g1 = await acme.submit_spec(spec), await globex.submit_spec(spec)
    assert a1.job_id != g1.job_id and not a1.duplicate and not g1.duplicate
    a2, g2 = await acme.submit_spec(spec), await globex.submit_spec(spec)
    assert (a2.job_id, a2.duplicate) == (a1.job_id, True)
    assert (g2.job_id, g2.duplicate) == (g1.job_id, True)
    assert (await acme.get_job(a1.job_id)).tenant == "acme"
    assert (await globex.get_job(g1.job_id)).tenant == "globex"


async def test_debounce_keys_are_per_tenant(worker, acme, globex) -> None:
    # acme twice and globex once with one key, inside one window: acme's first gives way
    # to acme's second (the key works), globex's runs on its own.
    a1 = (await acme.submit("chat", laneway.chat("a1"), debounce_key="doc", debounce=0.6)).job_id
    g1 = (await globex.submit("chat", laneway.chat("g1"), debounce_key="doc", debounce=0.6)).job_id
    a2 = (await acme.submit("chat", laneway.chat("a2"), debounce_key="doc", debounce=0.6)).job_id
    acme_finals = {e.job_id: e async for e in acme.stream_results([a1, a2], final_only=True)}
    globex_final = await globex.wait(g1)
    assert (acme_finals[a1].state, acme_finals[a1].superseded_by) == (S.JOB_STATE_SUPERSEDED, a2)
    assert acme_finals[a2].state == S.JOB_STATE_SUCCEEDED and acme_finals[a2].result.chat.text == "a2"
    assert globex_final.state == S.JOB_STATE_SUCCEEDED and globex_final.result.chat.text == "g1"
    assert not globex_final.superseded_by
    assert {e.tenant for e in acme_finals.values()} == {"acme"} and globex_final.tenant == "globex"


async def test_max_deliveries_dead_letter_keeps_the_tenant(nats_server: EmbeddedNats) -> None:
    # A job JetStream gives up on (every delivery handed back) is swept by the broker:
    # its DEAD_LETTERED event and dead letter are the submitter's tenant's.
    config = _auth_config("queue: {ack_wait_s: 2, max_deliver: 2}")
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        _client(b, KEYS["acme"]) as acme,
        _client(b, ADMIN_KEY) as ops,
    ):
        job = await acme.submit("chat", laneway.chat("stuck"))
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.jetstream().pull_subscribe_bind(
                durable=t.consumer_name("chat", "normal"), stream=t.JOBS_STREAM
            )
            for _ in range(2):
                (msg,) = await sub.fetch(1, timeout=5)
                await msg.nak()
            with contextlib.suppress(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=1)
        finally:
            await nc.close()
        final = await acme.wait(job.job_id, timeout=20)
        assert (final.state, final.tenant) == (S.JOB_STATE_DEAD_LETTERED, "acme")
        found: list[dead_letter_pb2.DeadLetter] = []

        async def listed() -> bool:
            found[:] = (await ops.list_dead_letters(job_ids=[job.job_id])).dead_letters
            return bool(found)

        await eventually(listed)
        assert found[0].tenant == "acme"
        assert [d.job_id for d in (await acme.list_dead_letters()).dead_letters] == [job.job_id]


async def test_without_auth_every_tenant_is_empty(nats_server: EmbeddedNats) -> None:
    config = make_config()
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address, timeout=10) as client,
        WorkerPool(config, nats_url=nats_server.url),
    ):
        ok = await client.submit("chat", laneway.chat("hi"), idempotency_key="k")
        bad = await client.submit("chat", laneway.chat("no"), metadata={"mock.fail": "400"})
        events = [e async for e in client.stream_results(ok.job_id)]
        assert events[-1].state == S.JOB_STATE_SUCCEEDED and {e.tenant for e in events} == {""}
        assert (await client.get_job(ok.job_id)).tenant == ""
        assert (await client.submit("chat", laneway.chat("hi"), idempotency_key="k")).job_id == ok.job_id
        await client.wait(bad.job_id)
        found: list[dead_letter_pb2.DeadLetter] = []

        async def listed() -> bool:
            found[:] = (await client.list_dead_letters()).dead_letters
            return bool(found)

        await eventually(listed)
        assert [(d.job_id, d.tenant) for d in found] == [(bad.job_id, "")]


# --- the pieces on their own -----------------------------------------------------------


def _job(tenant: str) -> QueuedJob:
    spec = JobSpec(
        route="chat",
        lane="normal",
        input=ChatInput((ChatMessage("user", "x"),)),
        debounce_key="d",
        not_before=utcnow() + timedelta(seconds=5),
        tenant=tenant,
    )
    return QueuedJob(new_job_id(), spec, utcnow())


def test_the_tenant_rides_on_queued_jobs_events_jobs_and_dead_letters() -> None:
    job = _job("acme")
    assert decode_queued_job(encode_queued_job(job)).spec.tenant == "acme"
    first = first_event(job)
    running = first.next(JobState.RUNNING, attempt=1)
    error = JobError("invalid_request", "no", ErrorClass.PERMANENT)
    dead = running.next(JobState.DEAD_LETTERED, error=error)
    assert {first.tenant, running.tenant, dead.tenant} == {"acme"}
    assert decode_event(encode_event(dead)).tenant == "acme"
    assert job_from_events(event_to_pb(dead)).tenant == "acme"
    letter = DeadLetter(
        job=job, reason="permanent_error", error=error, attempts=(), dead_lettered_at=utcnow()
    )
    assert decode_dead_letter(encode_dead_letter(letter)).job.spec.tenant == "acme"
    assert decode_queued_job(encode_queued_job(_job(""))).spec.tenant == ""


def test_keys_are_per_tenant_and_unchanged_without_one() -> None:
    # Without a tenant, the entries are those of before tenants (pending schedules and
    # claims survive an upgrade); with one, they differ per tenant and from it.
    import hashlib

    legacy_entry = hashlib.sha256(b"chat\0k").hexdigest()
    assert t.idempotency_entry("chat", "k") == t.idempotency_entry("chat", "k", "") == legacy_entry
    legacy_subject = f"{t.SCHED_PREFIX}.debounce.chat.{hashlib.sha256(b'k').hexdigest()[:32]}"
    assert t.debounce_subject("chat", "k") == legacy_subject
    entries = {t.idempotency_entry("chat", "k", tenant) for tenant in ("", "acme", "globex")}
    subjects = {t.debounce_subject("chat", "k", tenant) for tenant in ("", "acme", "globex")}
    assert len(entries) == len(subjects) == 3
    # Length-prefixed: a tenant and key cannot be split differently to meet another pair.
    assert t.idempotency_entry("chat", "b\0k", "a") != t.idempotency_entry("chat", "k", "a\0b")
    assert t.debounce_subject("chat", "b\0k", "a") != t.debounce_subject("chat", "k", "a\0b")
    for subject in subjects:
        assert all(token and not set(token) & set(" *>") for token in subject.split("."))


def test_scopes() -> None:
    reader = Principal(key_id="k", tenant="acme", role="reader")
    admin = Principal(key_id="o", tenant="ops", role="admin")
    assert tenant_scope(ANONYMOUS) is None and tenant_scope(admin) is None
    assert tenant_scope(reader) == "acme"
    asked = DeadLetterFilter(route="chat", tenant="globex")
    # A non-admin's tenant filter is ignored, then forced to their own.
    assert requested_filter(asked, reader) == DeadLetterFilter(route="chat")
    assert dead_letter_scope(requested_filter(asked, reader), reader).tenant == "acme"
    assert dead_letter_scope(DeadLetterFilter(), reader).empty is False
    # An admin's is kept; without one an admin sees every tenant.
    assert dead_letter_scope(requested_filter(asked, admin), admin).tenant == "globex"
    assert dead_letter_scope(DeadLetterFilter(), admin).tenant is None
    assert dead_letter_scope(DeadLetterFilter(), ANONYMOUS).tenant is None
