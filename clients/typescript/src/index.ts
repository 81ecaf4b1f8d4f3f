// @laneway/client: a typed client for the Laneway broker (laneway.v1).
export {
  LanewayClient,
  type BatchOutcome,
  type CallOptions,
  type ClientOptions,
  type DeadLetterFilterInit,
  type ListDeadLettersOptions,
  type RedriveInit,
  type RedriveOutcome,
  type RunEvent,
  type RunOptions,
  type StreamOptions,
  type Submitted,
  type TlsOptions,
} from "./client.js";
export {
  Aborted,
  AlreadyExists,
  Cancelled,
  DeadlineExceeded,
  ERROR_DOMAIN,
  FailedPrecondition,
  InternalError,
  InvalidArgument,
  LanewayError,
  type LanewayErrorInit,
  NotFound,
  PermissionDenied,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
  codeName,
  errorClassFor,
  fromBatchItemError,
  reasonName,
  reasonValue,
  toLanewayError,
} from "./errors.js";
export type { ListPipelineRunsOptions, PipelineStarted, StartPipelineOptions, StreamPipelineRunOptions } from "./pipelines.js";
export { chat, classification, embedding, type ChatMessageInit, type ChatOptions, type GenerationParamsInit, type JobInput, type JobSpecInit } from "./inputs.js";
export { FINAL_STATES, isFinal, stateName } from "./states.js";
// The generated messages and enums (JobEvent, JobState, Lane, ErrorReason, ...).
export * from "./gen/laneway/v1/broker_service_pb.js";
export * from "./gen/laneway/v1/dead_letter_pb.js";
export * from "./gen/laneway/v1/errors_pb.js";
export * from "./gen/laneway/v1/job_pb.js";
export * from "./gen/laneway/v1/ops_pb.js";
export * from "./gen/laneway/v1/pipeline_pb.js";
