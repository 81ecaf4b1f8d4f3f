"""The delivery loop: pulls deliveries from ``LANEWAY_WEBHOOKS`` and POSTs them.

Retries are JetStream redeliveries, never in-memory timers: a failed attempt naks
its message with a jittered exponential delay, so a crash or restart loses
nothing. A delivery still failing ``webhooks.max_age_s`` after its event goes to
``LANEWAY_WEBHOOK_DLQ``. A 410 Gone disables the webhook (for that job, or a route's
standing subscription as a whole) in the ``laneway_webhooks`` bucket. A per-endpoint
circuit opens after consecutive failures: meanwhile its deliveries are postponed
(nak with a delay), not attempted.

Order (webhooks receiving every event): delivery ``seq`` waits until ``seq - 1`` of
the same job and endpoint is done (delivered, dead-lettered or dropped), tracked in
memory and in the bucket (``done.<endpoint>.<job_id>``). The work queue hands
deliveries out in stream order, so the one waited for is usually in flight in the
same process: the wait is a condition, not a poll; otherwise the delivery is
nak'ed and comes back.

Safe by default: the address guard (``guard``), no redirects, connect and total
timeouts, at most 64 KiB of an answer read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import httpx
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from laneway.broker.config.webhooks import WebhooksConfig
from laneway.broker.core import topology as t
from laneway.broker.webhooks.deliveries import Delivery
from laneway.broker.webhooks.guard import AddressRefused, check_url
from laneway.broker.webhooks.metrics import WebhookMetrics
from laneway.broker.webhooks.signing import sign_headers

__all__ = ["DeliveryLoop", "Tuning", "dead_letter_record"]

log = structlog.get_logger("laneway.webhooks.delivery")

MAX_RESPONSE_BYTES = 64 * 1024
_ORDER_WAIT_S = 5.0
_MEMORY = 100_000


class Tuning:
    """Knobs that are not config (tests shorten them)."""

    def __init__(
        self,
        *,
        concurrency: int = 64,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 3600.0,
        circuit_failures: int = 5,
        circuit_open_s: float = 30.0,
    ) -> None:
        self.concurrency = concurrency
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.circuit_failures = circuit_failures
        self.circuit_open_s = circuit_open_s

    def backoff(self, attempt: int) -> float:
        """Delay before the next attempt: exponential, with full jitter over its upper half."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(max(attempt - 1, 0), 30))
        return float(cap * random.uniform(0.5, 1.0))


def dead_letter_record(d: Delivery, reason: str, attempts: int, status: int = 0) -> dict[str, Any]:
    return {
        "delivery": {k: getattr(d, k) for k in d.__dataclass_fields__},
        "reason": reason,
        "attempts": attempts,
        "last_status": status,
        "failed_at": time.time(),
    }


class _Circuit:
    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0


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
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(config.timeout_s, connect=min(5.0, config.timeout_s)),
            headers={"user-agent": "laneway-webhooks"},
        )
        self._circuits: dict[str, _Circuit] = {}
        self._done: OrderedDict[str, int] = OrderedDict()
        self._turn = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def run(self) -> None:
        sub = await self._js.pull_subscribe_bind(t.WEBHOOK_DELIVERY_CONSUMER, t.WEBHOOKS_STREAM)
        slots = asyncio.Semaphore(self._tuning.concurrency)
        try:
            while True:
                await slots.acquire()  # at least one slot is free
                slots.release()
                free = max(1, self._tuning.concurrency - len(self._tasks))
                try:
                    msgs = await sub.fetch(free, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
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
        attempts = msg.metadata.num_delivered or 1
        expired = time.time() - d.created > self._config.max_age_s
        if await self._disabled(d):
            self._count(d, "disabled")
            await msg.ack()
            await self._mark_done(d)
            return
        if d.prev and not await self._my_turn(d):
            if expired:
                await self._dead_letter(msg, d, "expired waiting for an earlier event", attempts)
            else:
                await msg.nak(delay=1.0)
            return
        circuit = self._circuits.setdefault(d.endpoint, _Circuit())
        wait = circuit.open_until - time.monotonic()
        if wait > 0:
            if expired:
                await self._dead_letter(msg, d, "endpoint circuit open until the retry horizon", attempts)
            else:
                self._count(d, "circuit_open")
                await msg.nak(delay=wait + random.uniform(0, 1.0))
            return
        try:
            await check_url(d.url, self._config.allow_hosts)
        except AddressRefused as refused:
            self._count(d, "refused")
            await self._dead_letter(msg, d, f"address refused: {refused}", attempts)
            return
        status, error = await self._post(d)
        if 200 <= status < 300:
            circuit.failures = 0
            self._count(d, "delivered")
            await msg.ack()
            await self._mark_done(d)
            return
        if status == 410:
            circuit.failures = 0
            self._count(d, "gone")
            await self._kv.put(d.disable_key, f"410 Gone at {datetime.now(UTC).isoformat()}".encode())
            await msg.ack()
            await self._mark_done(d)
            return
        circuit.failures += 1
        if circuit.failures >= self._tuning.circuit_failures:
            circuit.open_until = time.monotonic() + self._tuning.circuit_open_s
            circuit.failures = 0
            log.warning(
                "webhook endpoint circuit opened", endpoint=d.label, seconds=self._tuning.circuit_open_s
            )
        delay = self._tuning.backoff(attempts)
        reason = f"HTTP {status}" if status else error
        if time.time() + delay - d.created > self._config.max_age_s:
            await self._dead_letter(msg, d, reason, attempts, status)
            return
        self._count(d, "failed")
        await msg.nak(delay=delay)

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
                async with self._client.stream(
                    "POST", d.url, content=d.body.encode(), headers=headers
                ) as resp:
                    read = 0
                    async for chunk in resp.aiter_raw():
                        read += len(chunk)
                        if read >= MAX_RESPONSE_BYTES:
                            break
                    return resp.status_code, ""
        except TimeoutError:
            return 0, f"no answer within {self._config.timeout_s:g}s"
        except httpx.HTTPError as exc:
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
        await msg.ack()
        await self._mark_done(d)
