"""``laneway top``'s pipeline runs: the render is pure (runs built here, no server),
and ``RunWatch`` and ``top --once`` against a real broker, worker and nats-server."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

import laneway
from laneway.broker.cli.ops import render_top
from laneway.broker.cli.top_runs import RunsView, RunWatch, progress, render_runs
from laneway.broker.config.model import LanewayConfig
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import ops_pb2, pipeline_pb2

from .conftest import make_config
from .test_ops import cli
from .test_pipelines import finished, start

RUN = pipeline_pb2.PipelineRunState
STEP = pipeline_pb2.PipelineStepState
NOW = 1_800_000_000.0


def _ts(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def _step(
    name: str, kind: str, state: STEP.ValueType, children: int = 0, ok: int = 0, bad: int = 0
) -> pipeline_pb2.PipelineStep:
    return pipeline_pb2.PipelineStep(
        name=name, kind=kind, state=state, children=children, succeeded=ok, failed=bad
    )


def _run(
    run_id: str, pipeline: str, state: RUN.ValueType, start: float, end: float = 0.0, error: str = ""
) -> pipeline_pb2.PipelineRun:
    run = pipeline_pb2.PipelineRun(
        run_id=run_id, pipeline=pipeline, state=state, error=error, create_time=_ts(start)
    )
    if end:
        run.end_time.CopyFrom(_ts(end))
    return run


def _text(*renderables: object) -> str:
    console = Console(width=200, record=True, color_system=None)
    for r in renderables:
        console.print(r)
    return console.export_text()


def test_running_runs_show_their_current_step_and_its_jobs() -> None:
    ingesting = _run("r1", "ingest", RUN.PIPELINE_RUN_STATE_RUNNING, NOW - 75)
    ingesting.steps.extend(
        [
            _step("chunks", "split", STEP.PIPELINE_STEP_STATE_SUCCEEDED),
            _step("vectors", "map", STEP.PIPELINE_STEP_STATE_RUNNING, 138, 36, 1),
            _step("gathered", "gather", STEP.PIPELINE_STEP_STATE_PENDING),
            _step("store", "sink", STEP.PIPELINE_STEP_STATE_PENDING),
        ]
    )
    assert progress(ingesting) == ("2/4 vectors map", "37/138 jobs, 1 failed")
    starting = _run("r2", "analysis", RUN.PIPELINE_RUN_STATE_RUNNING, NOW - 2)
    starting.steps.append(_step("extract", "chat", STEP.PIPELINE_STEP_STATE_PENDING))
    assert progress(starting) == ("1/1 extract chat", "pending")
    view = RunsView(
        counts={
            "ingest": Counter(RUNNING=1, SUCCEEDED=4),
            "analysis": Counter(RUNNING=1, FAILED=2, CANCELLED=1),
        },
        running=[ingesting, starting],
        recent=[
            _run(
                "r9",
                "analysis",
                RUN.PIPELINE_RUN_STATE_FAILED,
                NOW - 10,
                NOW - 8,
                "step 'analyze' failed " + "x" * 100,
            ),
            _run("r8", "ingest", RUN.PIPELINE_RUN_STATE_SUCCEEDED, NOW - 200, NOW - 9.5),
        ],
    )
    out = _text(*render_runs(view, NOW))
    lines = out.splitlines()
    # Per pipeline: running, then the runs ended in each state.
    assert any(
        line.split() == ["│", "analysis", "│", "1", "│", "0", "│", "2", "│", "1", "│"] for line in lines
    ), out
    assert any(
        line.split() == ["│", "ingest", "│", "1", "│", "4", "│", "0", "│", "0", "│"] for line in lines
    ), out
    row = next(line for line in lines if "r1" in line)
    assert "2/4 vectors map" in row and "37/138 jobs, 1 failed" in row and "1m15s" in row
    assert "1/1 extract chat" in next(line for line in lines if " r2 " in line)
    # Ended last, the latest first, errors cut short.
    assert out.index(" r9 ") < out.index(" r8 ")
    r9 = next(line for line in lines if " r9 " in line)
    assert "FAILED" in r9 and "2.0s" in r9 and "…" in r9 and "x" * 100 not in out
    assert "3m10s" in next(line for line in lines if " r8 " in line)


def test_no_runs_means_no_runs_section_in_top() -> None:
    stats = ops_pb2.GetStatsResponse(read_time=_ts(NOW))
    assert render_runs(RunsView(), NOW) == []
    assert "pipelines" not in _text(render_top(stats, {}, runs=RunsView()))
    assert "pipelines" not in _text(render_top(stats, {}))
    view = RunsView(counts={"ingest": Counter(SUCCEEDED=1)})
    assert "pipelines" in _text(render_top(stats, {}, runs=view))


PIPELINES = """
providers:
  mock: {type: mock}
  slow: {type: mock, latency_ms: 30000}
pipelines:
  quick:
    steps:
      - {name: ask, kind: chat, route: chat, template: "{{ input }}"}
  stuck:
    steps:
      - {name: chunks, kind: split, size: 2}
      - {name: wait, kind: map, over: chunks, route: slow, job: chat}
"""


@pytest.fixture
def config() -> LanewayConfig:
    return make_config(PIPELINES)


@pytest.fixture
async def stub(broker: BrokerServer) -> AsyncIterator[pb_grpc.BrokerServiceStub]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield pb_grpc.BrokerServiceStub(channel)


async def test_the_watch_counts_each_run_once_and_follows_running_ones(
    stub: pb_grpc.BrokerServiceStub, worker: object, client: laneway.AsyncClient, broker: BrokerServer
) -> None:
    done = [await start(stub, "quick", f"q{i}") for i in range(3)]
    for run_id in done:
        assert (await finished(stub, run_id)).state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    stuck = await start(stub, "stuck", "abcd")
    watch = RunWatch(recent=2)
    view = await watch.refresh(client)
    assert view.counts == {"quick": Counter(SUCCEEDED=3), "stuck": Counter(RUNNING=1)}
    assert [r.run_id for r in view.running] == [stuck]
    assert [r.run_id for r in view.recent] == [done[2], done[1]]
    # Again, with a new run and the stuck one cancelled: nothing counted twice.
    await stub.CancelPipelineRun(pipeline_pb2.CancelPipelineRunRequest(run_id=stuck, reason="enough"))
    late = await start(stub, "quick", "late")
    assert (await finished(stub, late)).state == RUN.PIPELINE_RUN_STATE_SUCCEEDED
    view = await watch.refresh(client)
    assert view.counts == {"quick": Counter(SUCCEEDED=4), "stuck": Counter(CANCELLED=1)}
    assert view.running == [] and {r.run_id for r in view.recent} <= {late, stuck, done[2]}
    # The command shows them.
    code, out, err = await cli("top", "--once", "--addr", broker.address)
    assert code == 0, err
    assert "pipelines" in out and "ended last" in out and late in out
    assert any(line.split()[:2] == ["│", "quick"] and line.split()[5] == "4" for line in out.splitlines()), (
        out
    )
