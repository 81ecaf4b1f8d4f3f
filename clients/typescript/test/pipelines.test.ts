// The pipeline methods of @laneway/client against a real stack (tests/ts_stack.py, whose
// config declares the pipelines "analysis" and "slow"): start, stream to the end, read,
// list, cancel, resume, the errors, and a stream resumed across a broker restart.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  AlreadyExists,
  ErrorReason,
  InvalidArgument,
  LanewayClient,
  LanewayError,
  NotFound,
  PipelineRunState,
  PipelineStepState,
  type PipelineRunEvent,
} from "../src/index.js";
import { Stack } from "./stack.js";

let stack: Stack;
let client: LanewayClient;

before(async () => {
  stack = await Stack.start();
  client = new LanewayClient(stack.address, { timeoutMs: 10_000, resumeForMs: 30_000 });
});

after(async () => {
  client?.close();
  await stack?.stop();
});

async function collect(events: AsyncIterable<PipelineRunEvent>): Promise<PipelineRunEvent[]> {
  const out: PipelineRunEvent[] = [];
  for await (const e of events) out.push(e);
  return out;
}

async function refused<T extends LanewayError>(cls: new (...args: never[]) => T, fn: () => Promise<unknown>): Promise<T> {
  try {
    await fn();
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${String(err)}`);
    return err;
  }
  assert.fail(`expected ${cls.name}, nothing was thrown`);
}

function assertSeqs(events: PipelineRunEvent[], from = 1n): void {
  assert.deepEqual(
    events.map((e) => e.seq),
    events.map((_, i) => from + BigInt(i)),
    "seq numbers with no gap or duplicate",
  );
}

describe("pipelines", () => {
  it("starts a run, streams its log to the end and reads it", async () => {
    const { runId, duplicate } = await client.startPipeline("analysis", "the sky is blue");
    assert.match(runId, /\S/);
    assert.equal(duplicate, false);
    const events = await collect(client.streamPipelineRun(runId, { timeoutMs: 30_000 }));
    assertSeqs(events);
    assert.equal(typeof events[0]!.seq, "bigint");
    const kinds = events.map((e) => `${e.kind} ${e.step}`.trim());
    assert.equal(kinds[0], "started");
    assert.equal(kinds.at(-1), "finished");
    for (const step of ["extract", "summarize"]) {
      assert.equal(kinds.filter((k) => k === `step_started ${step}`).length, 1);
      assert.equal(kinds.filter((k) => k === `step_finished ${step}`).length, 1);
    }
    const children = events.filter((e) => e.kind === "child_finished");
    assert.deepEqual(children.map((e) => [e.jobId, e.state]), [
      [`${runId}-0-0`, "SUCCEEDED"],
      [`${runId}-1-0`, "SUCCEEDED"],
    ]);
    assert.equal(events.at(-1)!.runState, PipelineRunState.SUCCEEDED);

    const run = await client.getPipelineRun(runId);
    assert.equal(run.runId, runId);
    assert.equal(run.pipeline, "analysis");
    assert.equal(run.state, PipelineRunState.SUCCEEDED);
    assert.deepEqual(run.steps.map((s) => [s.name, s.state, s.children, s.succeeded]), [
      ["extract", PipelineStepState.SUCCEEDED, 1, 1],
      ["summarize", PipelineStepState.SUCCEEDED, 1, 1],
    ]);
    const last = await client.getJob(`${runId}-1-0`);
    assert.ok(last.outcome.case === "result" && last.outcome.value.output.case === "chat");
    assert.equal(last.outcome.value.output.value.text, "summary of facts of: the sky is blue");

    // A late joiner resuming after the third entry gets the rest, the same.
    const rest = await collect(client.streamPipelineRun(runId, { resumeAfter: 3 }));
    assertSeqs(rest, 4n);
    assert.deepEqual(rest, events.slice(3));
  });

  it("an idempotency key gives the same run; with another input, IDEMPOTENCY_KEY_REUSED", async () => {
    const key = `pipe-${Date.now()}`;
    const first = await client.startPipeline("analysis", "once", { idempotencyKey: key });
    const again = await client.startPipeline("analysis", "once", { idempotencyKey: key });
    assert.deepEqual(again, { runId: first.runId, duplicate: true });
    const err = await refused(AlreadyExists, () => client.startPipeline("analysis", "twice", { idempotencyKey: key }));
    assert.equal(err.reason, "IDEMPOTENCY_KEY_REUSED");
  });

  it("lists runs a page at a time, cancels idempotently, and resumes only a failed run", async () => {
    const name = "slow";
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push((await client.startPipeline(name, `page ${i}`)).runId);
    const page = await client.listPipelineRuns({ pipeline: name, pageSize: 2 });
    const all = [];
    for await (const run of client.pipelineRuns({ pipeline: name, pageSize: 2 })) all.push(run.runId);
    assert.equal(page.runs.length, 2);
    assert.ok(page.nextPageToken);
    assert.deepEqual(all.slice(-3), ids, "every page, oldest first");
    for (const runId of ids) {
      const cancelled = await client.cancelPipelineRun(runId, "enough");
      assert.deepEqual([cancelled.state, cancelled.cancelled], [PipelineRunState.CANCELLED, true]);
      const again = await client.cancelPipelineRun(runId);
      assert.deepEqual([again.state, again.cancelled], [PipelineRunState.CANCELLED, false]);
      const resumed = await client.resumePipelineRun(runId);
      assert.equal(resumed.resumed, false, "a cancelled run did not fail at a step");
    }
    const events = await collect(client.streamPipelineRun(ids[0]!));
    // A job the cancel ended may be recorded after the run's end: find the end itself.
    const ends = events.filter((e) => e.kind === "finished");
    assert.deepEqual(ends.map((e) => [e.state, e.error, e.runState]), [["CANCELLED", "enough", PipelineRunState.CANCELLED]]);
  });

  it("UNKNOWN_PIPELINE: InvalidArgument naming the pipeline; UNKNOWN_PIPELINE_RUN: NotFound", async () => {
    const err = await refused(InvalidArgument, () => client.startPipeline("analyis", "x"));
    assert.equal(err.reason, "UNKNOWN_PIPELINE");
    assert.equal(err.reasonValue, ErrorReason.UNKNOWN_PIPELINE);
    assert.equal(err.field, "pipeline");
    assert.equal(err.metadata["pipeline"], "analyis");
    assert.match(err.rawMessage, /did you mean 'analysis'\?/);
    const calls: Array<() => Promise<unknown>> = [
      () => client.getPipelineRun("nosuchrun"),
      () => client.cancelPipelineRun("nosuchrun"),
      () => client.resumePipelineRun("nosuchrun"),
      () => collect(client.streamPipelineRun("nosuchrun")),
    ];
    for (const call of calls) {
      const missing = await refused(NotFound, call);
      assert.equal(missing.reason, "UNKNOWN_PIPELINE_RUN");
      assert.equal(missing.metadata["run_id"], "nosuchrun");
    }
  });

  it("resumes a run's stream across a broker crash and restart (SIGKILL), each entry once", async (t) => {
    const { runId } = await client.startPipeline("slow", "through it");
    const events: PipelineRunEvent[] = [];
    const resumes: string[] = [];
    let restart: Promise<void> | undefined;
    let seenAtRestart = 0;
    try {
      const onResume = (err: LanewayError): void => {
        resumes.push(`${err.codeName}/${err.reason || "-"}`);
      };
      for await (const e of client.streamPipelineRun(runId, { onResume, timeoutMs: 60_000 })) {
        events.push(e);
        if (!restart && e.kind === "step_started") {
          seenAtRestart = events.length;
          restart = stack.restartBroker();
        }
      }
    } finally {
      await restart; // the broker is back before the next test, even when the stream failed
    }
    for (const r of resumes) t.diagnostic(`resumed after ${r}`);
    assert.ok(resumes.length >= 1, "the stream broke and was resumed");
    assert.ok(seenAtRestart < events.length, "entries came after the restart");
    assertSeqs(events);
    assert.equal(events.at(-1)!.runState, PipelineRunState.SUCCEEDED);
    assert.deepEqual(await collect(client.streamPipelineRun(runId)), events);
  });
});
