"""The Python client's pipeline methods (``laneway.pipelines``) against a real
nats-server, broker and worker pool: ``AsyncClient`` and its blocking twin ``Client``
start, stream, read, list, cancel and resume runs, and map the broker's errors; a run's
stream resumes across a broker killed and started again (``docs/pipelines.md``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

import laneway
from laneway.broker.config.model import LanewayConfig
from laneway.broker.server.process import BrokerServer
from laneway.v1 import job_pb2, pipeline_pb2
from tests.stack import Stack

from .conftest import eventually, make_config
from .test_pipelines import PIPELINES

RUN = pipeline_pb2.PipelineRunState


@pytest.fixture
def config(tmp_path: Path) -> LanewayConfig:
    return make_config(PIPELINES.replace("CALL_LOG", str(tmp_path / "calls.jsonl")))


def _kinds(events: list[laneway.PipelineRunEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.step) for e in events]


async def test_a_run_is_started_streamed_to_its_end_and_read(worker, client: laneway.AsyncClient) -> None:
    started = await client.start_pipeline("analysis", "the sky is blue")
    assert started.run_id and not started.duplicate
    events = [e async for e in client.stream_pipeline_run(started.run_id, timeout=30)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = _kinds(events)
    assert kinds[0] == ("started", "") and kinds[-1] == ("finished", "")
    for step in ("extract", "analyze", "summarize"):
        assert kinds.count(("step_started", step)) == kinds.count(("step_finished", step)) == 1
    done = [e for e in events if e.kind == "child_finished"]
    assert [(e.job_id, e.state) for e in done] == [(f"{started.run_id}-{i}-0", "SUCCEEDED") for i in range(3)]
    assert events[-1].run_state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    run = await client.get_pipeline_run(started.run_id)
    assert run.run_id == started.run_id and run.pipeline == "analysis"
    assert run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED, run.error
    assert [(s.name, s.children, s.succeeded) for s in run.steps] == [
        ("extract", 1, 1),
        ("analyze", 1, 1),
        ("summarize", 1, 1),
    ]
    # The mock echoes: the last job's answer shows every template in turn.
    last = await client.get_job(f"{started.run_id}-2-0")
    assert last.result.chat.text == "summary of analyze [facts of: the sky is blue]"
    # A late joiner resuming after the fourth entry gets the rest, the same.
    rest = [e async for e in client.stream_pipeline_run(started.run_id, resume_after=4)]
    assert rest == events[4:]
    with pytest.raises(ValueError, match="resume_after"):
        await anext(client.stream_pipeline_run(started.run_id, resume_after=-1))


async def test_an_idempotency_key_gives_the_same_run(worker, client: laneway.AsyncClient) -> None:
    first = await client.start_pipeline("analysis", "x", idempotency_key="doc-7")
    again = await client.start_pipeline("analysis", "x", idempotency_key="doc-7")
    assert again == laneway.PipelineStarted(first.run_id, duplicate=True)
    with pytest.raises(laneway.AlreadyExists) as caught:
        await client.start_pipeline("analysis", "another input", idempotency_key="doc-7")
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    other = await client.start_pipeline("analysis", "x", idempotency_key="doc-8")
    assert other.run_id != first.run_id and not other.duplicate


async def test_cancel_ends_the_run_and_its_stream(worker, client: laneway.AsyncClient) -> None:
    started = await client.start_pipeline("slow", "hello")
    child = f"{started.run_id}-0-0"

    async def running() -> bool:
        try:
            return bool((await client.get_job(child)).state == job_pb2.JOB_STATE_RUNNING)
        except laneway.NotFound:
            return False  # the driver has not enqueued it yet

    await eventually(running)
    stream = client.stream_pipeline_run(started.run_id, timeout=30)
    assert (await anext(stream)).kind == "started"
    answer = await client.cancel_pipeline_run(started.run_id, "stop it")
    assert answer == laneway.PipelineCancelOutcome(RUN.PIPELINE_RUN_STATE_CANCELLED, cancelled=True)
    again = await client.cancel_pipeline_run(started.run_id)
    assert again == laneway.PipelineCancelOutcome(RUN.PIPELINE_RUN_STATE_CANCELLED, cancelled=False)
    rest = [e async for e in stream]
    # The job the cancel ended may be recorded after the run's end: find the end itself.
    (end,) = [e for e in rest if e.kind == "finished"]
    assert (end.state, end.error, end.run_state) == ("CANCELLED", "stop it", RUN.PIPELINE_RUN_STATE_CANCELLED)
    run = await client.get_pipeline_run(started.run_id)
    assert run.state == RUN.PIPELINE_RUN_STATE_CANCELLED and run.error == "stop it"

    async def child_cancelled() -> bool:
        return bool((await client.get_job(child)).state == job_pb2.JOB_STATE_CANCELLED)

    await eventually(child_cancelled)


async def test_runs_are_listed_a_page_at_a_time(worker, client: laneway.AsyncClient) -> None:
    ids = [(await client.start_pipeline("analysis", f"list {i}")).run_id for i in range(3)]
    other = (await client.start_pipeline("ingest", "a short text")).run_id
    page = await client.list_pipeline_runs(pipeline="analysis", page_size=2)
    assert isinstance(page, laneway.PipelineRunPage)
    assert [r.run_id for r in page.runs] == ids[:2] and page.next_page_token
    assert all(r.pipeline == "analysis" and len(r.steps) == 3 for r in page.runs)
    rest = await client.list_pipeline_runs(pipeline="analysis", page_token=page.next_page_token)
    assert [r.run_id for r in rest.runs] == ids[2:] and not rest.next_page_token
    everything = await client.list_pipeline_runs()
    assert [r.run_id for r in everything.runs] == [*ids, other]
    with pytest.raises(ValueError, match="page_size"):
        await client.list_pipeline_runs(page_size=-1)


async def test_a_failed_run_is_resumed_once(worker, client: laneway.AsyncClient) -> None:
    run_id = (await client.start_pipeline("broken", "0123456789")).run_id
    events = [e async for e in client.stream_pipeline_run(run_id, timeout=30)]
    assert events[-1].run_state == RUN.PIPELINE_RUN_STATE_FAILED
    answer = await client.resume_pipeline_run(run_id, "try again")
    assert answer == laneway.PipelineResumeOutcome(RUN.PIPELINE_RUN_STATE_RUNNING, resumed=True)
    # The provider still refuses: the resumed run fails again, with a new job for the item.
    after = [e async for e in client.stream_pipeline_run(run_id, resume_after=events[-1].seq, timeout=30)]
    assert after[-1].kind == "finished" and after[-1].run_state == RUN.PIPELINE_RUN_STATE_FAILED
    assert [e.job_id for e in after if e.kind == "child_finished"] == [f"{run_id}-1-0-1"]
    done = (await client.start_pipeline("analysis", "fine")).run_id
    _ = [e async for e in client.stream_pipeline_run(done, timeout=30)]
    not_failed = await client.resume_pipeline_run(done)
    assert not_failed == laneway.PipelineResumeOutcome(RUN.PIPELINE_RUN_STATE_SUCCEEDED, resumed=False)


async def test_unknown_pipelines_and_runs_are_typed_errors_naming_them(client: laneway.AsyncClient) -> None:
    with pytest.raises(laneway.InvalidArgument) as refused:
        await client.start_pipeline("ingset", "x")
    err = refused.value
    assert err.reason == "UNKNOWN_PIPELINE" and err.field == "pipeline"
    assert err.metadata["pipeline"] == "ingset"
    assert "'ingset'" in err.message and "did you mean 'ingest'?" in err.message
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "get": lambda: client.get_pipeline_run("nosuchrun"),
        "cancel": lambda: client.cancel_pipeline_run("nosuchrun"),
        "resume": lambda: client.resume_pipeline_run("nosuchrun"),
        "stream": lambda: anext(client.stream_pipeline_run("nosuchrun")),
    }
    for name, call in calls.items():
        with pytest.raises(laneway.NotFound) as missing:
            await call()
        assert missing.value.reason == "UNKNOWN_PIPELINE_RUN", name
        assert missing.value.metadata["run_id"] == "nosuchrun", name
    with pytest.raises(laneway.InvalidArgument) as bad:
        await client.get_pipeline_run("")
    assert bad.value.field == "run_id"


async def test_the_blocking_client_has_the_same_methods(worker, broker: BrokerServer) -> None:
    def flow() -> tuple[laneway.PipelineStarted, list[laneway.PipelineRunEvent], laneway.PipelineRun]:
        with laneway.Client(broker.address, timeout=10) as client:
            started = client.start_pipeline("analysis", "blocking", idempotency_key="k")
            assert client.start_pipeline("analysis", "blocking", idempotency_key="k").duplicate
            events = list(client.stream_pipeline_run(started.run_id, timeout=30))
            assert list(client.stream_pipeline_run(started.run_id, resume_after=3)) == events[3:]
            page = client.list_pipeline_runs(pipeline="analysis", page_size=1)
            assert [r.run_id for r in page.runs] == [started.run_id]
            # A full page may have a token; the page after it is then empty and the last.
            after = client.list_pipeline_runs(pipeline="analysis", page_token=page.next_page_token)
            assert (after.runs, after.next_page_token) == ([], "")
            assert not client.cancel_pipeline_run(started.run_id).cancelled  # it had ended
            assert not client.resume_pipeline_run(started.run_id).resumed
            with pytest.raises(laneway.InvalidArgument) as refused:
                client.start_pipeline("nope", "x")
            assert refused.value.reason == "UNKNOWN_PIPELINE"
            with pytest.raises(laneway.NotFound):
                next(client.stream_pipeline_run("nosuchrun"))
            return started, events, client.get_pipeline_run(started.run_id)

    started, events, run = await asyncio.to_thread(flow)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].run_state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    assert run.run_id == started.run_id and run.state == RUN.PIPELINE_RUN_STATE_SUCCEEDED


# Separate processes (tests.stack), so the broker can be killed (-9) mid-stream. The
# first step's job takes 1.5 s, so the run is under way when the broker dies; braces
# doubled for Stack's str.format.
RESTART_CONFIG = """\
broker:
  grpc_addr: "127.0.0.1:0"
queue:
  ack_wait_s: 2
workers:
  retry_backoff_s: 0.05
  retry_backoff_max_s: 0.2
  shutdown_grace_s: 2
providers:
  mock: {{type: mock, concurrency: 8}}
  slow: {{type: mock, concurrency: 4, latency_ms: 1500}}
routes:
  chat: {{targets: [{{provider: mock, model: mock-chat}}]}}
  slow: {{targets: [{{provider: slow, model: mock-chat}}]}}
pipelines:
  slow:
    steps:
      - {{name: wait, kind: chat, route: slow, template: "{{{{ input }}}}"}}
      - {{name: after, kind: chat, route: chat, template: "after {{{{ steps.wait.text }}}}"}}
"""


async def test_a_run_stream_resumes_across_a_broker_killed_and_started_again(tmp_path: Path) -> None:
    async with (
        Stack(tmp_path, workers=1, config=RESTART_CONFIG) as stack,
        laneway.AsyncClient(stack.address, timeout=10, resume_timeout=60) as client,
    ):
        run_id = (await client.start_pipeline("slow", "through it")).run_id
        under_way, blocking_under_way = asyncio.Event(), asyncio.Event()
        events: list[laneway.PipelineRunEvent] = []
        blocking_events: list[laneway.PipelineRunEvent] = []
        loop = asyncio.get_running_loop()

        async def follow() -> None:
            async for event in client.stream_pipeline_run(run_id, timeout=90):
                events.append(event)
                if event.kind == "step_started":
                    under_way.set()

        def follow_blocking() -> None:
            with laneway.Client(stack.address, timeout=10, resume_timeout=60) as sync_client:
                for event in sync_client.stream_pipeline_run(run_id, timeout=90):
                    blocking_events.append(event)
                    if event.kind == "step_started":
                        loop.call_soon_threadsafe(blocking_under_way.set)

        streaming = asyncio.create_task(follow())
        blocking = asyncio.create_task(asyncio.to_thread(follow_blocking))
        try:
            await asyncio.wait_for(asyncio.gather(under_way.wait(), blocking_under_way.wait()), 30)
            await stack.kill_broker()
            seen_before_the_kill = len(events)
            await stack.start_broker()
            await asyncio.wait_for(streaming, 90)
            await asyncio.wait_for(blocking, 90)
        finally:
            streaming.cancel()
            await asyncio.gather(streaming, blocking, return_exceptions=True)
        whole = [e async for e in client.stream_pipeline_run(run_id, timeout=30)]
    # Each entry once, in order, to the run's end: the same as the log read afterwards.
    assert events == whole and blocking_events == whole
    assert seen_before_the_kill < len(whole)  # the run went on while the broker was away
    assert [e.seq for e in whole] == list(range(1, len(whole) + 1))
    assert whole[-1].kind == "finished" and whole[-1].run_state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    assert [e.step for e in whole if e.kind == "step_finished"] == ["wait", "after"]


async def test_a_broker_shutting_down_ends_run_streams_at_once(nats_server, config: LanewayConfig) -> None:
    """As StreamResults: a draining broker ends its StreamPipelineRun calls now, with
    UNAVAILABLE SHUTTING_DOWN, instead of holding them for its whole grace period."""
    from laneway.error_details import from_rpc_error
    from laneway.v1 import broker_service_pb2_grpc as pb_grpc

    grace = 10.0
    broker = BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", shutdown_grace_s=grace)
    async with broker:
        async with laneway.AsyncClient(broker.address, timeout=10) as client:
            started = await client.start_pipeline("slow", "hello")  # no worker: it stays running
        async with grpc.aio.insecure_channel(broker.address) as channel:
            stub = pb_grpc.BrokerServiceStub(channel)
            call = stub.StreamPipelineRun(pipeline_pb2.StreamPipelineRunRequest(run_id=started.run_id))
            first = await anext(aiter(call))
            assert first.event.kind == "started"
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            closing = asyncio.ensure_future(broker.close())
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            ended_after = loop.time() - t0
            await closing
    err = from_rpc_error(caught.value)
    assert isinstance(err, laneway.Unavailable) and err.reason == "SHUTTING_DOWN", err
    assert ended_after < grace / 2, ended_after
