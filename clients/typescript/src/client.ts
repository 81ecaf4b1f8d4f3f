// LanewayClient: every BrokerService RPC over plain gRPC (HTTP/2), typed with the
// generated protobuf-es messages; errors thrown as LanewayError subclasses.
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type * as http2 from "node:http2";
import {
  BrokerService,
  type CancelJobResponse,
  type ListDeadLettersResponse,
  OnDisconnect,
  type ListDeadLettersRequestSchema,
  type RedriveDeadLettersRequestSchema,
} from "./gen/laneway/v1/broker_service_pb.js";
import type { DeadLetter, DeadLetterFilterSchema } from "./gen/laneway/v1/dead_letter_pb.js";
import { JobSchema, type Job, type JobEvent } from "./gen/laneway/v1/job_pb.js";
import type { GetStatsResponse, GetServerInfoResponse, ProviderHealth } from "./gen/laneway/v1/ops_pb.js";
import {
  type CancelPipelineRunResponse,
  type ListPipelineRunsResponse,
  type PipelineRun,
  PipelineRunSchema,
  type PipelineRunEvent,
  type ResumePipelineRunResponse,
} from "./gen/laneway/v1/pipeline_pb.js";
import { LanewayError, Unavailable, fromBatchItemError, toLanewayError } from "./errors.js";
import type { JobSpecInit } from "./inputs.js";
import type { ListPipelineRunsOptions, PipelineStarted, StartPipelineOptions, StreamPipelineRunOptions } from "./pipelines.js";
import { resumable, resuming } from "./resume.js";
import { isFinal } from "./states.js";
import { explainTransportErrors } from "./transport_errors.js";

/** Client certificates and trust roots for TLS (PEM strings or Buffers). */
export interface TlsOptions {
  /** Trust these CAs instead of the system's. */
  ca?: string | Buffer | Array<string | Buffer>;
  /** Client certificate chain, for mutual TLS. */
  cert?: string | Buffer;
  /** Client private key, for mutual TLS. */
  key?: string | Buffer;
  /** Server name to verify (SNI), when it differs from the address's host. */
  servername?: string;
}

export interface ClientOptions {
  /** `true` for TLS with the system's CAs, an object for your own CA or mutual TLS;
   * unset or `false`: plaintext (an `https://` address also turns TLS on). */
  tls?: boolean | TlsOptions;
  /** gRPC metadata sent with every call (e.g. `{ authorization: "Bearer ..." }`). */
  metadata?: Record<string, string>;
  /** API key, sent as `authorization: Bearer <key>` on every call: over TLS, or in
   * plaintext only to a loopback address (127.0.0.1, ::1, localhost); any other
   * plaintext address throws (a key must not cross a network in clear). */
  apiKey?: string;
  /** Default deadline of unary calls, in milliseconds (default 30,000; 0 or Infinity:
   * none). Streams have none unless a call passes its own `timeoutMs`. */
  timeoutMs?: number;
  /** How long `stream`, `run` and `wait` keep resuming a broken stream, counted from
   * the break, in milliseconds (default 300,000). */
  resumeForMs?: number;
  /** Connect interceptors, e.g. for logging or tracing headers. */
  interceptors?: Interceptor[];
  /** HTTP/2 keepalive ping interval in milliseconds (default: Connect's, no pings while idle).
   * The broker accepts pings down to one per 10,000 ms; more often, it closes the
   * connection (GOAWAY "too_many_pings"). */
  pingIntervalMs?: number;
}

/** Options every method takes. */
export interface CallOptions {
  /** Deadline of this call in milliseconds (unary calls default to the client's
   * `timeoutMs`; 0 or Infinity: none). Past it the call throws `DeadlineExceeded`. */
  timeoutMs?: number;
  /** Extra gRPC metadata for this call, merged over the client's. */
  metadata?: Record<string, string>;
  /** Abort the call (it then throws `Cancelled`). */
  signal?: AbortSignal;
}

export interface StreamOptions extends CallOptions {
  /** Resume point per job id: only events with a greater seq are sent. */
  resumeAfter?: Record<string, bigint | number>;
  /** Only each job's final event. */
  finalOnly?: boolean;
  /** How long to keep resuming a broken stream, from the break (default: the client's `resumeForMs`). */
  resumeForMs?: number;
  /** Called each time a broken stream is about to be opened again (for logging), with
   * the error and the number of tries in a row so far. */
  onResume?: (error: LanewayError, attempt: number) => void;
}

export interface RunOptions extends CallOptions {
  /** Only the final event. */
  finalOnly?: boolean;
  /** What the broker does with the job if this call goes away before the final event
   * (default CONTINUE: the job runs on). */
  onDisconnect?: OnDisconnect;
  /** As in StreamOptions: for resuming once the job id is known. */
  resumeForMs?: number;
  onResume?: (error: LanewayError, attempt: number) => void;
}

/** One event of `run`: `duplicate` is true when the idempotency key was seen before
 * (the events are the original job's). */
export interface RunEvent {
  event: JobEvent;
  duplicate: boolean;
}

export interface Submitted {
  jobId: string;
  /** True when the idempotency key was seen before: jobId is the original job. */
  duplicate: boolean;
}

/** One job's outcome in `submitBatch`, in request order. */
export type BatchOutcome =
  | { ok: true; jobId: string; duplicate: boolean; error?: undefined }
  | { ok: false; jobId?: undefined; duplicate: false; error: LanewayError };

/** One dead letter's outcome in `redriveDeadLetters`. */
export type RedriveOutcome =
  | { ok: true; jobId: string; newJobId: string; pipelineRunId: string; error?: undefined }
  | { ok: false; jobId: string; newJobId?: undefined; error: LanewayError };

export type DeadLetterFilterInit = MessageInitShape<typeof DeadLetterFilterSchema>;
export type RedriveInit = MessageInitShape<typeof RedriveDeadLettersRequestSchema>;

export interface ListDeadLettersOptions extends CallOptions {
  filter?: DeadLetterFilterInit;
  /** 0 for the broker's default (50); capped at the broker's max page size. */
  pageSize?: number;
  pageToken?: string;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_RESUME_FOR_MS = 300_000;

/** `"host:port"`, `"http://host:port"` or `"https://host:port"` as a base URL. */
/** Whether a base URL names this machine only (a loopback address or localhost). */
function isLoopback(url: string): boolean {
  const host = new URL(url).hostname.replace(/^\[|\]$/g, "").toLowerCase();
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

function baseUrl(address: string, tls: boolean): string {
  if (/^https?:\/\//.test(address)) {
    return tls ? address.replace(/^http:/, "https:") : address;
  }
  return `${tls ? "https" : "http"}://${address}`;
}

/** A timeoutMs as a deadline length: undefined (none) for undefined, 0 and Infinity. */
function finite(timeoutMs: number | undefined): number | undefined {
  return timeoutMs === undefined || timeoutMs === 0 || !Number.isFinite(timeoutMs) ? undefined : timeoutMs;
}

/**
 * A Laneway broker client. One HTTP/2 connection, opened on the first call and
 * re-opened as needed (a broker restart is transparent to the next call);
 * `close()` ends it.
 *
 * 64-bit fields (`JobEvent.seq`, `Job.lastSeq`, counters in stats) are `bigint`:
 * exact, never a Long object or a string.
 */
export class LanewayClient {
  /** The generated Connect client, for anything this class does not wrap. */
  readonly raw: Client<typeof BrokerService>;
  /** The gRPC transport (for lower-level calls). */
  readonly transport: Transport;
  readonly address: string;
  private readonly sessions: Http2SessionManager;
  private readonly metadata: Record<string, string>;
  private readonly timeoutMs: number;
  private readonly resumeForMs: number;

  constructor(address: string, options: ClientOptions = {}) {
    const tlsOpts = typeof options.tls === "object" ? options.tls : undefined;
    const useTls = options.tls === true || tlsOpts !== undefined || address.startsWith("https://");
    const url = baseUrl(address, useTls);
    this.address = address;
    const nodeOptions: http2.SecureClientSessionOptions = {};
    if (tlsOpts) {
      if (tlsOpts.ca !== undefined) nodeOptions.ca = tlsOpts.ca;
      if (tlsOpts.cert !== undefined) nodeOptions.cert = tlsOpts.cert;
      if (tlsOpts.key !== undefined) nodeOptions.key = tlsOpts.key;
      if (tlsOpts.servername !== undefined) nodeOptions.servername = tlsOpts.servername;
    }
    const ping = options.pingIntervalMs !== undefined ? { pingIntervalMs: options.pingIntervalMs } : {};
    this.sessions = new Http2SessionManager(url, ping, nodeOptions);
    this.transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: this.sessions,
      // Ours innermost, so the caller's interceptors see the explained error too.
      interceptors: [...(options.interceptors ?? []), explainTransportErrors(useTls, tlsOpts?.cert !== undefined)],
    });
    this.raw = createClient(BrokerService, this.transport);
    this.metadata = { ...(options.metadata ?? {}) };
    if (options.apiKey) {
      if (!useTls && !isLoopback(url)) {
        throw new Error(
          `apiKey is sent only over TLS (tls: true or { ca }) or in plaintext to a loopback ` +
            `address (127.0.0.1, ::1, localhost); ${address} is neither`,
        );
      }
      this.metadata.authorization = `Bearer ${options.apiKey}`;
    }
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.resumeForMs = options.resumeForMs ?? DEFAULT_RESUME_FOR_MS;
  }

  /** Close the connection; calls in flight fail with `Unavailable`/`Cancelled`. */
  close(): void {
    this.sessions.abort();
  }

  private unaryOptions(opts: CallOptions = {}): { timeoutMs?: number; headers: Record<string, string>; signal?: AbortSignal } {
    return this.streamOptions(opts, finite(opts.timeoutMs ?? this.timeoutMs));
  }

  private streamOptions(opts: CallOptions, timeoutMs: number | undefined): { timeoutMs?: number; headers: Record<string, string>; signal?: AbortSignal } {
    const o: { timeoutMs?: number; headers: Record<string, string>; signal?: AbortSignal } = {
      headers: { ...this.metadata, ...(opts.metadata ?? {}) },
    };
    const t = finite(timeoutMs);
    if (t !== undefined) o.timeoutMs = Math.max(t, 0.001); // Connect: <= 0 is "already expired"
    if (opts.signal) o.signal = opts.signal;
    return o;
  }

  private async call<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw toLanewayError(err);
    }
  }

  /** Enqueue one job; resolves once it is durably stored. */
  submit(job: JobSpecInit, opts?: CallOptions): Promise<Submitted> {
    return this.call(async () => {
      const res = await this.raw.submit({ job }, this.unaryOptions(opts));
      return { jobId: res.jobId, duplicate: res.duplicate };
    });
  }

  /** Enqueue many jobs in one call (at most GetServerInfo's `limits.maxBatchJobs`); one
   * outcome per job, in request order: a job id or the error Submit would have thrown. */
  submitBatch(jobs: JobSpecInit[], opts?: CallOptions): Promise<BatchOutcome[]> {
    return this.call(async () => {
      const res = await this.raw.submitBatch({ jobs }, this.unaryOptions(opts));
      return res.outcomes.map((o): BatchOutcome => {
        if (o.outcome.case === "error") return { ok: false, duplicate: false, error: fromBatchItemError(o.outcome.value) };
        return { ok: true, jobId: o.outcome.value ?? "", duplicate: o.duplicate };
      });
    });
  }

  /**
   * StreamResults as is: one call, no resume. The events of `jobIds` from the first
   * (or after `resumeAfter[jobId]`) until every job is final. Prefer `stream`.
   */
  async *streamResults(jobIds: string[], opts: StreamOptions = {}): AsyncGenerator<JobEvent, void, undefined> {
    const resumeAfter: Record<string, bigint> = {};
    for (const [id, seq] of Object.entries(opts.resumeAfter ?? {})) resumeAfter[id] = BigInt(seq);
    try {
      const call = this.raw.streamResults(
        { jobIds, resumeAfter, finalOnly: opts.finalOnly ?? false },
        this.streamOptions(opts, opts.timeoutMs),
      );
      for await (const res of call) {
        if (res.event) yield res.event;
      }
    } catch (err) {
      throw toLanewayError(err);
    }
  }

  /**
   * The events of `jobIds` until every one is final, each exactly once, in seq order
   * per job. A stream broken by a broker restart or a lost connection (UNAVAILABLE)
   * is opened again with `resume_after` = the last seq seen per job, with a doubling
   * delay (0.1 s to 2 s), for up to `resumeForMs` from the break; then the last error
   * is thrown. `timeoutMs`, when given, bounds the whole stream.
   */
  async *stream(jobIds: string[], opts: StreamOptions = {}): AsyncGenerator<JobEvent, void, undefined> {
    const ids = [...new Set(jobIds)];
    const last = new Map<string, bigint>();
    for (const [id, seq] of Object.entries(opts.resumeAfter ?? {})) last.set(id, BigInt(seq));
    const open = new Set(ids);
    if (open.size === 0) return;
    const responses = resuming(
      (timeoutMs) => {
        const pending = ids.filter((id) => open.has(id));
        const resumeAfter: Record<string, bigint> = {};
        for (const id of pending) {
          const seq = last.get(id);
          if (seq !== undefined) resumeAfter[id] = seq;
        }
        return this.raw.streamResults(
          { jobIds: pending, resumeAfter, finalOnly: opts.finalOnly ?? false },
          this.streamOptions(opts, timeoutMs),
        );
      },
      {
        ...this.resumeSettings(opts),
        ended: () => open.size === 0,
        endedEarly: "the stream ended before every job was final",
      },
    );
    for await (const res of responses) {
      const event = res.event;
      if (!event) continue;
      if (event.seq <= (last.get(event.jobId) ?? 0n)) continue; // seen before a resume
      last.set(event.jobId, event.seq);
      if (isFinal(event.state)) open.delete(event.jobId);
      yield event;
    }
  }

  private resumeSettings(opts: StreamOptions | StreamPipelineRunOptions): {
    resumeForMs: number;
    timeoutMs: number | undefined;
    signal: AbortSignal | undefined;
    onResume: ((error: LanewayError, attempt: number) => void) | undefined;
  } {
    return {
      resumeForMs: opts.resumeForMs ?? this.resumeForMs,
      timeoutMs: finite(opts.timeoutMs),
      signal: opts.signal,
      onResume: opts.onResume,
    };
  }

  /** Wait for a job to finish: its final event (streamed with finalOnly, resumed across restarts). */
  async wait(jobId: string, opts: Omit<StreamOptions, "finalOnly"> = {}): Promise<JobEvent> {
    let final: JobEvent | undefined;
    for await (const event of this.stream([jobId], { ...opts, finalOnly: true })) final = event;
    if (!final) throw new Unavailable(Code.Unavailable, `the stream of ${jobId} ended without a final event`);
    return final;
  }

  /**
   * Submit one job and stream its events until the final one, in one call. Once the
   * first event has arrived (it carries the job id), a broken stream is resumed with
   * StreamResults like `stream` does; a break before that is thrown (the job may or
   * may not have been stored: retry with an idempotency key).
   */
  async *run(job: JobSpecInit, opts: RunOptions = {}): AsyncGenerator<RunEvent, void, undefined> {
    let jobId: string | undefined;
    let lastSeq = 0n;
    let duplicate = false;
    const finalOnly = opts.finalOnly ?? false;
    const timeoutMs = finite(opts.timeoutMs);
    const deadline = timeoutMs !== undefined ? Date.now() + timeoutMs : undefined;
    try {
      const call = this.raw.run(
        { job, finalOnly, onDisconnect: opts.onDisconnect ?? OnDisconnect.UNSPECIFIED },
        this.streamOptions(opts, timeoutMs),
      );
      for await (const res of call) {
        if (!res.event) continue;
        jobId = res.event.jobId;
        duplicate = res.duplicate;
        lastSeq = res.event.seq;
        yield { event: res.event, duplicate };
        if (isFinal(res.event.state)) return;
      }
      // The call ended before the final event (it should not): follow the job instead.
      if (jobId === undefined) throw new Unavailable(Code.Unavailable, "Run ended without any event");
    } catch (err) {
      const failure = toLanewayError(err);
      if (jobId === undefined || !resumable(failure, opts.signal)) throw failure;
      opts.onResume?.(failure, 0);
    }
    const rest: StreamOptions = { ...opts, finalOnly, resumeAfter: { [jobId]: lastSeq } };
    if (deadline !== undefined) rest.timeoutMs = Math.max(0.001, deadline - Date.now());
    for await (const event of this.stream([jobId], rest)) yield { event, duplicate };
  }

  /** The job as it stands (state, attempt, text so far, result or error, lastSeq). */
  getJob(jobId: string, opts?: CallOptions): Promise<Job> {
    return this.call(async () => {
      const res = await this.raw.getJob({ jobId }, this.unaryOptions(opts));
      return res.job ?? create(JobSchema);
    });
  }

  /** Cancel a job that has not finished. Idempotent: the state after the call, and
   * whether this call cancelled it. */
  cancelJob(jobId: string, reason = "", opts?: CallOptions): Promise<CancelJobResponse> {
    return this.call(() => this.raw.cancelJob({ jobId, reason }, this.unaryOptions(opts)));
  }

  /** One page of dead letters, oldest first. */
  listDeadLetters(opts: ListDeadLettersOptions = {}): Promise<ListDeadLettersResponse> {
    const req: MessageInitShape<typeof ListDeadLettersRequestSchema> = {
      pageSize: opts.pageSize ?? 0,
      pageToken: opts.pageToken ?? "",
    };
    if (opts.filter) req.filter = opts.filter;
    return this.call(() => this.raw.listDeadLetters(req, this.unaryOptions(opts)));
  }

  /** Every dead letter matching `filter`, page after page. */
  async *deadLetters(opts: Omit<ListDeadLettersOptions, "pageToken"> = {}): AsyncGenerator<DeadLetter, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.listDeadLetters({ ...opts, pageToken });
      yield* page.deadLetters;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Submit dead letters again as new jobs (a filter or `all: true` is required). */
  redriveDeadLetters(request: RedriveInit, opts?: CallOptions): Promise<RedriveOutcome[]> {
    return this.call(async () => {
      const res = await this.raw.redriveDeadLetters(request, this.unaryOptions(opts));
      return res.redriven.map((r): RedriveOutcome => {
        if (r.outcome.case === "error") return { ok: false, jobId: r.jobId, error: fromBatchItemError(r.outcome.value) };
        return { ok: true, jobId: r.jobId, newJobId: r.outcome.value ?? "", pipelineRunId: r.pipelineRunId };
      });
    });
  }

  /** Start a run of a pipeline of the broker's config with `input` as its text;
   * resolves once the run is stored. An unknown pipeline throws InvalidArgument
   * (UNKNOWN_PIPELINE, field "pipeline"). */
  startPipeline(pipeline: string, input: string, opts: StartPipelineOptions = {}): Promise<PipelineStarted> {
    return this.call(async () => {
      const req = { pipeline, input, idempotencyKey: opts.idempotencyKey ?? "" };
      const res = await this.raw.startPipeline(req, this.unaryOptions(opts));
      return { runId: res.runId, duplicate: res.duplicate };
    });
  }

  /** The run as it stands: its state and error, each step's state, times and jobs.
   * An unknown run throws NotFound (UNKNOWN_PIPELINE_RUN). */
  getPipelineRun(runId: string, opts?: CallOptions): Promise<PipelineRun> {
    return this.call(async () => {
      const res = await this.raw.getPipelineRun({ runId }, this.unaryOptions(opts));
      return res.run ?? create(PipelineRunSchema);
    });
  }

  /**
   * The run's log from its start (or after `resumeAfter`) until the run ends: every
   * step's start and end and every job's final state, each entry once in `seq` order.
   * A stream broken by a broker restart or a lost connection is opened again after the
   * last `seq` seen, as `stream` does, for up to `resumeForMs` from the break.
   */
  async *streamPipelineRun(runId: string, opts: StreamPipelineRunOptions = {}): AsyncGenerator<PipelineRunEvent, void, undefined> {
    let last = BigInt(opts.resumeAfter ?? 0);
    const responses = resuming(
      (timeoutMs) => this.raw.streamPipelineRun({ runId, resumeAfter: last }, this.streamOptions(opts, timeoutMs)),
      // The broker ends the stream only once the stored log ends with the run's end.
      { ...this.resumeSettings(opts), ended: () => true, endedEarly: "" },
    );
    for await (const res of responses) {
      const event = res.event;
      if (!event || event.seq <= last) continue; // seen before a resume
      last = event.seq;
      yield event;
    }
  }

  /** End a run CANCELLED (idempotent; `reason` becomes its error): the state after the
   * call, and whether this call cancelled it. Its jobs still going are cancelled. */
  cancelPipelineRun(runId: string, reason = "", opts?: CallOptions): Promise<CancelPipelineRunResponse> {
    return this.call(() => this.raw.cancelPipelineRun({ runId, reason }, this.unaryOptions(opts)));
  }

  /** Redrive a run that failed at a step: its failed items run again as new jobs and the
   * run goes on (finished steps are not redone). The state after the call, and whether
   * this call resumed it. */
  resumePipelineRun(runId: string, reason = "", opts?: CallOptions): Promise<ResumePipelineRunResponse> {
    return this.call(() => this.raw.resumePipelineRun({ runId, reason }, this.unaryOptions(opts)));
  }

  /** One page of pipeline runs, oldest first (of `pipeline` only, when given). */
  listPipelineRuns(opts: ListPipelineRunsOptions = {}): Promise<ListPipelineRunsResponse> {
    const req = { pipeline: opts.pipeline ?? "", pageSize: opts.pageSize ?? 0, pageToken: opts.pageToken ?? "" };
    return this.call(() => this.raw.listPipelineRuns(req, this.unaryOptions(opts)));
  }

  /** Every pipeline run (of `pipeline` only, when given), page after page. */
  async *pipelineRuns(opts: Omit<ListPipelineRunsOptions, "pageToken"> = {}): AsyncGenerator<PipelineRun, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.listPipelineRuns({ ...opts, pageToken });
      yield* page.runs;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Health of these providers (every configured one when empty), in config order. */
  getProviderHealth(providers: string[] = [], opts?: CallOptions): Promise<ProviderHealth[]> {
    return this.call(async () => (await this.raw.getProviderHealth({ providers }, this.unaryOptions(opts))).providers);
  }

  /** Per route and lane queue figures, plus provider health. */
  getStats(opts?: CallOptions): Promise<GetStatsResponse> {
    return this.call(() => this.raw.getStats({}, this.unaryOptions(opts)));
  }

  /** The broker's version, the limits in force, its routes and default lane. */
  getServerInfo(opts?: CallOptions): Promise<GetServerInfoResponse> {
    return this.call(() => this.raw.getServerInfo({}, this.unaryOptions(opts)));
  }
}
