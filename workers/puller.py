"""Pulling jobs from priority lanes into a bounded number of slots.

Raw JetStream pull requests (``$JS.API.CONSUMER.MSG.NEXT``) rather than
nats-py's ``fetch``: we need no-wait sweeps across several consumers in priority
order, long-polls that do not block each other, and exact control over how many
jobs are leased (nats-py #504/#986 and its missing priority-group fields would
stand in the way later too).

Two modes:

- sweep: while slots are free, ask each lane in priority order for up to the
  free slot count with ``no_wait``; higher lanes fill the slots first, and a lane
  that fills the request ends the sweep.
- park: when every lane was empty, leave one ``batch: 1`` long-poll on each
  lane. Whichever lane gets work first wakes the loop, which sweeps again.

Every pull's answers come on one inbox subscription (``laneway.workers.pull_inbox``),
not a subscription per pull. Parked pulls ask for idle heartbeats, so a pull the server lost (nats.py does
not re-send pulls after a reconnect, #504) is replaced within two missed beats.
Parked pulls do not hold slots (a provider with 2 slots still watches all its
lanes); a parked delivery that finds every slot taken is handed back at once
(nak), so the process never runs more jobs than its capacity and work waits in
the durable queue, not in worker memory.

Every pull goes through a gate (``laneway.workers.fleet.routing.RouteGate``): a lane is pulled
only for as many jobs as the fleet-wide limiter granted this provider, and only
when routing says this provider should take the route's work (its circuit, the
targets ahead of it on the route). Grants a pull did not use are refunded. A
gated lane is asked again when the gate says, or at once when any provider's
state changes (``wake``).

Guaranteed shares keep a saturated high lane from starving the lanes below it: a
lane with share ``s`` (``lanes.guaranteed_share``) gets at least that fraction of
recent job starts while it has waiting work (``laneway.workers.lane_shares``).
Before the strict sweep, each lane behind its share is asked first (``no_wait``)
for its share of the free slots, at least one; one that comes up short, or whose
consumers are all parked (known empty), has its debt wiped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from laneway.broker.core.nats.inbox import status_of
from laneway.broker.core.topology import LaneConsumer, pull_subject
from laneway.workers.fleet.routing import Grant
from laneway.workers.lane_shares import LaneShares
from laneway.workers.pull_gate import Gate, OpenGate
from laneway.workers.pull_inbox import PullInbox

__all__ = ["JobHandler", "LanePuller"]

log = structlog.get_logger("laneway.worker")

JobHandler = Callable[[Msg, LaneConsumer, Grant], Awaitable[None]]


# Lane names; a TypeVar because Mapping keys are invariant and the config's are a Literal.
LaneName = TypeVar("LaneName", bound=str)

# Idle heartbeat of parked pulls: a pull the server lost (a reconnect, a consumer
# moving) is noticed after two missed beats instead of at its expiry.
_HEARTBEAT_S = 1.0
# How soon a lane the gate would not let us park on is swept again.
_UNPARKED_RECHECK_S = 0.1


@dataclass
class _Granted:
    """Budget a sweep holds for one route: requests not yet used, an unused probe claim."""

    consumer: LaneConsumer
    left: int
    probe: str


@dataclass
class _Park:
    consumer: str
    deadline: float


class LanePuller:
    """Leases jobs from ``consumers`` (highest priority first) into ``capacity`` slots."""

    def __init__(
        self,
        nc: NatsClient,
        consumers: Sequence[LaneConsumer],
        *,
        capacity: int,
        handler: JobHandler,
        park_s: float = 5.0,
        request_timeout_s: float = 1.0,
        shares: Mapping[LaneName, float] | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._nc = nc
        self._gate: Gate = gate or OpenGate()
        # Seconds until a gated lane should be asked again (inf: none is gated).
        self._gated_for = math.inf
        self._consumers = tuple(consumers)
        self._capacity = capacity
        self._handler = handler
        self._park_s = park_s
        self._timeout = request_timeout_s
        # Refill in chunks under load so a busy pool does not send a pull per finished job.
        self._refill = max(1, min(capacity // 4, 16))
        self._busy = 0
        self._inbox = PullInbox(nc, self._on_orphan)
        self._parks: dict[str, _Park] = {}
        """Parked pulls by reply subject."""
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._shares = LaneShares(shares or {})
        # Lanes in the consumers' priority order, each with its routes' consumers.
        self._by_lane: dict[str, list[LaneConsumer]] = {}
        self._by_name = {consumer.name: consumer for consumer in self._consumers}
        for consumer in self._consumers:
            self._by_lane.setdefault(consumer.lane, []).append(consumer)

    @property
    def in_flight(self) -> int:
        return self._busy

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="laneway-puller")

    async def stop_pulling(self) -> None:
        """Stop leasing new jobs; running jobs go on."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for running jobs, then cancel the rest (they hand their jobs back)."""
        if self._jobs:
            _done, pending = await asyncio.wait(set(self._jobs), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self._parks.clear()
        await self._inbox.close()

    def wake(self) -> None:
        """A provider's shared state changed: a gated lane may be open now."""
        if self._gated_for != math.inf:
            self._wake.set()

    def forget_parks(self) -> None:
        """After a reconnect: parked pulls are gone server-side, so re-park now rather
        than at their local expiry (nats.py does not re-send pull requests, #504)."""
        for park in self._parks.values():
            park.deadline = 0.0
        self._wake.set()

    def _free(self) -> int:
        return self._capacity - self._busy

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except Exception:
                # Never let a NATS hiccup end pulling for the life of the process.
                log.exception("pull loop failed; retrying")
                await asyncio.sleep(0.5)  # back off from a failing server

    async def _step(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake.clear()
        await self._inbox.open()
        self._expire_parks(loop.time())
        free = self._free()
        self._gated_for = math.inf
        if free >= self._refill or (free > 0 and self._busy == 0):
            if await self._sweep():
                return
            await self._park_idle_lanes(loop.time())
        timeout = self._next_park_deadline(loop.time())
        if self._gated_for != math.inf:
            timeout = self._gated_for if timeout is None else min(timeout, self._gated_for)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _sweep(self) -> int:
        # Budget is asked for once per route per sweep and what is left refunded at the
        # end: asking per lane would grant and refund for every empty lane, and that
        # churn makes the provider look free to the targets behind it.
        budget: dict[str, _Granted] = {}
        try:
            return await self._sweep_lanes(budget)
        finally:
            for granted in budget.values():
                if granted.left > 0 or granted.probe:
                    await self._gate.release(granted.consumer, granted.left, granted.probe)

    async def _sweep_lanes(self, budget: dict[str, _Granted]) -> int:
        parked = {p.consumer for p in self._parks.values()}
        total = await self._serve_owed_lanes(parked, budget) if self._shares.enabled else 0
        for consumer in self._consumers:
            free = self._free()
            if free <= 0 or self._stopping:
                break
            if consumer.name in parked:
                # A waiting pull means the lane had nothing; the server hands it the next job itself.
                continue
            msgs = await self._gated_pull(consumer, free, budget)
            total += len(msgs)
            if len(msgs) == free:
                # The lane may hold more. Slots freed meanwhile go to it (or a higher
                # lane) on the next sweep, never to a lower lane beyond its guaranteed share.
                break
        return total

    async def _serve_owed_lanes(self, parked: set[str], budget: dict[str, _Granted]) -> int:
        """Give lanes behind their guaranteed share first pick of the free slots."""
        total = 0
        for lane, consumers in self._by_lane.items():
            free = self._free()
            if free <= 0 or self._stopping:
                break
            if not self._shares.is_owed(lane):
                continue
            want = self._shares.batch(lane, free)
            got = 0
            for consumer in consumers:
                if got >= want or self._stopping:
                    break
                if consumer.name in parked:
                    continue  # known empty; its parked pull delivers (and counts) any new job
                got += len(await self._gated_pull(consumer, want - got, budget))
            total += got
            if got < want:
                # What the lane lacks is work, not slots: owing it more would only let it
                # jump the queue in a burst once work arrives.
                self._shares.settle(lane)
        return total

    async def _gated_pull(self, consumer: LaneConsumer, want: int, budget: dict[str, _Granted]) -> list[Msg]:
        """Pull at most ``want`` jobs within the route's budget for this sweep, and dispatch them."""
        granted = budget.get(consumer.route)
        if granted is None:
            admission = await self._gate.admit(consumer, max(want, self._free()))
            granted = budget[consumer.route] = _Granted(consumer, admission.granted, admission.probe)
            if admission.granted <= 0:
                self._gated_for = min(self._gated_for, admission.retry_s)
        batch = min(want, granted.left)
        if batch <= 0:
            return []
        msgs = await self._pull_now(consumer, batch)
        granted.left -= len(msgs)
        for msg in msgs:
            # A probe covers one call: the first job takes it, the others hold plain slots.
            probe, granted.probe = granted.probe, ""
            self._dispatch(msg, consumer, Grant(held=True, probe=probe))
        return msgs

    async def _pull_now(self, consumer: LaneConsumer, batch: int) -> list[Msg]:
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        got: list[Msg] = []
        reply = self._inbox.request(consumer.name, lambda msg, _reply: replies.put_nowait(msg))
        try:
            await self._request(consumer, {"batch": batch, "no_wait": True}, reply)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(self._timeout):
                    while len(got) < batch:
                        msg = await replies.get()
                        status = status_of(msg)
                        if not status:
                            got.append(msg)
                        elif status in ("404", "408"):  # lane empty / fewer than asked
                            break
                        elif status != "100":
                            description = (msg.headers or {}).get("Description", "")
                            log.warning(
                                "pull refused", consumer=consumer.name, status=status, description=description
                            )
                            break
            except TimeoutError:
                log.warning("pull request unanswered", consumer=consumer.name)
        finally:
            self._inbox.end(reply)
        # Deliveries routed here before the end are ours: run them. Beyond the batch
        # (an earlier pull the server still held delivered too) they hold no budget.
        while not replies.empty():
            late = replies.get_nowait()
            if status_of(late):
                continue
            if len(got) < batch:
                got.append(late)
            else:
                self._dispatch(late, consumer, Grant())
        return got

    async def _park_idle_lanes(self, now: float) -> None:
        parked = {p.consumer for p in self._parks.values()}
        for consumer in self._consumers:
            if self._stopping:
                return
            if consumer.name in parked:
                continue
            if not self._gate.may_park(consumer):
                # Not allowed to wait on this lane (e.g. an overflow target while the
                # targets ahead have room): look again soon, or when any provider's state changes.
                self._gated_for = min(self._gated_for, _UNPARKED_RECHECK_S)
                continue
            on_reply = functools.partial(self._on_park_reply, consumer=consumer)
            reply = self._inbox.request(consumer.name, on_reply)
            self._parks[reply] = _Park(consumer.name, now + 2 * _HEARTBEAT_S)
            body = {"batch": 1, "expires": int(self._park_s * 1e9), "idle_heartbeat": int(_HEARTBEAT_S * 1e9)}
            await self._request(consumer, body, reply)

    def _on_park_reply(self, msg: Msg, reply: str, *, consumer: LaneConsumer) -> None:
        status = status_of(msg)
        if status == "100":
            # The server still holds our pull; without these, it is presumed lost.
            if (alive := self._parks.get(reply)) is not None:
                alive.deadline = asyncio.get_running_loop().time() + 2 * _HEARTBEAT_S
            return
        self._parks.pop(reply, None)
        self._inbox.end(reply)
        if not status:
            # Even while stopping: the handler sees the pool is closing and hands the job back.
            # A parked pull holds no budget: the handler takes it before calling.
            self._dispatch(msg, consumer, Grant())
        self._wake.set()

    def _on_orphan(self, msg: Msg, consumer_name: str) -> None:
        """A delivery of a pull no longer open here (given up on, the server still held
        it): leased to this process all the same, so run it (or hand it back) now
        rather than leave it to its ack wait. (Status replies never come here: they
        are routed by their reply subject.)"""
        consumer = self._by_name.get(consumer_name)
        if consumer is None:
            log.warning("delivery from an unknown consumer handed back", consumer=consumer_name)
            task = asyncio.create_task(msg.nak())
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)
            return
        self._dispatch(msg, consumer, Grant())
        self._wake.set()

    def _next_park_deadline(self, now: float) -> float | None:
        if not self._parks:
            return None
        return max(0.0, min(p.deadline for p in self._parks.values()) - now)

    def _expire_parks(self, now: float) -> None:
        # A park whose heartbeats stopped (lost across a reconnect) is dropped and re-parked.
        for reply, park in list(self._parks.items()):
            if park.deadline <= now:
                del self._parks[reply]
                self._inbox.end(reply)

    async def _request(self, consumer: LaneConsumer, body: Mapping[str, object], reply: str) -> None:
        await self._nc.publish(pull_subject(consumer.name), json.dumps(body).encode(), reply=reply)

    def _dispatch(self, msg: Msg, consumer: LaneConsumer, grant: Grant) -> None:
        if self._busy >= self._capacity:
            # A parked pull delivered while the slots filled up: hand the job back at once.
            task = asyncio.create_task(self._hand_back(msg, consumer, grant))
        else:
            self._busy += 1
            self._shares.started(consumer.lane)
            task = asyncio.create_task(self._handle(msg, consumer, grant))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _hand_back(self, msg: Msg, consumer: LaneConsumer, grant: Grant) -> None:
        await msg.nak()
        if grant.held:
            await self._gate.release(consumer, 1)

    async def _handle(self, msg: Msg, consumer: LaneConsumer, grant: Grant) -> None:
        try:
            await self._handler(msg, consumer, grant)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job handler failed", consumer=consumer.name)
        finally:
            self._busy -= 1
            self._wake.set()
