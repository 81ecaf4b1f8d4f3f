// @laneway/client against a broker that serves TLS itself (broker.tls), one-way and
// mutual: tests/ts_stack.py with LANEWAY_TS_TLS, certificates from tests/certs.py.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import { JobState, LanewayClient, LanewayError, Unavailable, chat, type JobEvent } from "../src/index.js";
import { Stack, type StackTls } from "./stack.js";

async function collect(events: AsyncIterable<JobEvent>): Promise<JobEvent[]> {
  const out: JobEvent[] = [];
  for await (const e of events) out.push(e);
  return out;
}

async function fails(fn: () => Promise<unknown>): Promise<LanewayError> {
  try {
    await fn();
  } catch (err) {
    assert.ok(err instanceof LanewayError, `expected a LanewayError, got ${String(err)}`);
    return err;
  }
  assert.fail("the call succeeded");
}

function pem(tls: StackTls): { ca: Buffer; cert: Buffer; key: Buffer } {
  return { ca: readFileSync(tls.ca), cert: readFileSync(tls.clientCert), key: readFileSync(tls.clientKey) };
}

async function roundTrip(client: LanewayClient, text: string): Promise<void> {
  const { jobId } = await client.submit({ route: "chat", input: chat(text) });
  const events = await collect(client.stream([jobId]));
  const last = events.at(-1)!;
  assert.equal(last.state, JobState.SUCCEEDED);
  assert.ok(last.payload.case === "result" && last.payload.value.output.case === "chat");
  assert.equal(last.payload.value.output.value.text, text);
}

describe("a TLS broker", () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ LANEWAY_TS_TLS: "tls" });
  });
  after(async () => {
    await stack?.stop();
  });

  it("serves a client that trusts its CA, by IP address and by name", async () => {
    const { ca } = pem(stack.tls!);
    const port = stack.address.split(":").at(-1)!;
    for (const address of [stack.address, `localhost:${port}`]) {
      const client = new LanewayClient(address, { tls: { ca }, timeoutMs: 10_000 });
      try {
        await roundTrip(client, `over tls to ${address}`);
      } finally {
        client.close();
      }
    }
  });

  it("refuses a plaintext client and one that does not trust its certificate", async () => {
    const plain = new LanewayClient(stack.address, { timeoutMs: 5_000, resumeForMs: 0 });
    const untrusted = new LanewayClient(stack.address, { tls: true, timeoutMs: 5_000, resumeForMs: 0 });
    try {
      const refused = await fails(() => plain.getServerInfo());
      assert.ok(refused instanceof Unavailable, `${refused.name}: ${refused.message}`);
      assert.match(refused.message, /may require TLS.*tls: \{ ca \}/);
      // A stream too (resumeForMs: 0, so it gives up at once).
      const stream = await fails(() => collect(plain.stream(["01J0000000000000000000000Z"])));
      assert.match(stream.message, /may require TLS/);
      const bad = await fails(() => untrusted.getServerInfo());
      assert.match(bad.message, /certificate/);
    } finally {
      plain.close();
      untrusted.close();
    }
  });
});

describe("a broker that requires client certificates (mTLS)", () => {
  let stack: Stack;
  before(async () => {
    stack = await Stack.start({ LANEWAY_TS_TLS: "mtls" });
  });
  after(async () => {
    await stack?.stop();
  });

  it("serves a client with a certificate its CA signed and refuses one without", async () => {
    const { ca, cert, key } = pem(stack.tls!);
    const mutual = new LanewayClient(stack.address, { tls: { ca, cert, key }, timeoutMs: 10_000 });
    const noCert = new LanewayClient(stack.address, { tls: { ca }, timeoutMs: 5_000, resumeForMs: 0 });
    try {
      await roundTrip(mutual, "mutual tls");
      const refused = await fails(() => noCert.getServerInfo());
      assert.ok(refused instanceof Unavailable, `${refused.name}: ${refused.message}`);
      assert.match(refused.message, /may require a client certificate/);
    } finally {
      mutual.close();
      noCert.close();
    }
  });
});
