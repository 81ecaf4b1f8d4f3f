// @laneway/client against a real stack (tests/ts_stack.py): nats-server, a broker and a
// worker with the mock provider. Nothing is mocked.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { BytesValueSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import {
  AlreadyExists,
  BrokerService,
  CircuitState,
  DeadLetterReason,
  DeadlineExceeded,
  ErrorReason,
  FINAL_STATES,
  InvalidArgument,
  JobErrorCode,
  JobSpecSchema,
  JobState,
  LanewayClient,
  LanewayError,
  Lane,
  NotFound,
  Unavailable,
  Unauthenticated,
  InternalError,
  Cancelled,
  chat,
  embedding,
  classification,
  toLanewayError,
  type JobEvent,
} from "../src/index.js";
import { Stack } from "./stack.js";
import { TlsProxy, selfSigned } from "./tls_proxy.js";

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

async function collect(events: AsyncIterable<JobEvent>): Promise<JobEvent[]> {
  const out: JobEvent[] = [];
  for await (const e of events) out.push(e);
  return out;
}

/** Run `fn`, expect it to throw a LanewayError of `cls`, and return the error. */
async function refused<T extends LanewayError>(
  cls: new (...args: never[]) => T,
  fn: () => Promise<unknown>,
): Promise<T> {
  try {
    await fn();
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${String(err)}`);
    assert.ok(err instanceof LanewayError);
    return err;
  }
  assert.fail(`expected ${cls.name}, nothing was thrown`);
}

function assertSeqs(events: JobEvent[], from = 1n): void {
  const seqs = events.map((e) => e.seq);
  const want = seqs.map((_, i) => from + BigInt(i));
  assert.deepEqual(seqs, want, "seq numbers with no gap or duplicate");
}

function chatText(e: JobEvent): string {
  assert.equal(e.payload.case, "result");
  const out = e.payload.value.output;
  assert.equal(out.case, "chat");
  return out.value.text;
}

describe("jobs", () => {
  it("submits and streams a job to SUCCEEDED with its text", async () => {
    const { jobId, duplicate } = await client.submit({ route: "chat", lane: Lane.HIGH, input: chat("hello from typescript") });
    assert.match(jobId, /\S/);
    assert.equal(duplicate, false);
    const events = await collect(client.stream([jobId]));
    assert.deepEqual(events.map((e) => e.state), [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]);
    assertSeqs(events);
    assert.equal(typeof events[0]!.seq, "bigint");
    assert.ok(events.every((e) => e.jobId === jobId && e.lane === Lane.HIGH && e.route === "chat"));
    assert.equal(chatText(events.at(-1)!), "hello from typescript");
    assert.ok(FINAL_STATES.has(events.at(-1)!.state));

    const job = await client.getJob(jobId);
    assert.equal(job.state, JobState.SUCCEEDED);
    assert.equal(job.lastSeq, 3n);
    assert.equal(job.outcome.case, "result");
  });

  it("late join: StreamResults after the job finished gives every event from seq 1", async () => {
    const { jobId } = await client.submit({ route: "chat", input: chat("late") });
    const final = await client.wait(jobId);
    assert.equal(final.state, JobState.SUCCEEDED);
    const all = await collect(client.streamResults([jobId]));
    assert.deepEqual(all.map((e) => e.state), [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]);
    assertSeqs(all);
    const rest = await collect(client.stream([jobId], { resumeAfter: { [jobId]: 1n } }));
    assertSeqs(rest, 2n);
    const finals = await collect(client.streamResults([jobId], { finalOnly: true }));
    assert.deepEqual(finals.map((e) => e.seq), [3n]);
  });

  it("runs a job in one call, and embedding and classification inputs", async () => {
    const events = [];
    for await (const e of client.run({ route: "chat", input: chat("run me") })) events.push(e);
    assert.equal(events.at(-1)!.event.state, JobState.SUCCEEDED);
    assert.ok(events.every((e) => !e.duplicate));
    assertSeqs(events.map((e) => e.event));
    assert.equal(chatText(events.at(-1)!.event), "run me");

    const key = `run-${Date.now()}`;
    const first = [];
    for await (const e of client.run({ route: "chat", input: chat("once"), idempotencyKey: key }, { finalOnly: true })) first.push(e);
    const again = [];
    for await (const e of client.run({ route: "chat", input: chat("once"), idempotencyKey: key }, { finalOnly: true })) again.push(e);
    assert.equal(first.length, 1);
    assert.equal(again.at(-1)!.duplicate, true);
    assert.equal(again.at(-1)!.event.jobId, first[0]!.event.jobId);

    const emb = await client.wait((await client.submit({ route: "chat", input: embedding(["a", "b"]) })).jobId);
    assert.equal(emb.state, JobState.SUCCEEDED);
    assert.equal(emb.payload.case === "result" && emb.payload.value.output.case, "embedding");
    const cls = await client.wait((await client.submit({ route: "chat", input: classification("I love it", ["love", "hate"]) })).jobId);
    assert.ok(cls.payload.case === "result" && cls.payload.value.output.case === "classification");
    assert.equal(cls.payload.value.output.value.label, "love");
  });

  for (const graceful of [false, true]) {
    const how = graceful ? "a graceful broker restart (SIGTERM)" : "a broker crash and restart (SIGKILL)";
    it(`resumes a stream across ${how} with no gap or duplicate seq`, async (t) => {
      const words = Array.from({ length: 40 }, (_, i) => `word${i}`).join(" ");
      const { jobId } = await client.submit({ route: "stream", input: chat(words, { stream: true }) });
      const events: JobEvent[] = [];
      const resumes: string[] = [];
      let restart: Promise<void> | undefined;
      const onResume = (err: LanewayError): void => {
        resumes.push(`${err.codeName}/${err.reason || "-"}: ${err.rawMessage}`);
      };
      try {
        for await (const e of client.stream([jobId], { onResume })) {
          events.push(e);
          if (!restart && e.payload.case === "delta") restart = stack.restartBroker(graceful);
        }
      } finally {
        await restart; // the broker is back before the next test, even when the stream failed
      }
      assert.ok(restart, "a delta arrived before the job ended");
      for (const r of resumes) t.diagnostic(`resumed after ${r}`);
      assertSeqs(events);
      assert.equal(events.at(-1)!.state, JobState.SUCCEEDED);
      assert.ok(resumes.length >= 1, "the stream broke and was resumed");
      if (graceful) {
        // errors.proto: a draining broker ends streams UNAVAILABLE, reason SHUTTING_DOWN.
        assert.match(resumes[0]!, /^UNAVAILABLE\/SHUTTING_DOWN/);
      }
      const text = events.map((e) => (e.payload.case === "delta" ? e.payload.value.text : "")).join("");
      assert.equal(text, words);
      assert.equal(chatText(events.at(-1)!), words);
      // The new broker answers plain calls on the same client too.
      assert.equal((await client.getJob(jobId)).state, JobState.SUCCEEDED);
    });
  }

  it("keeps resuming through a broker outage of over 5 s (a time window, not a few retries)", async () => {
    const { jobId } = await client.submit({ route: "chat", input: chat("outlive it"), metadata: { "mock.latency_ms": "2000" } });
    const events: JobEvent[] = [];
    let resumes = 0;
    let outage: Promise<void> | undefined;
    try {
      for await (const e of client.stream([jobId], { onResume: () => resumes++ })) {
        events.push(e);
        if (!outage) {
          outage = (async () => {
            await stack.killBroker();
            await new Promise((r) => setTimeout(r, 6_000));
            await stack.startBroker();
          })();
        }
      }
    } finally {
      // Even when the stream fails, the broker is back before the next test starts.
      await outage;
    }
    assertSeqs(events);
    assert.equal(events.at(-1)!.state, JobState.SUCCEEDED);
    assert.equal(chatText(events.at(-1)!), "outlive it");
    assert.ok(resumes >= 4, `resumed ${resumes} times`);
  });

  it("run() resumes with StreamResults when the broker restarts after the first event", async () => {
    const words = Array.from({ length: 30 }, (_, i) => `w${i}`).join(" ");
    const events: JobEvent[] = [];
    let resumes = 0;
    let restart: Promise<void> | undefined;
    try {
      for await (const { event } of client.run({ route: "stream", input: chat(words, { stream: true }) }, { onResume: () => resumes++ })) {
        events.push(event);
        if (!restart && event.payload.case === "delta") restart = stack.restartBroker();
      }
    } finally {
      await restart;
    }
    assertSeqs(events);
    assert.ok(resumes >= 1, "the stream was resumed");
    assert.equal(events.at(-1)!.state, JobState.SUCCEEDED);
    assert.equal(chatText(events.at(-1)!), words);
  });

  it("submits a batch of 1,000 and streams every result", async () => {
    const jobs = Array.from({ length: 1000 }, (_, i) => ({ route: "chat", input: chat(`job ${i}`) }));
    const outcomes = await client.submitBatch(jobs, { timeoutMs: 30_000 });
    assert.equal(outcomes.length, 1000);
    const ids = outcomes.map((o) => {
      assert.ok(o.ok, o.error?.message);
      return o.jobId;
    });
    assert.equal(new Set(ids).size, 1000);
    const finals = await collect(client.stream(ids, { finalOnly: true, timeoutMs: 60_000 }));
    assert.equal(finals.length, 1000);
    assert.ok(finals.every((e) => e.state === JobState.SUCCEEDED));
    const byId = new Map(finals.map((e) => [e.jobId, chatText(e)]));
    assert.equal(byId.get(ids[999]!), "job 999");
  });

  it("cancels a running job, idempotently", async () => {
    const { jobId } = await client.submit({ route: "chat", input: chat("slow"), metadata: { "mock.latency_ms": "20000" } });
    for await (const e of client.stream([jobId])) if (e.state === JobState.RUNNING) break;
    const res = await client.cancelJob(jobId, "test cancel");
    assert.equal(res.cancelled, true);
    assert.equal(res.state, JobState.CANCELLED);
    const final = await client.wait(jobId, { timeoutMs: 10_000 });
    assert.equal(final.state, JobState.CANCELLED);
    assert.ok(final.payload.case === "error" && final.payload.value.code === JobErrorCode.CANCELLED);
    const again = await client.cancelJob(jobId);
    assert.deepEqual([again.cancelled, again.state], [false, JobState.CANCELLED]);
  });

  it("idempotency: the same key is a duplicate; the same key with another input is IDEMPOTENCY_KEY_REUSED", async () => {
    const key = `idem-${Date.now()}`;
    const first = await client.submit({ route: "chat", input: chat("one"), idempotencyKey: key });
    const second = await client.submit({ route: "chat", input: chat("one"), idempotencyKey: key });
    assert.deepEqual(second, { jobId: first.jobId, duplicate: true });
    const err = await refused(AlreadyExists, () => client.submit({ route: "chat", input: chat("two"), idempotencyKey: key }));
    assert.equal(err.reason, "IDEMPOTENCY_KEY_REUSED");
    assert.equal(err.reasonValue, ErrorReason.IDEMPOTENCY_KEY_REUSED);
    assert.equal(err.codeName, "ALREADY_EXISTS");
    assert.equal(err.metadata["job_id"], first.jobId);
    assert.equal(err.metadata["idempotency_key"], key);
  });

  it("a job that fails permanently ends DEAD_LETTERED and ListDeadLetters finds it", async () => {
    const { jobId } = await client.submit({ route: "chat", input: chat("doomed"), metadata: { "mock.fail": "400" } });
    const final = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(final.state, JobState.DEAD_LETTERED);
    assert.ok(final.payload.case === "error" && final.payload.value.code === JobErrorCode.INVALID_REQUEST);
    // The DeadLetter record is written just after the DEAD_LETTERED event (two steps,
    // broker/core/dead_letters.py): poll briefly.
    let page = await client.listDeadLetters({ filter: { jobIds: [jobId] } });
    for (let i = 0; page.deadLetters.length === 0 && i < 100; i++) {
      await new Promise((r) => setTimeout(r, 50));
      page = await client.listDeadLetters({ filter: { jobIds: [jobId] } });
    }
    assert.equal(page.deadLetters.length, 1);
    const dl = page.deadLetters[0]!;
    assert.equal(dl.jobId, jobId);
    assert.equal(dl.reason, DeadLetterReason.PERMANENT_ERROR);
    assert.equal(dl.spec?.route, "chat");
    assert.ok(dl.attempts.length >= 1);
    const listed = [];
    for await (const d of client.deadLetters({ filter: { route: "chat" } })) listed.push(d.jobId);
    assert.ok(listed.includes(jobId));

    const redriven = await client.redriveDeadLetters({ filter: { jobIds: [jobId] } });
    assert.equal(redriven.length, 1);
    assert.ok(redriven[0]!.ok && redriven[0]!.newJobId !== jobId);
  });
});

describe("errors", () => {
  it("UNKNOWN_ROUTE: InvalidArgument naming the field and the route", async () => {
    const err = await refused(InvalidArgument, () => client.submit({ route: "nope", input: chat("x") }));
    assert.equal(err.reason, "UNKNOWN_ROUTE");
    assert.equal(err.reasonValue, ErrorReason.UNKNOWN_ROUTE);
    assert.equal(err.code, 3);
    assert.equal(err.codeName, "INVALID_ARGUMENT");
    assert.equal(err.field, "job.route");
    assert.equal(err.metadata["route"], "nope");
    assert.equal(err.metadata["field"], "job.route");
    assert.equal(err.retryable, false);
  });

  it("INVALID_FIELD: InvalidArgument naming the field", async () => {
    const err = await refused(InvalidArgument, () => client.submit({ route: "chat" }));
    assert.equal(err.reason, "INVALID_FIELD");
    assert.match(err.field, /^job\./);
    assert.equal(err.metadata["field"], err.field);
    const page = await refused(InvalidArgument, () => client.listDeadLetters({ pageSize: -1 }));
    assert.equal(page.reason, "INVALID_FIELD");
    assert.equal(page.field, "page_size");
  });

  it("LIMIT_EXCEEDED: a batch of max_batch_jobs + 1", async () => {
    const info = await client.getServerInfo();
    const max = info.limits!.maxBatchJobs;
    assert.ok(max > 0);
    const jobs = Array.from({ length: max + 1 }, () => ({ route: "chat", input: chat("x") }));
    const err = await refused(InvalidArgument, () => client.submitBatch(jobs));
    assert.equal(err.reason, "LIMIT_EXCEEDED");
    assert.equal(err.field, "jobs");
    assert.equal(err.metadata["limit"], String(max));
    assert.equal(err.metadata["actual"], String(max + 1));

    const maxIds = info.limits!.maxStreamJobIds;
    const ids = Array.from({ length: maxIds + 1 }, (_, i) => `job-${i}`);
    const stream = await refused(InvalidArgument, () => collect(client.stream(ids)));
    assert.equal(stream.reason, "LIMIT_EXCEEDED");
    assert.equal(stream.metadata["limit"], String(maxIds));
    assert.equal(stream.metadata["actual"], String(maxIds + 1));

    const maxMeta = info.limits!.maxMetadataEntries;
    const metadata = Object.fromEntries(Array.from({ length: maxMeta + 1 }, (_, i) => [`k${i}`, "v"]));
    const meta = await refused(InvalidArgument, () => client.submit({ route: "chat", input: chat("x"), metadata }));
    assert.equal(meta.reason, "LIMIT_EXCEEDED");
    assert.equal(meta.field, "job.metadata");
    assert.equal(meta.metadata["limit"], String(maxMeta));
  });

  it("UNKNOWN_PROVIDER: a provider that is not a target of the route, or not configured", async () => {
    const err = await refused(InvalidArgument, () => client.submit({ route: "chat", input: chat("x"), providers: ["nope"] }));
    assert.equal(err.reason, "UNKNOWN_PROVIDER");
    assert.equal(err.metadata["provider"], "nope");
    assert.match(err.field, /^job\.providers/);
    const health = await refused(InvalidArgument, () => client.getProviderHealth(["nope"]));
    assert.equal(health.reason, "UNKNOWN_PROVIDER");
    assert.equal(health.metadata["provider"], "nope");
  });

  it("UNKNOWN_JOB: NotFound with the job id and a ResourceInfo", async () => {
    const err = await refused(NotFound, () => client.getJob("no-such-job"));
    assert.equal(err.reason, "UNKNOWN_JOB");
    assert.equal(err.metadata["job_id"], "no-such-job");
    assert.equal(err.resource?.name, "no-such-job");
    const cancel = await refused(NotFound, () => client.cancelJob("no-such-job"));
    assert.equal(cancel.reason, "UNKNOWN_JOB");
    const stream = await refused(NotFound, () => collect(client.stream(["no-such-job"])));
    assert.equal(stream.reason, "UNKNOWN_JOB");
    assert.equal(stream.metadata["job_id"], "no-such-job");
  });

  it("MALFORMED_REQUEST: a body that is not a SubmitRequest", async () => {
    // SubmitRequest.job (field 1) holding bytes that are not a JobSpec: a BytesValue
    // has the same field number and wire type, so it goes out as a corrupt job.
    const method = { ...BrokerService.method.submit, input: BytesValueSchema };
    const corrupt = new Uint8Array([0x0a, 0x02, 0xff, 0xfe]); // route: invalid UTF-8
    let thrown: unknown;
    try {
      await client.transport.unary(method as never, undefined, 5_000, undefined, create(BytesValueSchema, { value: corrupt }) as never);
    } catch (e) {
      thrown = e;
    }
    const err = toLanewayError(thrown);
    assert.ok(err instanceof InvalidArgument, String(err));
    assert.equal(err.reason, "MALFORMED_REQUEST");
    // A sanity check that the same bytes inside a real JobSpec are refused the same way.
    assert.ok(toBinary(JobSpecSchema, create(JobSpecSchema, { route: "chat" })).length > 0);
  });

  it("a connection reset mid-stream is UNAVAILABLE (so streams resume), a bare ABORTED is not", () => {
    // Node reports a broker that went away mid-stream as "read ECONNRESET", which Connect
    // maps to ABORTED; the broker's own ABORTED (CONTENDED) always carries an ErrorInfo.
    const reset = Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
    const lost = toLanewayError(new ConnectError("read ECONNRESET", Code.Aborted, undefined, undefined, reset));
    assert.ok(lost instanceof Unavailable, String(lost));
    assert.ok(lost.retryable);
    const aborted = toLanewayError(new ConnectError("contended", Code.Aborted));
    assert.ok(!(aborted instanceof Unavailable) && aborted.code === Code.Aborted, String(aborted));
  });

  it("batch items carry their own error, mapped to the same classes", async () => {
    const outcomes = await client.submitBatch([
      { route: "chat", input: chat("fine") },
      { route: "nope", input: chat("x") },
    ]);
    assert.equal(outcomes[0]!.ok, true);
    const bad = outcomes[1]!;
    assert.ok(!bad.ok);
    assert.ok(bad.error instanceof InvalidArgument);
    assert.equal(bad.error.reason, "UNKNOWN_ROUTE");
    assert.equal(bad.error.reasonValue, ErrorReason.UNKNOWN_ROUTE);
    assert.equal(bad.error.field, "jobs[1].route");
    assert.equal(bad.error.metadata["route"], "nope");
  });

  it("NO_HEALTHY_TARGET: a when_all_down: fail route whose only provider's circuit is open", async () => {
    // The doomed provider answers every call with a 503; one failure opens its circuit.
    const { jobId } = await client.submit({ route: "doomed", input: chat("x") });
    const deadline = Date.now() + 20_000;
    for (;;) {
      const [health] = await client.getProviderHealth(["doomed"]);
      if (health?.circuitState === CircuitState.OPEN) break;
      assert.ok(Date.now() < deadline, "the doomed provider's circuit did not open");
      await new Promise((r) => setTimeout(r, 100));
    }
    const err = await refused(Unavailable, () => client.submit({ route: "doomed", input: chat("x") }));
    assert.equal(err.reason, "NO_HEALTHY_TARGET");
    assert.equal(err.metadata["route"], "doomed");
    assert.equal(err.retryable, true);
    assert.ok(err.retryDelayMs !== undefined && err.retryDelayMs >= 0, "RetryInfo");
    const final = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.ok(FINAL_STATES.has(final.state));
  });

  it("deadlines: a tiny timeoutMs is DeadlineExceeded, on unary calls and streams", async () => {
    const { jobId } = await client.submit({ route: "chat", input: chat("slow"), metadata: { "mock.latency_ms": "5000" } });
    const s = await refused(DeadlineExceeded, () => collect(client.streamResults([jobId], { timeoutMs: 300 })));
    assert.equal(s.codeName, "DEADLINE_EXCEEDED");
    const t0 = Date.now();
    await refused(DeadlineExceeded, () => collect(client.stream([jobId], { timeoutMs: 300 })));
    assert.ok(Date.now() - t0 < 3_000, "the stream helper does not resume past its deadline");
    const u = await refused(DeadlineExceeded, () => client.submit({ route: "chat", input: chat("x") }, { timeoutMs: 0.001 }));
    assert.equal(u.reason, "");
    await client.cancelJob(jobId);
  });

  it("an AbortSignal cancels a call with Cancelled", async () => {
    const { jobId } = await client.submit({ route: "chat", input: chat("slow"), metadata: { "mock.latency_ms": "5000" } });
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 200);
    await refused(Cancelled, () => collect(client.stream([jobId], { signal: ac.signal })));
    await client.cancelJob(jobId);
  });

  it("no broker: Unavailable", async () => {
    const dead = new LanewayClient("127.0.0.1:1", { timeoutMs: 2_000 });
    try {
      await refused(Unavailable, () => dead.getServerInfo());
    } finally {
      dead.close();
    }
  });
});

describe("ops and options", () => {
  it("GetServerInfo, GetStats and GetProviderHealth", async () => {
    const info = await client.getServerInfo({ timeoutMs: Infinity });
    assert.match(info.version, /\d/);
    assert.deepEqual(info.routes, ["chat", "stream", "doomed", "slow"]);
    assert.ok(info.limits!.maxStreamJobIds >= 1000);
    const stats = await client.getStats();
    assert.deepEqual(stats.routes.map((r) => r.route), ["chat", "stream", "doomed", "slow"]);
    assert.equal(typeof stats.routes[0]!.lanes[0]!.depth, "bigint");
    const health = await client.getProviderHealth();
    assert.deepEqual(health.map((p) => p.provider), ["mock", "streamer", "doomed", "slow"]);
    // proto3 optional fields are plain optional properties (no `_field` oneofs).
    assert.ok(!("_currentRpm" in health[0]!));
  });

  it("sends the client's and the call's metadata", async () => {
    const seen: Record<string, string | null>[] = [];
    const spy: Interceptor = (next) => async (req) => {
      seen.push({ a: req.header.get("x-laneway-a"), b: req.header.get("x-laneway-b") });
      return next(req);
    };
    const c = new LanewayClient(stack.address, { metadata: { "x-laneway-a": "1", "x-laneway-b": "client" }, interceptors: [spy] });
    try {
      await c.getServerInfo();
      await c.getServerInfo({ metadata: { "x-laneway-b": "call" } });
    } finally {
      c.close();
    }
    assert.deepEqual(seen, [
      { a: "1", b: "client" },
      { a: "1", b: "call" },
    ]);
  });
});

describe("tls", () => {
  const cert = selfSigned();
  const skip = cert === undefined ? "openssl is needed to make a test certificate" : false;

  it("talks to the broker through a TLS proxy with a custom CA and a bearer token", { skip }, async () => {
    const proxy = await TlsProxy.start(stack.address, cert!, "s3cret");
    const tls = new LanewayClient(proxy.address, { tls: { ca: cert!.cert }, metadata: { authorization: "Bearer s3cret" } });
    const noToken = new LanewayClient(proxy.address, { tls: { ca: cert!.cert } });
    const untrusted = new LanewayClient(proxy.address, { tls: true, timeoutMs: 5_000 });
    try {
      assert.deepEqual((await tls.getServerInfo()).routes, ["chat", "stream", "doomed", "slow"]);
      const { jobId } = await tls.submit({ route: "chat", input: chat("over tls") });
      const events = await collect(tls.stream([jobId]));
      assertSeqs(events);
      assert.equal(chatText(events.at(-1)!), "over tls");
      // Error details travel in trailers: still decoded through the proxy.
      const err = await refused(InvalidArgument, () => tls.submit({ route: "nope", input: chat("x") }));
      assert.equal(err.reason, "UNKNOWN_ROUTE");
      assert.equal(err.field, "job.route");
      // Per-call metadata overrides the client's.
      await refused(Unauthenticated, () => tls.getStats({ metadata: { authorization: "Bearer wrong" } }));
      const denied = await refused(Unauthenticated, () => noToken.getServerInfo());
      assert.equal(denied.reason, "", "a status without ErrorInfo has no reason");
      // A self-signed certificate is not trusted by the system's CAs: not retryable
      // (Connect reports a failed TLS handshake as INTERNAL, so streams do not resume it).
      const bad = await refused(InternalError, () => untrusted.getServerInfo());
      assert.match(bad.message, /certificate/);
    } finally {
      tls.close();
      noToken.close();
      untrusted.close();
      await proxy.stop();
    }
  });
});
