import { JobState } from "./gen/laneway/v1/job_pb.js";

/** The states a job ends in: no event follows one of these. */
export const FINAL_STATES: ReadonlySet<JobState> = new Set([
  JobState.SUCCEEDED,
  JobState.DEAD_LETTERED,
  JobState.CANCELLED,
  JobState.EXPIRED,
  JobState.SUPERSEDED,
  JobState.NOT_ENQUEUED,
]);

/** Whether a job in this state has finished (no event follows). */
export function isFinal(state: JobState): boolean {
  return FINAL_STATES.has(state);
}

/** A state's name as in the proto without its prefix, e.g. "SUCCEEDED". */
export function stateName(state: JobState): string {
  return JobState[state] ?? `JOB_STATE_${state}`;
}
