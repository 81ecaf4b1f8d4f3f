"""Pipeline figures for docs/pipelines.md (run by hand, not by pytest):

    .venv/bin/python -m tests.pipeline_measure

1. Ingestion of 1,000 chunks (split -> map embedding -> gather) on the in-process
   mock provider: wall time and provider calls, with the route's batching on
   (max_items 32) and off (max_items 1).
2. The same 1,000 chunks on separate processes (``tests.stack``) with a worker
   killed (-9) and the broker killed and restarted part-way: every chunk's job
   enqueued once and ended once, each step started once.
3. A 3-step chat pipeline against three chained ``Run`` calls (the mock answers at
   once): p50 of a whole run, and of one transition (a step's job final -> the next
   step's job enqueued, from the run's log and the jobs' events).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import nats

import laneway
from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.core.events import EventLog
from laneway.broker.pipelines.entries import ChildFinished, StepStarted
from laneway.broker.pipelines.runlog import RunLog
from laneway.broker.server.process import BrokerServer
from laneway.v1 import broker_service_pb2_grpc as pb_grpc
from laneway.v1 import pipeline_pb2
from laneway.workers.pool import WorkerPool
from tests.conftest import make_config
from tests.stack import Stack

CHUNKS = 1000
TEXT = "".join(f"chunk {i:04d}." for i in range(CHUNKS))  # 11 characters a chunk
CONFIG = """
providers:
  mock: {{type: mock, concurrency: 64, call_log: "{log}"}}
routes:
  chat: {{targets: [{{provider: mock, model: mock-chat}}]}}
  embed: {{targets: [{{provider: mock, model: mock-embedding}}]}}
batch: {{max_items: {max_items}, max_wait_ms: 20}}
pipelines:
  ingest:
    steps:
      - {{name: chunks, kind: split, size: 11}}
      - {{name: vectors, kind: map, over: chunks, route: embed}}
      - {{name: gathered, kind: gather, from: vectors}}
      - {{name: store, kind: sink, from: vectors, bucket: vectors}}
  three:
    steps:
      - {{name: a, kind: chat, route: chat, template: "{{{{ input }}}}"}}
      - {{name: b, kind: chat, route: chat, template: "{{{{ steps.a.text }}}}"}}
      - {{name: c, kind: chat, route: chat, template: "{{{{ steps.b.text }}}}"}}
"""


async def _until_ended(stub: pb_grpc.BrokerServiceStub, run_id: str) -> pipeline_pb2.PipelineRun:
    while True:
        run = (await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id=run_id))).run
        if run.state != pipeline_pb2.PIPELINE_RUN_STATE_RUNNING:
            return run
        await asyncio.sleep(0.005)  # polling with the run's end as the condition


async def ingest(root: Path, max_items: int) -> dict[str, object]:
    log = root / f"calls-{max_items}.jsonl"
    config = make_config(CONFIG.format(log=log, max_items=max_items))
    async with (
        EmbeddedNats(root / f"nats-{max_items}") as server,
        BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
        WorkerPool(config, nats_url=server.url),
        grpc.aio.insecure_channel(broker.address) as channel,
    ):
        stub = pb_grpc.BrokerServiceStub(channel)
        began = time.perf_counter()
        run_id = (
            await stub.StartPipeline(pipeline_pb2.StartPipelineRequest(pipeline="ingest", input=TEXT))
        ).run_id
        run = await _until_ended(stub, run_id)
        wall = time.perf_counter() - began
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return {
        "max_items": max_items,
        "state": pipeline_pb2.PipelineRunState.Name(run.state),
        "chunks": run.steps[1].children,
        "succeeded": run.steps[1].succeeded,
        "wall_s": round(wall, 2),
        "provider_calls": len(calls),
        "step_s": {
            s.name: round((s.end_time.ToNanoseconds() - s.start_time.ToNanoseconds()) / 1e9, 2)
            for s in run.steps
        },
        "sunk": run.steps[3].items,
    }


async def ingest_under_faults(root: Path) -> dict[str, object]:
    # Stack formats the text once more, with the call log's path: every other brace doubled.
    text = CONFIG.format(log="\x00", max_items=32).replace("{", "{{").replace("}", "}}")
    config = text.replace("\x00", "{call_log}")
    (root / "stack").mkdir()
    async with Stack(root / "stack", workers=2, config=config) as stack:
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = pb_grpc.BrokerServiceStub(channel)
            began = time.perf_counter()
            request = pipeline_pb2.StartPipelineRequest(pipeline="ingest", input=TEXT)
            run_id = (await stub.StartPipeline(request)).run_id
            while True:  # a quarter of the chunks embedded: strike
                run = (await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(run_id=run_id))).run
                if run.steps[1].succeeded >= CHUNKS // 4:
                    break
                await asyncio.sleep(0.005)
        await stack.kill_worker(0)
        await stack.kill_broker()
        await stack.start_broker()
        await stack.start_worker(0)
        async with grpc.aio.insecure_channel(stack.address) as channel:
            run = await _until_ended(pb_grpc.BrokerServiceStub(channel), run_id)
        wall = time.perf_counter() - began
        nc = await nats.connect(stack.nats.url)
        try:
            kv = await nc.jetstream().key_value("laneway_sink_vectors")
            sunk = len([k for k in await kv.keys() if k.startswith(f"{run_id}.")])
            async with EventLog(nc) as events:
                entries = [e for _, e in await RunLog(nc, events.mux).entries(run_id)]
                queued, finals = Counter[int](), Counter[int]()
                for i in range(CHUNKS):
                    history = [e.decode() for e in await events.history(f"{run_id}-1-{i}")]
                    queued[sum(e.state.name == "QUEUED" for e in history)] += 1
                    finals[sum(e.state.is_final for e in history)] += 1
        finally:
            await nc.close()
        called = Counter(j for c in stack.calls() for j in (c.get("job_ids") or [c["job_id"]]))  # type: ignore[attr-defined]
    return {
        "state": pipeline_pb2.PipelineRunState.Name(run.state),
        "wall_s_with_restarts": round(wall, 2),
        "succeeded": run.steps[1].succeeded,
        "keys_in_sink_bucket": sunk,
        "jobs_by_queued_events": dict(queued),
        "jobs_by_final_events": dict(finals),
        "step_started_entries": Counter(e.step for e in entries if isinstance(e, StepStarted)),
        "child_finished_entries": sum(isinstance(e, ChildFinished) for e in entries),
        "jobs_called_more_than_once": sum(1 for n in called.values() if n > 1),
    }


async def transitions(root: Path, runs: int = 40) -> dict[str, object]:
    config = make_config(CONFIG.format(log=root / "calls-t.jsonl", max_items=32))
    async with (
        EmbeddedNats(root / "nats-t") as server,
        BrokerServer(config, nats_url=server.url, grpc_addr="127.0.0.1:0", reuse_port=False) as broker,
        WorkerPool(config, nats_url=server.url),
        grpc.aio.insecure_channel(broker.address) as channel,
        laneway.AsyncClient(broker.address) as client,
    ):
        stub = pb_grpc.BrokerServiceStub(channel)
        chained: list[float] = []
        piped: list[float] = []
        gaps: list[float] = []
        for i in range(runs):
            began = time.perf_counter()
            text = f"hello {i}"
            for _ in range(3):
                text = (await client.run("chat", laneway.chat(text))).result.chat.text
            chained.append(time.perf_counter() - began)
            began = time.perf_counter()
            request = pipeline_pb2.StartPipelineRequest(pipeline="three", input=f"hello {i}")
            run_id = (await stub.StartPipeline(request)).run_id
            run = await _until_ended(stub, run_id)
            piped.append(time.perf_counter() - began)
            for step in (1, 2):
                before = await client.get_job(f"{run_id}-{step - 1}-0")
                after = await client.get_job(f"{run_id}-{step}-0")
                # Final event of step k's job -> step k+1's job enqueued.
                gaps.append((after.enqueue_time.ToNanoseconds() - before.end_time.ToNanoseconds()) / 1e9)
            assert run.state == pipeline_pb2.PIPELINE_RUN_STATE_SUCCEEDED
    return {
        "runs": runs,
        "three_chained_run_calls_p50_ms": round(statistics.median(chained) * 1000, 1),
        "pipeline_of_three_p50_ms": round(statistics.median(piped) * 1000, 1),
        "transition_p50_ms": round(statistics.median(gaps) * 1000, 1),
        "transition_p90_ms": round(statistics.quantiles(gaps, n=10)[-1] * 1000, 1),
    }


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for max_items in (32, 1):
            print(json.dumps({"ingest": await ingest(root, max_items)}), flush=True)
        print(json.dumps({"transitions": await transitions(root)}), flush=True)
        if "--no-faults" not in sys.argv:
            print(
                json.dumps({"ingest_under_faults": await ingest_under_faults(root)}, default=dict), flush=True
            )


if __name__ == "__main__":
    asyncio.run(main())
