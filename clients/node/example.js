#!/usr/bin/env node
// Laneway from Node.js: submit one chat job, follow its events, then read it back.
// The client is built at runtime from the .proto files; there is no generated code.
//
//   node example.js [--addr 127.0.0.1:50051] [--route chat] [--text hello] [--lane LANE_HIGH]
//
// Exit status: 0 when the job SUCCEEDED, 1 when it ended FAILED/CANCELLED/EXPIRED
// (or the stream ended early), 2 on a gRPC or usage error.
'use strict';

const path = require('node:path');
const { parseArgs, promisify } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
const CALL_TIMEOUT_MS = 10_000;
const FAILED_STATES = new Set(['JOB_STATE_FAILED', 'JOB_STATE_CANCELLED', 'JOB_STATE_EXPIRED']);

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

async function run({ addr, route, text, lane }) {
  const { BrokerService, lanes } = loadBrokerService();
  if (!lanes.includes(lane)) {
    throw new Error(`--lane must be one of ${lanes.join(', ')}, got ${JSON.stringify(lane)}`);
  }
  const client = new BrokerService(addr, grpc.credentials.createInsecure());
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
    for await (const { event } of client.StreamResults({ job_ids: [jobId] })) {
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
