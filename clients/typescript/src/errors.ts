// Typed errors: every failed call throws a LanewayError subclass chosen by the gRPC
// status code, with the broker's google.rpc details decoded (errors.proto):
// ErrorInfo (reason, metadata), BadRequest (field), RetryInfo (delay), ResourceInfo.
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  ResourceInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import type { BatchItemError } from "./gen/laneway/v1/broker_service_pb.js";
import { ErrorReason } from "./gen/laneway/v1/errors_pb.js";

/** The ErrorInfo domain of every error the broker sends. */
export const ERROR_DOMAIN = "laneway.v1";

/** gRPC status code names, indexed by code (google.rpc.Code). */
const CODE_NAMES: Record<number, string> = {
  0: "OK",
  1: "CANCELLED",
  2: "UNKNOWN",
  3: "INVALID_ARGUMENT",
  4: "DEADLINE_EXCEEDED",
  5: "NOT_FOUND",
  6: "ALREADY_EXISTS",
  7: "PERMISSION_DENIED",
  8: "RESOURCE_EXHAUSTED",
  9: "FAILED_PRECONDITION",
  10: "ABORTED",
  11: "OUT_OF_RANGE",
  12: "UNIMPLEMENTED",
  13: "INTERNAL",
  14: "UNAVAILABLE",
  15: "DATA_LOSS",
  16: "UNAUTHENTICATED",
};

/** The name of a gRPC status code, e.g. `codeName(3)` is `"INVALID_ARGUMENT"`. */
export function codeName(code: number): string {
  return CODE_NAMES[code] ?? `CODE_${code}`;
}

/** A reason name (`"UNKNOWN_ROUTE"`) as its ErrorReason value; UNSPECIFIED when unknown. */
export function reasonValue(reason: string): ErrorReason {
  const value = (ErrorReason as unknown as Record<string, number | undefined>)[reason];
  return typeof value === "number" ? (value as ErrorReason) : ErrorReason.UNSPECIFIED;
}

/** An ErrorReason value as the name the broker sends in ErrorInfo.reason ("" for UNSPECIFIED). */
export function reasonName(reason: ErrorReason): string {
  if (reason === ErrorReason.UNSPECIFIED) return "";
  return ErrorReason[reason] ?? `ERROR_REASON_${reason}`;
}

export interface LanewayErrorInit {
  /** Request field at fault (BadRequest, or ErrorInfo.metadata.field). */
  field?: string;
  /** ErrorInfo.reason, e.g. "UNKNOWN_ROUTE"; "" when the status had no ErrorInfo. */
  reason?: string;
  /** ErrorInfo.metadata. */
  metadata?: Record<string, string>;
  /** RetryInfo.retry_delay, in milliseconds. */
  retryDelayMs?: number | undefined;
  /** ResourceInfo (NOT_FOUND): the missing resource. */
  resource?: { type: string; name: string } | undefined;
  cause?: unknown;
}

/**
 * A failed call (or a refused item of a batch or redrive): the gRPC status code and
 * the broker's reason. Catch a subclass (`InvalidArgument`, `NotFound`, ...) or
 * switch on `reason`.
 */
export class LanewayError extends Error {
  /** The gRPC status code (numeric, as google.rpc.Code and Connect's `Code`). */
  readonly code: number;
  /** The status message, without the code prefix. */
  readonly rawMessage: string;
  /** Request field at fault, e.g. "job.route" or "jobs[3].route"; "" when none is. */
  readonly field: string;
  /** Machine-readable reason: an ErrorReason name without its prefix, e.g. "UNKNOWN_ROUTE". */
  readonly reason: string;
  /** `reason` as the generated ErrorReason enum (UNSPECIFIED when none or unknown). */
  readonly reasonValue: ErrorReason;
  /** ErrorInfo.metadata: the values the reason documents (field, limit, route, job_id, ...). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Milliseconds to wait before retrying (RetryInfo), when the broker said. */
  readonly retryDelayMs: number | undefined;
  /** NOT_FOUND: the missing resource (ResourceInfo). */
  readonly resource: { type: string; name: string } | undefined;

  constructor(code: number, message: string, init: LanewayErrorInit = {}) {
    super(`${codeName(code)}: ${message}`, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.code = code;
    this.rawMessage = message;
    this.reason = init.reason ?? "";
    this.reasonValue = reasonValue(this.reason);
    this.metadata = Object.freeze({ ...(init.metadata ?? {}) });
    this.field = init.field || this.metadata["field"] || "";
    this.retryDelayMs = init.retryDelayMs;
    this.resource = init.resource;
  }

  /** The status code's name, e.g. "INVALID_ARGUMENT". */
  get codeName(): string {
    return codeName(this.code);
  }

  /** Whether sending the same request again is safe and may succeed (UNAVAILABLE, ABORTED). */
  get retryable(): boolean {
    return this.code === Code.Unavailable || this.code === Code.Aborted;
  }
}

/** INVALID_ARGUMENT: the request can never succeed as is (INVALID_FIELD, MALFORMED_REQUEST,
 * LIMIT_EXCEEDED, UNKNOWN_ROUTE, UNKNOWN_PROVIDER, UNKNOWN_PIPELINE). `field` names the field at fault. */
export class InvalidArgument extends LanewayError {}
/** NOT_FOUND (UNKNOWN_JOB, UNKNOWN_PIPELINE_RUN, UNKNOWN_WEBHOOK_DEAD_LETTER). */
export class NotFound extends LanewayError {}
/** ALREADY_EXISTS (IDEMPOTENCY_KEY_REUSED: metadata.job_id owns the key). */
export class AlreadyExists extends LanewayError {}
/** FAILED_PRECONDITION. */
export class FailedPrecondition extends LanewayError {}
/** ABORTED (CONTENDED): retry after `retryDelayMs`. */
export class Aborted extends LanewayError {}
/** RESOURCE_EXHAUSTED. */
export class ResourceExhausted extends LanewayError {}
/** UNAVAILABLE (NOT_ENQUEUED, NATS_UNAVAILABLE, SHUTTING_DOWN, NO_HEALTHY_TARGET, or no
 * broker reachable): retry. */
export class Unavailable extends LanewayError {}
/** DEADLINE_EXCEEDED: your timeoutMs passed, or ENQUEUE_OUTCOME_UNKNOWN (the job may run:
 * retry a submit only with the same idempotency key). */
export class DeadlineExceeded extends LanewayError {}
/** CANCELLED: the call was aborted (your AbortSignal) or the connection went away before
 * the broker took it. */
export class Cancelled extends LanewayError {}
/** UNAUTHENTICATED (from a proxy in front of the broker). */
export class Unauthenticated extends LanewayError {}
/** PERMISSION_DENIED (from a proxy in front of the broker). */
export class PermissionDenied extends LanewayError {}
/** INTERNAL, UNKNOWN and any other code. */
export class InternalError extends LanewayError {}

type ErrorClass = new (code: number, message: string, init?: LanewayErrorInit) => LanewayError;

const BY_CODE: Record<number, ErrorClass> = {
  [Code.InvalidArgument]: InvalidArgument,
  [Code.NotFound]: NotFound,
  [Code.AlreadyExists]: AlreadyExists,
  [Code.FailedPrecondition]: FailedPrecondition,
  [Code.Aborted]: Aborted,
  [Code.ResourceExhausted]: ResourceExhausted,
  [Code.Unavailable]: Unavailable,
  [Code.DeadlineExceeded]: DeadlineExceeded,
  [Code.Canceled]: Cancelled,
  [Code.Unauthenticated]: Unauthenticated,
  [Code.PermissionDenied]: PermissionDenied,
};

/** The error class for a gRPC status code (InternalError for the rest). */
export function errorClassFor(code: number): ErrorClass {
  return BY_CODE[code] ?? InternalError;
}

function durationMs(d: { seconds: bigint; nanos: number } | undefined): number | undefined {
  if (d === undefined) return undefined;
  return Number(d.seconds) * 1000 + Math.round(d.nanos / 1e6);
}

/**
 * Any error thrown by a call, as a LanewayError: a ConnectError's status code and
 * details are decoded; a LanewayError is returned as is; anything else (a bug, a
 * network error outside a call) becomes an InternalError with it as `cause`.
 */
export function toLanewayError(err: unknown): LanewayError {
  if (err instanceof LanewayError) return err;
  const ce = ConnectError.from(err);
  const info = ce.findDetails(ErrorInfoSchema).find((i) => i.domain === ERROR_DOMAIN)
    ?? ce.findDetails(ErrorInfoSchema)[0];
  const badRequest = ce.findDetails(BadRequestSchema)[0];
  const retry = ce.findDetails(RetryInfoSchema)[0];
  const resource = ce.findDetails(ResourceInfoSchema)[0];
  const code = info === undefined && lostConnection(ce) ? Code.Unavailable : ce.code;
  const Cls = errorClassFor(code);
  return new Cls(code, ce.rawMessage, {
    reason: info?.reason ?? "",
    metadata: info ? { ...info.metadata } : {},
    field: badRequest?.fieldViolations[0]?.field ?? "",
    retryDelayMs: durationMs(retry?.retryDelay),
    resource: resource ? { type: resource.resourceType, name: resource.resourceName } : undefined,
    cause: ce,
  });
}

// Socket errors of a connection that went away. Node's HTTP/2 surfaces a broker that
// stopped mid-stream as "read ECONNRESET", which Connect maps to ABORTED: a status the
// broker itself sends only with an ErrorInfo (CONTENDED). Without one it is the
// connection, not the broker, so it is UNAVAILABLE, as gRPC has it, and a stream resumes.
const LOST_CONNECTION = new Set(["ECONNRESET", "ECONNREFUSED", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH"]);

function lostConnection(ce: ConnectError): boolean {
  let cause: unknown = ce.cause;
  for (let depth = 0; depth < 4 && cause instanceof Error; depth++) {
    const code = (cause as { code?: unknown }).code;
    if (typeof code === "string" && LOST_CONNECTION.has(code)) return true;
    cause = cause.cause;
  }
  return /\b(ECONNRESET|ECONNREFUSED|EPIPE)\b/.test(ce.rawMessage);
}

/** A refused item of SubmitBatch or RedriveDeadLetters, as the error Submit would have thrown. */
export function fromBatchItemError(item: BatchItemError): LanewayError {
  const Cls = errorClassFor(item.code);
  return new Cls(item.code, item.message, {
    reason: reasonName(item.reason),
    metadata: { ...item.metadata },
    field: item.field,
  });
}
