// The options and results of LanewayClient's pipeline methods (docs/pipelines.md):
// startPipeline, getPipelineRun, streamPipelineRun, cancelPipelineRun,
// resumePipelineRun, listPipelineRuns and pipelineRuns.
import type { CallOptions } from "./client.js";
import type { LanewayError } from "./errors.js";

export interface StartPipelineOptions extends CallOptions {
  /** A second start with the same key (and pipeline) answers with the same run and
   * `duplicate: true`; the same key with another input throws AlreadyExists
   * (IDEMPOTENCY_KEY_REUSED). */
  idempotencyKey?: string;
}

export interface PipelineStarted {
  runId: string;
  /** True when the idempotency key was seen before: runId is the original run. */
  duplicate: boolean;
}

export interface StreamPipelineRunOptions extends CallOptions {
  /** Only the run's entries after this seq (0: from its start). */
  resumeAfter?: bigint | number;
  /** How long to keep resuming a broken stream, from the break (default: the client's `resumeForMs`). */
  resumeForMs?: number;
  /** Called each time a broken stream is about to be opened again (for logging), with
   * the error and the number of tries in a row so far. */
  onResume?: (error: LanewayError, attempt: number) => void;
}

export interface ListPipelineRunsOptions extends CallOptions {
  /** Only runs of this pipeline ("" or unset: every pipeline). */
  pipeline?: string;
  /** 0 for the broker's default (50); more than 1,000 is taken as 1,000. */
  pageSize?: number;
  pageToken?: string;
}
