"""A run's log on the ``LANEWAY_PIPELINES`` stream, one subject per run.

Written only with compare-and-set on the subject's last stream sequence
(``Nats-Expected-Last-Subject-Sequence``), like a job's events
(``laneway.broker.core.events``): two brokers deciding the same transition cannot
both write it; the one refused reads the log again. Read with direct get (any
replica answers, no consumer), from a stream sequence on, so a reader that keeps
a run's state reads only what it has not seen.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from laneway.broker.core import topology as t
from laneway.broker.core.nats.inbox import DIRECT_GET_BATCH, ReplyMux, direct_get, unsubscribe_quietly
from laneway.broker.core.nats.publish import (
    WRONG_LAST_SEQUENCE,
    PublishRejected,
    PublishUnanswered,
    publish_acked,
)
from laneway.broker.pipelines.entries import Entry, Started, decode_entry, encode_entry, entry_kind
from laneway.broker.pipelines.state import RunState
from laneway.errors import LanewayError, Unavailable

__all__ = ["LogConflict", "RunLog", "StoredRun"]

# A follower that heard nothing for this long reads the log anyway (a wake-up lost
# with a reconnect costs at most this).
_RECHECK_S = 1.0


class LogConflict(LanewayError):
    """The run's log moved on since it was read: read it again and decide again."""


@dataclass(frozen=True, slots=True)
class StoredRun:
    """A run's state and the stream sequence of the last entry folded into it."""

    state: RunState
    last_seq: int


class RunLog:
    """Append to and read run logs. Shares the caller's reply inbox (``mux``)."""

    def __init__(self, nc: NatsClient, mux: ReplyMux, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._mux = mux
        self._timeout = timeout
        self._followers: set[asyncio.Event] = set()
        self._closing = False

    def end_follows(self) -> None:
        """End every ``follow`` with Unavailable SHUTTING_DOWN (the broker is stopping):
        callers resume on another broker after the last position they saw."""
        self._closing = True
        for woken in self._followers:
            woken.set()

    async def append(self, run_id: str, entry: Entry, *, expect_last: int) -> int:
        """Append ``entry`` if the run's last entry is at stream sequence ``expect_last``
        (0: the log must be empty). Returns the entry's stream sequence; raises
        LogConflict when the log moved on, Unavailable when the store did not take it."""
        headers = {t.HDR_RUN_ENTRY: entry_kind(entry)}
        return await self._publish(t.pipeline_subject(run_id), encode_entry(entry), headers, expect_last)

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str], expect_last: int) -> int:
        headers = {**headers, "Nats-Expected-Last-Subject-Sequence": str(expect_last)}
        try:
            seq, _ = await publish_acked(self._nc, subject, body, headers, timeout=self._timeout)
        except PublishUnanswered as err:
            raise Unavailable("the pipeline store did not answer in time", reason="NATS_UNAVAILABLE") from err
        except PublishRejected as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                raise LogConflict(f"{subject}: moved on") from err
            why = f"the pipeline store refused the write: {err.description}"
            raise Unavailable(why, reason="NATS_UNAVAILABLE") from err
        return seq

    async def append_all(self, run_id: str, entries: Sequence[Entry], *, expect_last: int) -> int:
        """Append ``entries`` in order, each after the one before; the last's sequence
        (``expect_last`` when there is none). A crash part-way leaves a prefix, which the
        next plan of the run completes."""
        last = expect_last
        for entry in entries:
            last = await self.append(run_id, entry, expect_last=last)
        return last

    async def index(self, run_id: str, started: Started) -> None:
        """Put the run in the list of runs, once (compare-and-set on its index subject:
        written by its start, and again by the driver in case the start's broker died)."""
        body = json.dumps({"run_id": run_id, "pipeline": started.pipeline, "tenant": started.tenant})
        try:
            await self._publish(t.pipeline_index_subject(run_id), body.encode(), {}, 0)
        except LogConflict:
            pass  # listed already

    async def listed(
        self, after_seq: int, size: int, *, pipeline: str = "", tenant: str | None = None
    ) -> tuple[list[str], int]:
        """Run ids from the list of runs, oldest first, after stream sequence
        ``after_seq``: at most ``size`` of ``pipeline`` (empty: any) and ``tenant``
        (None: any). Returns them and the sequence to go on after (0: nothing more)."""
        found: list[str] = []
        start = after_seq + 1
        while len(found) < size:
            request = {
                "seq": start,
                "next_by_subj": f"{t.PIPELINES_INDEX_PREFIX}.*",
                "batch": DIRECT_GET_BATCH,
            }
            msgs = await direct_get(
                self._nc, self._mux, t.PIPELINES_DIRECT_GET, request, timeout=self._timeout
            )
            for msg in msgs:
                seq = int((msg.headers or {}).get("Nats-Sequence", 0))
                entry = json.loads(msg.data)
                if (not pipeline or entry.get("pipeline") == pipeline) and (
                    tenant is None or entry.get("tenant") == tenant
                ):
                    found.append(str(entry.get("run_id", "")))
                    if len(found) == size:
                        return found, seq
                start = seq + 1
            if len(msgs) < DIRECT_GET_BATCH:
                return found, 0
        return found, 0

    async def entries(self, run_id: str, after_seq: int = 0) -> list[tuple[int, Entry]]:
        """The run's entries stored after stream sequence ``after_seq``, in order, each
        with its stream sequence."""
        out: list[tuple[int, Entry]] = []
        start = after_seq + 1
        while True:
            request = {"seq": start, "next_by_subj": t.pipeline_subject(run_id), "batch": DIRECT_GET_BATCH}
            msgs = await direct_get(
                self._nc, self._mux, t.PIPELINES_DIRECT_GET, request, timeout=self._timeout
            )
            for msg in msgs:
                out.append((int((msg.headers or {}).get("Nats-Sequence", 0)), decode_entry(msg.data)))
            if len(msgs) < DIRECT_GET_BATCH:
                return out
            start = out[-1][0] + 1

    async def _get(self, start: int, subjects: str) -> list[Msg]:
        """Up to a batch of the stored messages on ``subjects`` from stream sequence ``start``."""
        request = {"seq": start, "next_by_subj": subjects, "batch": DIRECT_GET_BATCH}
        return await direct_get(self._nc, self._mux, t.PIPELINES_DIRECT_GET, request, timeout=self._timeout)

    async def read(self, run_id: str, since: StoredRun | None = None) -> StoredRun | None:
        """The run as its log stands: ``since`` brought up to date (only the entries
        after it are read), or the whole log folded. None when the run is unknown."""
        found = await self.entries(run_id, since.last_seq if since is not None else 0)
        if since is not None:
            state = since.state
            for _, entry in found:
                state = state.apply(entry)
            return StoredRun(state, found[-1][0] if found else since.last_seq)
        if not found:
            return None
        return StoredRun(RunState.fold(run_id, [e for _, e in found]), found[-1][0])

    async def follow(self, run_id: str) -> AsyncIterator[tuple[int, Entry, RunState]]:
        """Every entry of the run as it is stored, until it ends: (position from 1,
        the entry, the run's state after it). Stored entries first, then new ones as
        they come (a plain subscription on the run's subject wakes the reader; what it
        reads is only ever the stored log, so a refused write is never seen)."""
        woken = asyncio.Event()

        async def wake(_: object) -> None:
            woken.set()

        sub = await self._nc.subscribe(t.pipeline_subject(run_id), cb=wake)
        self._followers.add(woken)
        try:
            state: RunState | None = None
            position, last = 0, 0
            while True:
                if self._closing:
                    raise Unavailable(
                        "broker is shutting down; resume after the last position seen", reason="SHUTTING_DOWN"
                    )
                woken.clear()
                for seq, entry in await self.entries(run_id, last):
                    state = RunState.fold(run_id, [entry]) if state is None else state.apply(entry)
                    position, last = position + 1, seq
                    yield position, entry, state
                # Over once the log, as stored, ends with the run's end (a resumed run's
                # earlier end is followed by more).
                if state is not None and state.finished is not None:
                    return
                try:
                    await asyncio.wait_for(woken.wait(), _RECHECK_S)
                except TimeoutError:
                    pass  # read again: a wake-up may have been lost
        finally:
            self._followers.discard(woken)
            await unsubscribe_quietly(sub)
