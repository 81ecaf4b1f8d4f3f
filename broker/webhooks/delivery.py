"""The delivery loop: pulls deliveries from ``LANEWAY_WEBHOOKS`` and POSTs them.

Retries are JetStream redeliveries, never in-memory timers: a failed attempt naks
its message with a delay, so a crash or restart loses nothing. When to retry is
``retry``'s: exponential backoff by the delivery's real HTTP attempts while its
endpoint is healthy; a per-endpoint circuit (per process) that holds the endpoint's
deliveries while open and lets one probe through when the open period ends. A hold
is a redelivery too, so the attempts are not JetStream's delivery count: they are
the per-job delivery record's (``webhook_status``), written after each attempt and
before its nak. A delivery still failing ``webhooks.max_age_s`` after its first
enqueue goes to ``LANEWAY_WEBHOOK_DLQ``. A 410 Gone disables the webhook (for that
job, or a route's standing subscription as a whole) in the ``laneway_webhooks``
bucket.

Order (webhooks receiving every event): delivery ``seq`` waits until ``seq - 1`` of
the same job and endpoint is done (delivered, dead-lettered or dropped), tracked in
memory and in the bucket (``done.<endpoint>.<job_id>``). The work queue hands
deliveries out in stream order, so the one waited for is usually in flight in the
same process: the wait is a condition, not a poll; otherwise the delivery is
nak'ed and comes back.

Where each delivery stands (pending, retrying, delivered, dead-lettered, disabled)
is recorded after each attempt for ``GetJob`` (``laneway.broker.core.webhook_status``).

Safe by default: the address guard (``guard``), no redirects, connect and total
timeouts, at most 64 KiB of an answer read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import aiohttp
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from laneway.broker.config.webhooks import WebhooksConfig
from laneway.broker.core import topology as t
from laneway.broker.core.nats.pull import fetch_batch
from laneway.broker.core.webhook_status import DeliveryStatus, StatusWriter, read_statuses
from laneway.broker.webhooks.deliveries import Delivery
from laneway.broker.webhooks.guard import AddressRefused, check_url
from laneway.broker.webhooks.metrics import WebhookMetrics
from laneway.broker.webhooks.retry import Admission, Circuit, Tuning, retry_delay
from laneway.broker.webhooks.signing import sign_headers

__all__ = ["DeliveryLoop", "Tuning", "dead_letter_record"]

log = structlog.get_logger("laneway.webhooks.delivery")

MAX_RESPONSE_BYTES = 64 * 1024
_ORDER_WAIT_S = 5.0
_MEMORY = 100_000


def dead_letter_record(d: Delivery, reason: str, attempts: int, status: int = 0) -> dict[str, Any]:
    return {
        "delivery": {k: getattr(d, k) for k in d.__dataclass_fields__},
        "reason": reason,
        "attempts": attempts,
        "last_status": status,
        "failed_at": time.time(),
    }


class DeliveryLoop:
    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        config: WebhooksConfig,
        metrics: WebhookMetrics,
        tuning: Tuning | None = None,
    ) -> None:
        self._js = js
        self._kv = kv
        self._config = config
        self._metrics = metrics
        self._tuning = tuning or Tuning()
        self._session: aiohttp.ClientSession | None = None
        self._circuits: dict[str, Circuit] = {}
        self._status = StatusWriter(kv)
        self._done: OrderedDict[str, int] = OrderedDict()
        self._turn = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        """The HTTP client, made on first use (in the running loop). aiohttp, not httpx:
        a POST costs about a tenth of the CPU, which is what bounds how fast a backlog
        drains after an outage. Raw bytes (no decompression), no proxy from the
        environment, no redirects (``_post``)."""
        if self._session is None:
            timeout_s = self._config.timeout_s
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._tuning.concurrency),
                timeout=aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s)),
                headers={"user-agent": "laneway-webhooks"},
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def run(self) -> None:
        sub = await self._js.pull_subscribe_bind(t.WEBHOOK_DELIVERY_CONSUMER, t.WEBHOOKS_STREAM)
        slots = asyncio.Semaphore(self._tuning.concurrency)
        try:
            while True:
                await slots.acquire()  # at least one slot is free
                slots.release()
                free = max(1, self._tuning.concurrency - len(self._tasks))
                try:
                    msgs = await fetch_batch(sub, free, timeout=1.0)
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:  # reconnecting: try again shortly
                    log.warning("webhook delivery cannot fetch", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    await slots.acquire()
                    task = asyncio.create_task(self._guarded(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(lambda _: slots.release())
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left unacked: JetStream hands it out again after ack_wait.
            log.exception("webhook delivery failed unexpectedly")

    def _count(self, d: Delivery, outcome: str) -> None:
        self._metrics.deliveries.labels(d.label, outcome).inc()

    async def _handle(self, msg: Msg) -> None:
        try:
            d = Delivery.decode(msg.data)
        except (ValueError, TypeError):
            await msg.term()
            return
        circuit = self._circuits.get(d.endpoint)
        if circuit is None:
            circuit = self._circuits[d.endpoint] = Circuit(self._tuning)
        # First, before any bucket read or order wait: an open circuit means no request
        # now, whatever the delivery's turn, and holds are most of what comes back
        # during an outage.
        if circuit.holding(time.monotonic()):
            await self._hold(msg, d, circuit)
            return
        if await self._disabled(d):
            await self._skip_disabled(msg, d)
            return
        if d.prev:
            if not await self._my_turn(d):
                if self._remaining(d) <= 0:
                    reason = "expired waiting for an earlier event"
                    await self._dead_letter(msg, d, reason, await self._tried(msg, d))
                else:
                    await msg.nak(delay=1.0)
                return
            # Checked again now that the earlier event is done: while this one waited,
            # that one may have been answered 410 Gone (which disables this webhook too).
            if await self._disabled(d):
                await self._skip_disabled(msg, d)
                return
        admission, probe = circuit.admit(time.monotonic())
        if admission is Admission.HOLD:
            await self._hold(msg, d, circuit)
            return
        try:
            await self._attempt(msg, d, circuit, probe)
        finally:
            circuit.release(probe)  # a probe that ended without an answer: the next one probes

    async def _attempt(self, msg: Msg, d: Delivery, circuit: Circuit, probe: int) -> None:
        try:
            await check_url(d.url, self._config.allow_hosts)
        except AddressRefused as refused:
            self._count(d, "refused")
            await self._dead_letter(msg, d, f"address refused: {refused}", await self._tried(msg, d))
            return
        status, error = await self._post(d)
        attempts = await self._tried(msg, d) + 1
        if (200 <= status < 300 or status == 410) and circuit.succeeded():
            log.info("webhook endpoint circuit closed", endpoint=d.label, probe=bool(probe))
        if 200 <= status < 300:
            self._count(d, "delivered")
            await self._note(d, "delivered", attempts, status)
            await msg.ack()
            await self._mark_done(d)
            return
        if status == 410:
            self._count(d, "gone")
            await self._kv.put(d.disable_key, f"410 Gone at {datetime.now(UTC).isoformat()}".encode())
            await self._note(d, "disabled", attempts, status, "410 Gone: the webhook is disabled")
            await msg.ack()
            await self._mark_done(d)
            return
        now = time.monotonic()
        if circuit.failed(now, probe):
            log.warning(
                "webhook endpoint circuit opened", endpoint=d.label, seconds=circuit.period, probe=bool(probe)
            )
        reason = f"HTTP {status}" if status else error
        delay = retry_delay(self._tuning, circuit, attempts, self._remaining(d), now)
        if delay is None:
            await self._dead_letter(msg, d, reason, attempts, status)
            return
        self._count(d, "failed")
        await self._note(d, "retrying", attempts, status, reason, next_in=delay)
        await msg.nak(delay=delay)

    async def _hold(self, msg: Msg, d: Delivery, circuit: Circuit) -> None:
        """Postpone a delivery its endpoint's circuit keeps from being tried: not an attempt."""
        if self._remaining(d) <= 0:
            reason = "endpoint circuit open until the retry horizon"
            await self._dead_letter(msg, d, reason, await self._tried(msg, d))
            return
        self._count(d, "circuit_open")
        await msg.nak(delay=circuit.hold_delay(time.monotonic()))

    def _remaining(self, d: Delivery) -> float:
        """Seconds left until the retry horizon, which counts from the first enqueue."""
        return d.created + self._config.max_age_s - time.time()

    async def _tried(self, msg: Msg, d: Delivery) -> int:
        """Real HTTP attempts made so far. Not JetStream's delivery count, which holds and
        order waits raise too: the delivery record's, written after each attempt and
        before its nak (a lost write undercounts by one, never overcounts). A first
        delivery (a new one, or a dead letter redelivered) has made none."""
        if (msg.metadata.num_delivered or 1) <= 1:
            return 0
        try:
            statuses = await read_statuses(self._kv, d.job_id)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("webhook delivery record not read", webhook_id=d.id, error=str(exc))
            return 0
        return next((s.attempts for s in statuses if s.webhook_id == d.id and s.state == "retrying"), 0)

    async def _skip_disabled(self, msg: Msg, d: Delivery) -> None:
        self._count(d, "disabled")
        # No request was made for this one: the attempts before it are what counts.
        await self._note(
            d, "disabled", await self._tried(msg, d), 0, "not sent: the webhook answered 410 Gone before"
        )
        await msg.ack()
        await self._mark_done(d)

    async def _note(
        self, d: Delivery, state: str, attempts: int, status: int = 0, error: str = "", next_in: float = 0.0
    ) -> None:
        """Record where the delivery stands, for GetJob. Before the ack or nak, so the
        next attempt's record cannot be overtaken by this one; a failed write loses
        only what GetJob shows, never the delivery itself."""
        now = time.time()
        tried = attempts > 0
        entry = DeliveryStatus.new(
            webhook_id=d.id,
            url=d.url,
            source=d.label,
            event_seq=d.seq,
            state=state,
            attempts=max(attempts, 0),
            last_status=status,
            last_error=error,
            last_attempt=now if tried else 0.0,
            next_attempt=now + next_in if next_in else 0.0,
        )
        try:
            await self._status.record(d.job_id, [entry])
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("webhook delivery state not recorded", webhook_id=d.id, error=str(exc))

    async def _post(self, d: Delivery) -> tuple[int, str]:
        """(status, "") or (0, what went wrong)."""
        secrets = self._config.secrets.get(d.secret)
        if not secrets:
            return 0, f"no secret named {d.secret!r} in webhooks.secrets"
        headers = sign_headers(d.id, datetime.now(UTC), d.body, secrets)
        headers["content-type"] = "application/json"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._config.timeout_s):
                async with self._http().post(
                    d.url, data=d.body.encode(), headers=headers, allow_redirects=False
                ) as resp:
                    read = 0
                    async for chunk in resp.content.iter_any():
                        read += len(chunk)
                        if read >= MAX_RESPONSE_BYTES:
                            break
                    return resp.status, ""
        except TimeoutError:
            return 0, f"no answer within {self._config.timeout_s:g}s"
        except aiohttp.ClientError as exc:
            return 0, f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self._metrics.latency.labels(d.label).observe(time.perf_counter() - started)

    async def _disabled(self, d: Delivery) -> bool:
        try:
            await self._kv.get(d.disable_key)
        except nats.js.errors.KeyNotFoundError:
            return False
        return True

    async def _done_seq(self, d: Delivery) -> int:
        local = self._done.get(d.order_key, 0)
        if local >= d.prev:
            return local
        try:
            entry = await self._kv.get(d.order_key)
        except nats.js.errors.KeyNotFoundError:
            return local
        return max(local, int(entry.value or b"0"))

    async def _my_turn(self, d: Delivery) -> bool:
        if await self._done_seq(d) >= d.prev:
            return True
        async with self._turn:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._turn.wait_for(lambda: self._done.get(d.order_key, 0) >= d.prev), _ORDER_WAIT_S
                )
        return await self._done_seq(d) >= d.prev

    async def _mark_done(self, d: Delivery) -> None:
        if not d.ordered:
            return
        if self._done.get(d.order_key, 0) < d.seq:
            self._done[d.order_key] = d.seq
            self._done.move_to_end(d.order_key)
            if len(self._done) > _MEMORY:
                self._done.popitem(last=False)
        await self._kv.put(d.order_key, str(d.seq).encode())
        async with self._turn:
            self._turn.notify_all()

    async def _dead_letter(self, msg: Msg, d: Delivery, reason: str, attempts: int, status: int = 0) -> None:
        record = dead_letter_record(d, reason, attempts, status)
        await self._js.publish(
            t.webhook_dlq_subject(d.endpoint, d.job_id), json.dumps(record, separators=(",", ":")).encode()
        )
        self._count(d, "dead_lettered")
        log.warning("webhook delivery dead-lettered", webhook_id=d.id, endpoint=d.label, reason=reason)
        await self._note(d, "dead_lettered", attempts, status, reason)
        await msg.ack()
        await self._mark_done(d)
