#!/usr/bin/env node
// Laneway from Node.js: submit one chat job, follow its events, then read it back.
// The client is built at runtime from the .proto files; there is no generated code.
//
//   node example.js [--addr 127.0.0.1:50051] [--route chat] [--text hello] [--lane LANE_HIGH]
//                   [--resume-timeout-s 300]
//
// A stream broken by a broker restart is resumed after the last event seen, for up to
// --resume-timeout-s seconds from the break (as the Python client does), so the job's
// events are each printed once even across an outage.
//
// Exit status: 0 when the job SUCCEEDED, 1 when it ended FAILED/CANCELLED/EXPIRED
// (or the stream ended early), 2 on a gRPC or usage error.
'use strict';

const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { parseArgs, promisify } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
const CALL_TIMEOUT_MS = 10_000;
const FAILED_STATES = new Set(['JOB_STATE_FAILED', 'JOB_STATE_CANCELLED', 'JOB_STATE_EXPIRED']);
// The broker went away (UNAVAILABLE) or stopped before it took the call (CANCELLED).
const RESUMABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.CANCELLED]);
// Reconnect soon after a broker restart: grpc-js's default backoff grows to two minutes.
const CHANNEL_OPTIONS = { 'grpc.initial_reconnect_backoff_ms': 100, 'grpc.max_reconnect_backoff_ms': 2000 };

function loadBrokerService() {
  const definition = protoLoader.loadSync(path.join(PROTO_DIR, 'laneway', 'v1', 'broker_service.proto'), {
    includeDirs: [PROTO_DIR], // resolves "laneway/v1/job.proto"
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const lanes = definition['laneway.v1.Lane'].type.value.map((v) => v.name);
  return { BrokerService: grpc.loadPackageDefinition(definition).laneway.v1.BrokerService, lanes };
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? 'UNKNOWN';
}

const deadline = () => ({ deadline: Date.now() + CALL_TIMEOUT_MS });

// A job's events until the final one. A broken stream is opened again after the last
// seq seen, with a doubling delay, until resumeTimeoutMs have passed since it broke.
async function* follow(client, jobId, resumeTimeoutMs) {
  let lastSeq = 0;
  let brokenAt = null;
  let failures = 0;
  for (;;) {
    const request = { job_ids: [jobId], resume_after: lastSeq ? { [jobId]: String(lastSeq) } : {} };
    try {
      for await (const { event } of client.StreamResults(request)) {
        brokenAt = null;
        failures = 0;
        if (Number(event.seq) <= lastSeq) continue; // already printed
        lastSeq = Number(event.seq);
        yield event;
      }
      return; // the server ends the stream once the job is final
    } catch (err) {
      if (!RESUMABLE.has(err.code)) throw err;
      const now = Date.now();
      brokenAt ??= now;
      failures += 1;
      const left = brokenAt + resumeTimeoutMs - now;
      if (left <= 0) throw err;
      await sleep(Math.min(2000, 100 * 2 ** (failures - 1), left));
    }
  }
}

async function run({ addr, route, text, lane, 'resume-timeout-s': resumeTimeoutS }) {
  const { BrokerService, lanes } = loadBrokerService();
  if (!lanes.includes(lane)) {
    throw new Error(`--lane must be one of ${lanes.join(', ')}, got ${JSON.stringify(lane)}`);
  }
  const resumeTimeoutMs = Number(resumeTimeoutS) * 1000;
  if (!(resumeTimeoutMs >= 0)) {
    throw new Error(`--resume-timeout-s must be a number of seconds, got ${JSON.stringify(resumeTimeoutS)}`);
  }
  const client = new BrokerService(addr, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  const submit = promisify(client.Submit.bind(client));
  const getJob = promisify(client.GetJob.bind(client));
  try {
    const { job_id: jobId } = await submit(
      { job: { route, lane, chat: { messages: [{ role: 'CHAT_ROLE_USER', content: text }] } } },
      deadline(),
    );
    console.log(`submitted job_id=${jobId}`);

    // The server ends the stream once the job has reached a final state.
    let finalState = null;
    for await (const event of follow(client, jobId, resumeTimeoutMs)) {
      const line = { seq: Number(event.seq), state: event.state, job_id: event.job_id };
      if (event.payload === 'result') line.result = event.result.chat?.text ?? null;
      if (event.payload === 'error') line.error = { code: event.error.code, message: event.error.message };
      console.log(JSON.stringify(line));
      if (event.state === 'JOB_STATE_SUCCEEDED' || FAILED_STATES.has(event.state)) finalState = event.state;
    }

    const { job } = await getJob({ job_id: jobId }, deadline());
    console.log(`get_job state=${job.state} seq=${job.seq}`);

    if (finalState === null) {
      console.error('stream ended before the job reached a final state');
      return 1;
    }
    return finalState === 'JOB_STATE_SUCCEEDED' ? 0 : 1;
  } finally {
    client.close();
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      addr: { type: 'string', default: '127.0.0.1:50051' },
      route: { type: 'string', default: 'chat' },
      text: { type: 'string', default: 'hello' },
      lane: { type: 'string', default: 'LANE_HIGH' },
      'resume-timeout-s': { type: 'string', default: '300' },
    },
  });
  return run(values);
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (typeof err.code === 'number' && 'details' in err) {
      console.error(`gRPC error: ${statusName(err.code)} (code ${err.code}): ${err.details}`);
    } else {
      console.error(`error: ${err.message}`);
    }
    process.exitCode = 2;
  },
);
