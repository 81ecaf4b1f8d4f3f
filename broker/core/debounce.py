"""Debounced jobs: which submissions a pending schedule replaced, and ending them.

Submissions a, b, c with one debounce key collapse into the job that runs: c,
the last of the window. When b replaces a, c does not exist yet, so a cannot end
SUPERSEDED naming the job that runs (its final event is written once, never
changed). Instead the broker lists every job a schedule replaced on the schedule
itself (``HDR_REPLACES``, carried over from the schedule it replaces, so c's
lists a and b), and the worker that gets the released job ends each listed job
SUPERSEDED naming it: only then is the job that runs known. The list lives in
JetStream with the schedule, so it survives restarts; a job on it that was
cancelled meanwhile keeps its own ending.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from laneway.broker.core import topology as t
from laneway.broker.core.events import EventConflict, EventLog
from laneway.broker.core.model import JobState

__all__ = ["MAX_REPLACED", "replaced_by_schedule", "replaces_header", "supersede"]

# At most this many replaced jobs ride on one schedule (27 bytes each: 27 KB, well
# under NATS's 1 MB message limit even when republished on every submission). A key
# resubmitted more often within one window ends its oldest submissions at once,
# naming the submission that pushed them off the list.
MAX_REPLACED = 1000


def replaced_by_schedule(headers: Mapping[str, str] | None) -> list[str]:
    """The ids of the jobs a pending or released debounce schedule replaced."""
    return (headers or {}).get(t.HDR_REPLACES, "").split()


def replaces_header(job_ids: Sequence[str]) -> dict[str, str]:
    return {t.HDR_REPLACES: " ".join(job_ids)} if job_ids else {}


async def supersede(events: EventLog, job_ids: Sequence[str], by: str) -> None:
    """End every job of ``job_ids`` that is still SCHEDULED as SUPERSEDED, naming ``by``.

    Idempotent (a redelivered job runs it again and finds them final). A job that
    moved on meanwhile (cancelled) keeps its own ending; any other failure is raised,
    so the caller retries the delivery rather than leaving a job SCHEDULED forever."""
    wanted = [j for j in dict.fromkeys(job_ids) if j != by]
    if not wanted:
        return
    latest = await events.latest(wanted)
    appends = []
    for job_id in wanted:
        stored = latest.get(job_id)
        if stored is None or stored.final:
            continue  # expired, or already ended (cancelled, or superseded by an earlier try)
        current = stored.decode()
        if current.state is JobState.SCHEDULED:
            appends.append((current.next(JobState.SUPERSEDED, superseded_by=by), stored.stream_seq))
    for result in await events.append_many(appends):
        if not isinstance(result, int | EventConflict):
            raise result
