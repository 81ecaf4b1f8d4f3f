"""Following jobs' events for StreamResults: stored history, then live events.

Live events come from the stream's republish of stored events
(``laneway.live.<job_id>``), through ONE wildcard subscription per broker
process that hands each event to the streams watching its job: no subscription
per stream or per job. Each broker sees every event; a broker fleet that
outgrows that would shard the live subject space.

Order of operations makes the hand-over gap-free: a watcher registers for live
events before it reads the store, so an event is either already stored when the
store is read or republished (after storing) to a registered watcher. Live
events republished while the broker was cut off from NATS are lost to it; after
each reconnect (``catch_up``) every watched job's latest stored event is handed to
its watchers, which read whatever they missed from the log.

On a replicated stream the read may be answered by a replica that has not yet
applied an event the leader already republished, so an event republished just
before a watcher registered could be in neither. Only a final event matters (a
missed earlier one is filled in from the log when the next arrives): the feed
remembers the last ``RECENT_FINALS`` final events it saw go by, and a watcher
whose read came back without one of those takes it from the stream leader.

A final-only watch of a job this broker enqueued itself reads nothing (the unary
Submit-then-StreamResults path): the feed is told of the job before its first write
(``born``) and forgets it when the job's final event goes by, so a job it still
holds has no final yet, and the final will arrive live. A reconnect (live events
may have been lost) forgets them all, and such watches read the store again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from types import TracebackType

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from laneway.broker.core import topology as t
from laneway.broker.core.events import FINAL_NAMES, EventLog, StoredEvent
from laneway.broker.core.nats.inbox import unsubscribe_quietly
from laneway.broker.core.nats.inline import raw_header, subscribe_inline
from laneway.broker.core.tasks import Background
from laneway.broker.server.tenancy import event_tenant, unknown_job
from laneway.errors import NotFound, Unavailable

__all__ = ["EventFeed"]

_GAP_RETRIES = 50
RECENT_FINALS = 16_384
BORN_KEPT = 65_536
"""Jobs enqueued here whose final event has not gone by, kept for a read-free final-only
watch (job id and tenant, some 150 bytes each); beyond that, the oldest are read as any job."""
_STATE, _SEQ = t.HDR_JOB_STATE.encode(), t.HDR_JOB_SEQ.encode()
"""Final events remembered (job id and seq, some 200 bytes each): far more than go by
while a replica catches up (milliseconds; a second or two on an overloaded host)."""


class EventFeed:
    """Live events of watched jobs, and ``watch`` built on them and the log."""

    def __init__(self, nc: NatsClient, log: EventLog) -> None:
        self._nc = nc
        self._log = log
        self._watchers: dict[str, set[asyncio.Queue[StoredEvent | None]]] = {}
        self._recent_finals: OrderedDict[str, int] = OrderedDict()
        self._born: OrderedDict[str, str] = OrderedDict()
        self._sub: Subscription | None = None
        self._closing = False
        self._reconnected = asyncio.Event()
        self._catching_up = Background("laneway-feed-catch-up")

    async def __aenter__(self) -> EventFeed:
        self._sub = await subscribe_inline(self._nc, t.LIVE_ALL, self._on_msg, self._screen)
        self._catching_up.start(self._catch_up_loop())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end_watches()
        await self._catching_up.stop()
        sub, self._sub = self._sub, None
        if sub is not None:
            await unsubscribe_quietly(sub)

    def end_watches(self) -> None:
        """End every watch with Unavailable (shutdown): callers resume on another broker."""
        self._closing = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)

    def catch_up(self) -> None:
        """NATS is back after an outage (call on reconnect): live events of watched
        jobs may have been lost meanwhile, so their latest stored events are read."""
        self._born.clear()  # their finals may have gone by unseen
        self._reconnected.set()

    def born(self, job_id: str, tenant: str) -> None:
        """``job_id`` (of ``tenant``) is about to be written for the first time here:
        until its final event goes by, a final-only watch of it needs no read."""
        self._born[job_id] = tenant
        if len(self._born) > BORN_KEPT:
            self._born.popitem(last=False)

    def stillborn(self, job_id: str) -> None:
        """The enqueue of a ``born`` job failed: a watch of it reads the store."""
        self._born.pop(job_id, None)

    async def _catch_up_loop(self) -> None:
        while True:
            await self._reconnected.wait()
            self._reconnected.clear()
            ids = list(self._watchers)
            try:
                # Our subscription was renewed before the reconnect was announced: an
                # event stored after this read reaches us live.
                latest = await self._log.latest(ids) if ids else {}
            except Unavailable:
                self._reconnected.set()  # NATS is still settling: read again
                await asyncio.sleep(0.5)  # back off between tries
                continue
            for job_id, event in latest.items():
                # A watcher skips what it has seen and reads a gap from the log.
                for queue in list(self._watchers.get(job_id, ())):
                    queue.put_nowait(event)

    def _screen(self, subject: bytes, headers: bytes) -> bool:
        """Every live event: note a final going by; whether a watcher wants the event
        (only then is it parsed: most events go by unwatched)."""
        job_id = t.job_id_of(subject.decode())
        state = raw_header(headers, _STATE)
        if state is not None and state.decode() in FINAL_NAMES:
            self._recent_finals[job_id] = int(raw_header(headers, _SEQ) or 0)
            self._born.pop(job_id, None)
            if len(self._recent_finals) > RECENT_FINALS:
                self._recent_finals.popitem(last=False)
        return job_id in self._watchers

    def _on_msg(self, msg: Msg) -> None:
        queues = self._watchers.get(t.job_id_of(msg.subject))
        if queues:
            event = StoredEvent.from_msg(msg)
            for queue in queues:
                queue.put_nowait(event)

    async def watch(
        self,
        job_ids: Iterable[str],
        resume_after: Mapping[str, int],
        *,
        create: Callable[[], Awaitable[None]] | None = None,
        final_only: bool = False,
        tenant: str | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Every event of the jobs (after their resume points), in per-job order,
        until each job's final event. Raises NotFound for an unknown job, and with
        ``tenant`` for a job of another tenant alike, before anything is yielded
        (checked once per job, on the stored event the watch reads first; a job's tenant
        never changes).

        With ``create``, the jobs do not exist yet: ``create`` makes them once the
        watcher is registered, so every event arrives live and the store is not read.
        With ``final_only``, only final events are yielded, and no history is read;
        nothing is read of a job ``born`` here whose final has not gone by yet.
        """
        ids = list(dict.fromkeys(job_ids))
        last = {j: resume_after.get(j, 0) for j in ids}
        if self._closing:
            raise Unavailable("broker is shutting down; retry on another broker", reason="SHUTTING_DOWN")
        live: asyncio.Queue[StoredEvent | None] = asyncio.Queue()
        for job_id in ids:
            self._watchers.setdefault(job_id, set()).add(live)
        # Finals that went by before we registered: the read below must show them.
        gone_by = {j: seq for j in ids if (seq := self._recent_finals.get(j)) is not None}
        pending = set(ids)
        try:
            if create is not None:
                await create()
                initial = {}
            else:
                # Registered above, so a born job's final, not gone by yet, arrives live.
                unborn = [j for j in ids if not (final_only and self._born_for(j, tenant))]
                initial = await self._initial(unborn, last, final_only, tenant) if unborn else {}
            for job_id, seq in gone_by.items():
                if job_id in initial and initial[job_id][1].job_seq < seq:
                    await self._from_leader(job_id, seq, live)
            for job_id in initial:
                events, top = initial[job_id]
                for event in events:
                    last[job_id] = event.job_seq
                    yield event
                if events[-1].final if events else top.final:
                    self._forget(job_id, live)
                    pending.discard(job_id)
            while pending:
                got = await live.get()
                if got is None:
                    raise Unavailable(
                        "broker is shutting down; resume after the last seq seen", reason="SHUTTING_DOWN"
                    )
                event = got
                job_id = event.job_id
                if job_id not in pending:
                    continue
                if event.job_seq <= last[job_id]:
                    if event.final:  # the caller resumed after it: nothing more to send
                        self._forget(job_id, live)
                        pending.discard(job_id)
                    continue
                batch = [event]
                if final_only:
                    if not event.final:
                        continue
                elif event.job_seq > last[job_id] + 1:
                    batch = await self._fill_gap(job_id, last[job_id], event)
                for e in batch:
                    last[job_id] = e.job_seq
                    yield e
                if event.final:
                    self._forget(job_id, live)
                    pending.discard(job_id)
        finally:
            for job_id in pending:
                self._forget(job_id, live)

    def _born_for(self, job_id: str, tenant: str | None) -> bool:
        born = self._born.get(job_id)
        return born is not None and (tenant is None or born == tenant)

    async def _initial(
        self, ids: list[str], last: dict[str, int], final_only: bool, tenant: str | None
    ) -> dict[str, tuple[list[StoredEvent], StoredEvent]]:
        """Per job: its stored events to send now, and its latest event."""
        if len(ids) == 1 and not final_only:
            # One job (the unary Submit-then-watch path, often finished by now): its
            # whole history in one request rather than latest, then history.
            job_id = ids[0]
            events = await self._log.history(job_id)
            if not events or (tenant is not None and event_tenant(events[-1].data) != tenant):
                raise _unknown(job_id)
            return {job_id: ([e for e in events if e.job_seq > last[job_id]], events[-1])}
        latest = await self._log.latest(ids)
        if tenant is not None:
            # Every job first: nothing of the stream is sent when one of them is hidden.
            for job_id in ids:
                top = latest.get(job_id)
                if top is None or event_tenant(top.data) != tenant:
                    raise _unknown(job_id)
        out: dict[str, tuple[list[StoredEvent], StoredEvent]] = {}
        for job_id in ids:
            top = latest.get(job_id)
            if top is None:
                raise _unknown(job_id)
            if top.job_seq <= last[job_id] or (final_only and not top.final):
                out[job_id] = ([], top)
            elif top.job_seq == last[job_id] + 1 or final_only:
                out[job_id] = ([top], top)  # one new event: no history read
            else:
                events = await self._log.history(job_id, last[job_id])
                if not events or events[-1].job_seq < top.job_seq:
                    # The history came from a replica behind the one that answered latest.
                    events = await self._fill_gap(job_id, last[job_id], top)
                out[job_id] = (events, top)
        return out

    async def _from_leader(self, job_id: str, seq: int, live: asyncio.Queue[StoredEvent | None]) -> None:
        """The replica that answered our read is behind: the job's final event (``seq``),
        which went by live before we registered, comes from the leader and is handled as
        if it had arrived live (``_fill_gap`` reads what lies between from the log)."""
        event = await self._log.leader_last(job_id)
        if event is None or event.job_seq < seq:
            missing = f"job {job_id}: the stream leader lacks event {seq}, which it republished"
            raise Unavailable(missing, reason="NATS_UNAVAILABLE", metadata={"job_id": job_id})
        live.put_nowait(event)

    def _forget(self, job_id: str, queue: asyncio.Queue[StoredEvent | None]) -> None:
        queues = self._watchers.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._watchers[job_id]

    async def _fill_gap(self, job_id: str, last: int, seen: StoredEvent) -> list[StoredEvent]:
        """Events after ``last`` up to ``seen``, when live delivery skipped some
        (a slow-consumer drop, or an event stored between our read and our
        registration's effect). Every live event is stored, so a re-read finds them."""
        for attempt in range(_GAP_RETRIES):
            stored = [e for e in await self._log.history(job_id, last) if e.job_seq < seen.job_seq]
            run = [*stored, seen]
            if [e.job_seq for e in run] == list(range(last + 1, seen.job_seq + 1)):
                return run
            await asyncio.sleep(0.002 * (attempt + 1))  # replica catch-up: poll with a deadline
        missing = f"job {job_id}: events {last + 1}..{seen.job_seq - 1} missing from the store"
        raise Unavailable(missing, reason="NATS_UNAVAILABLE", metadata={"job_id": job_id})


def _unknown(job_id: str) -> NotFound:
    return unknown_job(job_id, field="job_ids")
