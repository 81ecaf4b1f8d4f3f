"""Token streaming to the caller: deltas in order before the final event, and an
explicit reset when an attempt fails after partial output."""

from __future__ import annotations

import laneway
from laneway.v1 import job_pb2 as S
from laneway.workers.pool import WorkerPool

from .conftest import make_config

TEXT = "the quick brown fox jumps over the lazy dog"


def _replay(events: list[S.JobEvent]) -> str:
    """What a caller shows: deltas appended in order, dropped on a reset."""
    text = ""
    for e in events:
        if e.reset:
            text = ""
        if e.HasField("delta"):
            text += e.delta.text
    return text


async def test_streamed_deltas_arrive_in_order_before_the_final_event(broker, worker, client) -> None:
    job = await client.submit("chat", laneway.chat(TEXT, stream=True))
    events = [e async for e in client.stream_results(job.job_id)]
    final = events[-1]
    assert final.state == S.JOB_STATE_SUCCEEDED
    deltas = [e for e in events if e.HasField("delta")]
    assert len(deltas) >= 1 and all(e.state == S.JOB_STATE_RUNNING for e in deltas)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert _replay(events) == final.result.chat.text == TEXT
    # A late subscriber replays the same deltas; final_only skips them.
    assert [e.delta.text for e in await _all(client, job.job_id) if e.HasField("delta")] == [
        e.delta.text for e in deltas
    ]
    assert [e.state async for e in client.stream_results(job.job_id, final_only=True)] == [
        S.JOB_STATE_SUCCEEDED
    ]


async def _all(client: laneway.AsyncClient, job_id: str) -> list[S.JobEvent]:
    return [e async for e in client.stream_results(job_id)]


async def test_mid_stream_failure_sends_a_reset_before_the_retry(broker, client, nats_server) -> None:
    config = make_config("workers: {max_attempts: 3, retry_backoff_s: 0.02, retry_backoff_max_s: 0.05}")
    async with WorkerPool(config, nats_url=nats_server.url):
        job = await client.submit("chat", laneway.chat(TEXT, stream=True), metadata={"mock.fail": "503"})
        events = await _all(client, job.job_id)
    states = [e.state for e in events]
    retry = states.index(S.JOB_STATE_RETRYING)
    reset = events[retry]
    assert reset.reset and reset.error.code == S.JOB_ERROR_CODE_PROVIDER_UNAVAILABLE
    first_attempt = [e.delta.text for e in events[:retry] if e.HasField("delta")]
    second_attempt = [e.delta.text for e in events[retry:] if e.HasField("delta")]
    # The failed attempt had sent part of its text; the retry sends all of it again.
    assert (
        "".join(first_attempt) and TEXT.startswith("".join(first_attempt)) and "".join(first_attempt) != TEXT
    )
    assert "".join(second_attempt) == TEXT
    assert {e.attempt for e in events[:retry] if e.HasField("delta")} == {1}
    assert {e.attempt for e in events[retry:] if e.HasField("delta")} == {2}
    assert events[-1].state == S.JOB_STATE_SUCCEEDED
    assert _replay(events) == events[-1].result.chat.text == TEXT


async def test_stream_through_the_openai_adapter_resets_after_a_truncated_stream(
    broker, client, nats_server
) -> None:
    # Real HTTP: the openai adapter streams from the fake provider, whose first answer
    # is cut off mid-stream; the caller sees the partial text voided, then the retry.
    from laneway.workers.fakes.server import FakeProvider, FakeProviderSettings, Step

    async with FakeProvider(FakeProviderSettings(token_delay_ms=1.0)) as fake:
        config = make_config(
            "providers: {mock: {type: mock}, slow: {type: mock}, "
            f"http: {{type: openai, base_url: '{fake.base_url}', api_key_env: '', stall_timeout_s: 2}}}}\n"
            "routes: {chat: {targets: [{provider: http, model: fake-gpt}]}}\n"
            "workers: {max_attempts: 3, retry_backoff_s: 0.02, retry_backoff_max_s: 0.05}"
        )
        fake.script(Step(kind="truncate"))
        async with WorkerPool(config, nats_url=nats_server.url, providers=["http"]):
            job = await client.submit("chat", laneway.chat(TEXT, stream=True))
            events = await _all(client, job.job_id)
    retry = next(e for e in events if e.state == S.JOB_STATE_RETRYING)
    assert retry.reset and retry.error.code == S.JOB_ERROR_CODE_TRUNCATED_STREAM
    assert events[-1].state == S.JOB_STATE_SUCCEEDED and events[-1].provider == "http"
    assert _replay(events) == events[-1].result.chat.text == TEXT
    assert [r.path for r in fake.requests].count("/v1/chat/completions") == 2
