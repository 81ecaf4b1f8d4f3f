"""Durable job semantics against the real stack: error classes, dead letters and
redrive, idempotency across restarts, delays and debounce, hand-back on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import timedelta
from pathlib import Path

import nats
import nats.errors
import pytest

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.config.model import LanewayConfig
from laneway.broker.core import topology as t
from laneway.broker.core.events import EventLog, first_event
from laneway.broker.core.fence import ENQUEUE_BUDGET_S
from laneway.broker.core.model import QueuedJob, new_job_id, utcnow
from laneway.broker.core.wire.jobs import encode_queued_job, spec_from_pb
from laneway.broker.server.process import BrokerServer
from laneway.v1 import dead_letter_pb2, job_pb2
from laneway.workers.pool import WorkerPool

from .conftest import eventually, make_config

S = job_pb2
RUNNING, RETRYING = S.JOB_STATE_RUNNING, S.JOB_STATE_RETRYING


def _calls(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


async def _events(client: laneway.AsyncClient, job_id: str) -> list[job_pb2.JobEvent]:
    return [e async for e in client.stream_results(job_id)]


async def _dead_letters(client: laneway.AsyncClient, **where: object) -> list[laneway.DeadLetter]:
    """The dead letters matching ``where`` once there are any: the record is stored
    right after the job's DEAD_LETTERED event, so a caller may be a moment ahead of it."""
    found: list[laneway.DeadLetter] = []

    async def listed() -> bool:
        found[:] = (await client.list_dead_letters(**where)).dead_letters  # type: ignore[arg-type]
        return bool(found)

    await eventually(listed)
    return found


async def _jobs_in_queue(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(t.JOBS_STREAM)).state.messages
    finally:
        await nc.close()


async def test_poison_job_dead_letters_after_its_attempts_while_others_flow(
    broker, client, nats_server
) -> None:
    config = make_config("workers: {max_attempts: 3, retry_backoff_s: 0.02, retry_backoff_max_s: 0.05}")
    async with WorkerPool(config, nats_url=nats_server.url):
        poison = await client.submit("chat", laneway.chat("poison"), metadata={"mock.fail": "503x*"})
        others = await client.submit_batch(
            [laneway.job("chat", laneway.chat(f"fine {i}")) for i in range(20)]
        )
        finals = {
            e.job_id: e async for e in client.stream_results([o.job_id for o in others], final_only=True)
        }
        assert {e.state for e in finals.values()} == {S.JOB_STATE_SUCCEEDED}
        events = await _events(client, poison.job_id)
    assert [e.state for e in events] == [
        S.JOB_STATE_QUEUED, RUNNING, RETRYING, RUNNING, RETRYING, RUNNING, S.JOB_STATE_DEAD_LETTERED,
    ]  # fmt: skip
    assert events[-1].error.code == job_pb2.JOB_ERROR_CODE_PROVIDER_UNAVAILABLE
    listed = await _dead_letters(client)
    assert [d.job_id for d in listed] == [poison.job_id]
    dead = listed[0]
    assert dead.reason == dead_letter_pb2.DEAD_LETTER_REASON_ATTEMPTS_EXHAUSTED
    assert dead.spec.chat.messages[0].content == "poison"
    assert [a.attempt for a in dead.attempts] == [1, 2, 3]
    assert all(a.error.http_status == 503 and a.end_time.seconds for a in dead.attempts)


async def test_rate_limit_storm_waits_retry_after_and_spends_no_attempt(broker, client, nats_server) -> None:
    config = make_config("workers: {max_attempts: 2, retry_backoff_s: 0.02, retry_backoff_max_s: 0.05}")
    async with WorkerPool(config, nats_url=nats_server.url):
        metadata = {"mock.fail": "429x4", "mock.retry_after": "0.2"}
        job = await client.submit("chat", laneway.chat("patience"), metadata=metadata)
        events = await _events(client, job.job_id)
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    running = [e for e in events if e.state == RUNNING]
    retrying = [e for e in events if e.state == RETRYING]
    # Five tries under a budget of two attempts: the 429s spent nothing.
    assert len(running) == 5 and {e.attempt for e in running} == {1}
    assert {e.error.error_class for e in retrying} == {S.ERROR_CLASS_RATE_LIMITED}
    for failed, retried in zip(retrying, running[1:], strict=True):
        waited = retried.event_time.ToDatetime() - failed.event_time.ToDatetime()
        assert waited >= timedelta(seconds=0.2), waited


async def test_permanent_error_goes_straight_to_dead_letters(broker, client, nats_server, config) -> None:
    async with WorkerPool(config, nats_url=nats_server.url):
        job = await client.submit("chat", laneway.chat("bad request"), metadata={"mock.fail": "400"})
        events = await _events(client, job.job_id)
    assert [e.state for e in events] == [S.JOB_STATE_QUEUED, RUNNING, S.JOB_STATE_DEAD_LETTERED]
    assert events[-1].error.code == job_pb2.JOB_ERROR_CODE_INVALID_REQUEST
    assert events[-1].error.error_class == S.ERROR_CLASS_PERMANENT
    listed = await _dead_letters(client, reason="permanent_error")
    assert [d.job_id for d in listed] == [job.job_id]
    assert (await client.list_dead_letters(reason="attempts_exhausted")).dead_letters == []


async def test_redrive_after_an_outage_succeeds_and_empties_the_queue(broker, client, nats_server) -> None:
    down = make_config(
        # Breaker off: this outage is meant to exhaust attempts (with it on, jobs wait).
        "providers: {mock: {type: mock, error_rates: {503: 1.0}, circuit: {enabled: false}},"
        " slow: {type: mock}}\n"
        "workers: {max_attempts: 2, retry_backoff_s: 0.02, retry_backoff_max_s: 0.05}"
    )
    async with WorkerPool(down, nats_url=nats_server.url):
        ids = [
            o.job_id
            for o in await client.submit_batch([laneway.job("chat", laneway.chat(f"r{i}")) for i in range(3)])
        ]
        async for _ in client.stream_results(ids, final_only=True):
            pass

    async def all_three() -> bool:
        return len((await client.list_dead_letters(route="chat")).dead_letters) == 3

    await eventually(all_three)
    with pytest.raises(laneway.InvalidArgument) as bad:
        await client.redrive_dead_letters()
    assert bad.value.field == "filter"

    async with WorkerPool(make_config(), nats_url=nats_server.url):
        redriven = await client.redrive_dead_letters(job_ids=ids[:2], to_lane="high", rate_per_second=4)
        assert {r.job_id for r in redriven} == set(ids[:2]) and all(r.error is None for r in redriven)
        finals = [e async for e in client.stream_results([r.new_job_id for r in redriven], final_only=True)]
    assert {e.state for e in finals} == {S.JOB_STATE_SUCCEEDED}
    assert {e.metadata["laneway.redriven_from"] for e in finals} == set(ids[:2])
    assert {e.lane for e in finals} == {S.LANE_HIGH}
    # Paced at 4/s: the second became visible no sooner than 0.25 s after the first.
    gap = abs(finals[0].start_time.ToDatetime() - finals[1].start_time.ToDatetime())
    assert gap >= timedelta(seconds=0.2), gap
    left = await client.list_dead_letters()
    assert [d.job_id for d in left.dead_letters] == [ids[2]]


async def test_list_dead_letters_pages_and_rejects_bad_tokens(broker, client, nats_server, config) -> None:
    async with WorkerPool(config, nats_url=nats_server.url):
        specs = [laneway.job("chat", laneway.chat(f"p{i}"), metadata={"mock.fail": "400"}) for i in range(5)]
        ids = [o.job_id for o in await client.submit_batch(specs)]
        async for _ in client.stream_results(ids, final_only=True):
            pass

    async def all_five() -> bool:
        return len((await client.list_dead_letters()).dead_letters) == 5

    await eventually(all_five)
    seen, token = [], ""
    while True:
        page = await client.list_dead_letters(page_size=2, page_token=token)
        seen += [d.job_id for d in page.dead_letters]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    with pytest.raises(laneway.InvalidArgument) as bad:
        await client.list_dead_letters(page_token="nope")
    assert bad.value.field == "page_token"


async def test_job_past_max_deliveries_is_swept_into_dead_letters(nats_server, tmp_path) -> None:
    # Every delivery ends without a result, as with workers that crash on it (here a
    # bare consumer hands it back), so JetStream's own max_deliver is what stops it: the
    # broker's sweeper must move it. (Waits that workers decide on do not count.)
    config = make_config("queue: {ack_wait_s: 2, max_deliver: 3}")
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address, timeout=10) as client,
    ):
        job = await client.submit("chat", laneway.chat("stuck"))
        nc = await nats.connect(nats_server.url)
        try:
            sub = await nc.jetstream().pull_subscribe_bind(
                durable=t.consumer_name("chat", "normal"), stream=t.JOBS_STREAM
            )
            for _ in range(3):
                (msg,) = await sub.fetch(1, timeout=5)
                await msg.nak()
            # The server gives up (and advises) when it would deliver it once more.
            with contextlib.suppress(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=1)
        finally:
            await nc.close()
        events = await _events(client, job.job_id)
        assert events[-1].state == S.JOB_STATE_DEAD_LETTERED
        assert events[-1].error.code == job_pb2.JOB_ERROR_CODE_MAX_DELIVERIES
        dead = await _dead_letters(client, job_ids=[job.job_id])
        assert dead[0].reason == dead_letter_pb2.DEAD_LETTER_REASON_MAX_DELIVERIES and dead[0].deliveries == 3

        async def queue_empty() -> bool:
            return await _jobs_in_queue(nats_server.url) == 0

        await eventually(queue_empty)


async def test_duplicate_submit_returns_original_after_broker_restart(nats_server, config) -> None:
    spec = laneway.job("chat", laneway.chat("once"), idempotency_key="order-42")
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address) as client,
    ):
        first = await client.submit_spec(spec)
    async with (
        BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address) as client,
    ):
        again = await client.submit_spec(spec)
    assert (again.job_id, again.duplicate, first.duplicate) == (first.job_id, True, False)


async def test_stale_claim_of_a_crashed_broker_is_taken_over(broker, client, nats_server) -> None:
    # A claim left by a broker that died before writing the job's first event.
    digest = t.idempotency_entry("chat", "key-1")
    nc = await nats.connect(nats_server.url)
    kv = await nc.jetstream().key_value(t.IDEMPOTENCY_BUCKET)
    await kv.create(digest, f"01ghostjob0000000000000000 {time.time() - 60:.3f}".encode())
    await nc.close()
    submitted = await client.submit("chat", laneway.chat("x"), idempotency_key="key-1")
    assert not submitted.duplicate and submitted.job_id != "01ghostjob0000000000000000"
    again = await client.submit("chat", laneway.chat("x"), idempotency_key="key-1")
    assert (again.job_id, again.duplicate) == (submitted.job_id, True)


async def test_delayed_job_waits_and_survives_a_full_restart(tmp_path: Path, config: LanewayConfig) -> None:
    store = tmp_path / "nats"
    async with (
        EmbeddedNats(store) as server,
        BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address) as client,
    ):
        port = server.port
        job = await client.submit("chat", laneway.chat("later"), delay=2.5)
        scheduled = await client.get_job(job.job_id)
    assert scheduled.state == S.JOB_STATE_SCHEDULED
    not_before = scheduled.not_before_time.ToDatetime()
    # Everything is down now; the job must still run, and not before its time.
    async with (
        EmbeddedNats(store, port=port) as server,
        BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as b,
        laneway.AsyncClient(b.address) as client,
        WorkerPool(config, nats_url=server.url),
    ):
        events = await _events(client, job.job_id)
    assert [e.state for e in events] == [S.JOB_STATE_SCHEDULED, RUNNING, S.JOB_STATE_SUCCEEDED]
    assert events[1].event_time.ToDatetime() >= not_before


async def test_cancelled_scheduled_job_never_runs(broker, worker, client, nats_server) -> None:
    job = await client.submit("chat", laneway.chat("never"), delay=30)
    assert (await client.cancel_job(job.job_id)).cancelled
    assert await _jobs_in_queue(nats_server.url) == 0  # its schedule is gone too
    assert (await client.get_job(job.job_id)).state == S.JOB_STATE_CANCELLED


async def test_debounce_collapses_rapid_submissions_into_one_call(
    broker, client, nats_server, tmp_path
) -> None:
    log = tmp_path / "calls.jsonl"
    config = make_config(f"providers: {{mock: {{type: mock, call_log: '{log}'}}, slow: {{type: mock}}}}")
    async with WorkerPool(config, nats_url=nats_server.url):
        ids = []
        for i in range(20):
            spec = laneway.chat(f"draft {i}")
            ids.append((await client.submit("chat", spec, debounce_key="doc-7", debounce=0.8)).job_id)
        finals = {e.job_id: e async for e in client.stream_results(ids, final_only=True)}
    assert finals[ids[-1]].state == S.JOB_STATE_SUCCEEDED
    assert finals[ids[-1]].result.chat.text == "draft 19"
    superseded = [finals[j] for j in ids[:-1]]
    assert {e.state for e in superseded} == {S.JOB_STATE_SUPERSEDED}
    assert {e.superseded_by for e in superseded} <= set(ids[1:])
    # Exactly one provider call, with the last input.
    assert [(c["job_id"], c["input"]) for c in _calls(log)] == [(ids[-1], "draft 19")]


async def test_scheduling_fields_are_validated(broker, client) -> None:
    from datetime import UTC, datetime

    # One schedule per job (a oneof on the wire): the client refuses two before sending.
    with pytest.raises(ValueError, match="at most one of not_before, delay and debounce"):
        await client.submit("chat", laneway.chat("x"), delay=1, debounce_key="k", debounce=1)
    with pytest.raises(laneway.InvalidArgument) as window:
        await client.submit("chat", laneway.chat("x"), debounce_key="k")
    assert window.value.field == "job.debounce.window"
    soon = datetime.now(UTC) + timedelta(seconds=5)
    with pytest.raises(laneway.InvalidArgument) as order:
        await client.submit("chat", laneway.chat("x"), delay=10, deadline=soon)
    assert order.value.field == "job.deadline_time"


async def test_sigterm_hands_back_unfinished_jobs_without_spending_attempts(
    broker, client, nats_server, tmp_path: Path
) -> None:
    import signal
    import sys

    from .conftest import TEST_CONFIG

    yaml = TEST_CONFIG.replace("shutdown_grace_s: 2", "shutdown_grace_s: 0.3")
    config_file = tmp_path / "laneway.yaml"
    config_file.write_text(yaml)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "laneway.broker.cli", "worker", "--config", str(config_file),
        "--nats-url", nats_server.url, "--provider", "mock",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        quick = await client.submit("chat", laneway.chat("quick"), metadata={"mock.latency_ms": "100"})
        long = await client.submit("chat", laneway.chat("long"), metadata={"mock.latency_ms": "5000"})
        async for event in client.stream_results(long.job_id):
            if event.state == RUNNING:
                break
        child.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await child.wait() == 0
        # Well before the job's 5 s call or its 2 s lease: handed back, not abandoned.
        assert loop.time() - start < 2.0
        handed = await client.get_job(long.job_id)
        assert (handed.state, handed.error.code) == (RETRYING, job_pb2.JOB_ERROR_CODE_HANDED_BACK)
        assert (await client.get_job(quick.job_id)).state == S.JOB_STATE_SUCCEEDED
        async with WorkerPool(make_config(base=yaml), nats_url=nats_server.url, providers=["mock"]):
            events = await _events(client, long.job_id)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    assert [e.attempt for e in events if e.state == RUNNING] == [1, 1]


async def test_redelivered_finished_job_is_not_run_again(broker, client, nats_server, tmp_path) -> None:
    # A worker that crashed after the final event but before its ack leaves the job
    # to be delivered again: the next worker must ack it without a provider call.
    from laneway.broker.core.model import QueuedJob, utcnow
    from laneway.broker.core.wire.jobs import encode_queued_job, spec_from_pb

    log = tmp_path / "calls.jsonl"
    config = make_config(f"providers: {{mock: {{type: mock, call_log: '{log}'}}, slow: {{type: mock}}}}")
    async with WorkerPool(config, nats_url=nats_server.url):
        spec = laneway.job("chat", laneway.chat("only once"))
        job_id = (await client.submit_spec(spec)).job_id
        final = await client.wait(job_id)
        again = QueuedJob(job_id, spec_from_pb(spec, field="job", default_lane="normal"), utcnow())
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish(t.job_subject("chat", "normal"), encode_queued_job(again))
        finally:
            await nc.close()

        async def drained() -> bool:
            return await _jobs_in_queue(nats_server.url) == 0

        await eventually(drained)
    assert [c["job_id"] for c in _calls(log)] == [job_id]
    replay = await _events(client, job_id)
    assert replay[-1] == final and len(replay) == final.seq


async def _publish_orphan(url: str, text: str, *, age_s: float) -> QueuedJob:
    """A job in the queue with no event log, submitted ``age_s`` ago: what a broker
    leaves when the job's write landed and its QUEUED event has not (yet)."""
    spec = laneway.job("chat", laneway.chat(text))
    orphan = QueuedJob(
        new_job_id(),
        spec_from_pb(spec, field="job", default_lane="normal"),
        utcnow() - timedelta(seconds=age_s),
    )
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(t.job_subject("chat", "normal"), encode_queued_job(orphan))
    finally:
        await nc.close()
    return orphan


async def test_job_whose_first_event_was_never_stored_never_runs(
    broker, client, nats_server, tmp_path
) -> None:
    # A broker writes a single job's QUEUED event and the job together, and keeps
    # writing the event for up to its enqueue budget when the store does not take it.
    # A job still without a log after that was answered DEADLINE_EXCEEDED or refused:
    # a worker fences its log (so a late QUEUED cannot revive it) and drops it.
    log = tmp_path / "calls.jsonl"
    config = make_config(f"providers: {{mock: {{type: mock, call_log: '{log}'}}, slow: {{type: mock}}}}")
    orphan = await _publish_orphan(nats_server.url, "never logged", age_s=ENQUEUE_BUDGET_S + 10)
    async with WorkerPool(config, nats_url=nats_server.url):
        # A normal job on the same lane still runs.
        assert (await client.run("chat", laneway.chat("logged"))).state == S.JOB_STATE_SUCCEEDED

        async def dropped() -> bool:
            return await _jobs_in_queue(nats_server.url) == 0

        await eventually(dropped)
    assert [c["job_id"] for c in _calls(log)] != [] and orphan.job_id not in {
        c["job_id"] for c in _calls(log)
    }
    fenced = await client.get_job(orphan.job_id)
    assert fenced.state == S.JOB_STATE_NOT_ENQUEUED
    assert fenced.error.code == job_pb2.JOB_ERROR_CODE_ENQUEUE_FAILED


async def test_job_whose_first_event_lands_late_runs(broker, client, nats_server, tmp_path) -> None:
    # The other side of the same race: the broker's QUEUED event lands a few seconds
    # after the job (an events stream electing a leader on a cluster). The job, young
    # enough for its broker to still be writing the event, waits for it and runs.
    log = tmp_path / "calls.jsonl"
    config = make_config(f"providers: {{mock: {{type: mock, call_log: '{log}'}}, slow: {{type: mock}}}}")
    orphan = await _publish_orphan(nats_server.url, "logged late", age_s=0)
    async with WorkerPool(config, nats_url=nats_server.url):

        async def handed_back() -> bool:
            # Delivered, found without a log, and handed back to wait (not dropped).
            nc = await nats.connect(nats_server.url)
            try:
                info = await nc.jetstream().consumer_info(t.JOBS_STREAM, t.consumer_name("chat", "normal"))
            finally:
                await nc.close()
            return info.num_redelivered > 0 or info.delivered.consumer_seq > 1

        await eventually(handed_back)
        nc = await nats.connect(nats_server.url)
        try:
            async with EventLog(nc) as events:
                await events.append(first_event(orphan), expect_last=0)
        finally:
            await nc.close()
        final = await client.wait(orphan.job_id, timeout=30)
    assert final.state == S.JOB_STATE_SUCCEEDED
    assert [c["job_id"] for c in _calls(log)].count(orphan.job_id) == 1
