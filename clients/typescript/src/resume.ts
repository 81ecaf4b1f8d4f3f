// Resuming a broken server stream: the one loop behind `stream` (StreamResults) and
// `streamPipelineRun` (StreamPipelineRun). The caller keeps its own resume point (the
// last seq seen) and reads it each time the stream is opened again.
import { Code } from "@connectrpc/connect";
import { Cancelled, DeadlineExceeded, type LanewayError, Unavailable, toLanewayError } from "./errors.js";

const RESUME_FIRST_DELAY_MS = 100;
const RESUME_MAX_DELAY_MS = 2_000;

export interface ResumeSettings {
  /** How long to keep resuming, counted from the break, in milliseconds. */
  resumeForMs: number;
  /** Bound of the whole stream, resumes included, in milliseconds (undefined: none). */
  timeoutMs: number | undefined;
  signal?: AbortSignal | undefined;
  onResume?: ((error: LanewayError, attempt: number) => void) | undefined;
  /** Whether a stream the broker ended without an error is the end (false: resume,
   * because the broker should not have ended it yet). */
  ended: () => boolean;
  /** The error of a stream that ended too early. */
  endedEarly: string;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Whether a broken stream is worth opening again: the broker went away (UNAVAILABLE,
 * e.g. a restart or SHUTTING_DOWN) or dropped the call before taking it (CANCELLED
 * that we did not ask for). */
export function resumable(err: LanewayError, signal?: AbortSignal): boolean {
  if (signal?.aborted) return false;
  return err instanceof Unavailable || err instanceof Cancelled;
}

/**
 * Every response of `open(timeoutMs)`, opened again after a resumable break (see
 * `resumable`) with a doubling delay (0.1 s to 2 s) for up to `resumeForMs` from the
 * break; a response resets the window. `open` gets the time left of `timeoutMs` and
 * builds its request from the caller's resume point, which the caller moves as it
 * takes each response. Past `resumeForMs` the last error is thrown.
 */
export async function* resuming<T>(
  open: (timeoutMs: number | undefined) => AsyncIterable<T>,
  settings: ResumeSettings,
): AsyncGenerator<T, void, undefined> {
  const deadline = settings.timeoutMs !== undefined ? Date.now() + settings.timeoutMs : undefined;
  let brokenAt: number | undefined;
  let failures = 0;
  for (;;) {
    const left = deadline !== undefined ? deadline - Date.now() : undefined;
    if (left !== undefined && left <= 0) {
      throw new DeadlineExceeded(Code.DeadlineExceeded, "the stream's timeoutMs passed");
    }
    let failure: LanewayError;
    try {
      for await (const response of open(left)) {
        brokenAt = undefined;
        failures = 0;
        yield response;
      }
      if (settings.ended()) return;
      failure = new Unavailable(Code.Unavailable, settings.endedEarly);
    } catch (err) {
      failure = toLanewayError(err);
      if (!resumable(failure, settings.signal)) throw failure;
    }
    const now = Date.now();
    brokenAt ??= now;
    failures += 1;
    let wait = Math.min(RESUME_MAX_DELAY_MS, RESUME_FIRST_DELAY_MS * 2 ** (failures - 1));
    const windowLeft = brokenAt + settings.resumeForMs - now;
    if (windowLeft <= 0) throw failure;
    wait = Math.min(wait, windowLeft);
    if (deadline !== undefined) wait = Math.min(wait, Math.max(0, deadline - now));
    settings.onResume?.(failure, failures);
    try {
      await sleep(wait, settings.signal);
    } catch (err) {
      throw new Cancelled(Code.Canceled, "the call was aborted", { cause: err });
    }
  }
}
