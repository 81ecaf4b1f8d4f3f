"""The fan-out: a durable consumer of ``LANEWAY_EVENTS`` that turns each event some
webhook wants into a delivery on ``LANEWAY_WEBHOOKS``.

Why a consumer of the events stream and not the worker that writes the event: a
job's path stays as it was (no publish, lookup or write is added to it, and events
written by the broker, the sweeper or a worker are all seen alike), and the events
are durable before anything is promised: an event fanned out is acked only once
its deliveries are stored, so a crash repeats work (deduplicated by ``webhook-id``
as the publish's ``Nats-Msg-Id``) and never loses it.

A job's own webhooks come with its events (the ``Laneway-Notify`` header on events
built from the queued job, always on the first); for the others (e.g. a CANCELLED
event the broker writes) they are remembered, in memory and in the
``laneway_webhooks`` bucket (``notify.<job_id>``), from the first event.

Each delivery queued is recorded as pending for ``GetJob`` (``webhook_status``), in
the same step as its publish: one bucket write per job of a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable

import nats.errors
import nats.js.errors
import structlog
from google.protobuf.json_format import MessageToDict
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from laneway.broker.config.webhooks import WebhooksConfig
from laneway.broker.core import topology as t
from laneway.broker.core.events import FINAL_NAMES
from laneway.broker.core.model import Notify
from laneway.broker.core.nats.pull import fetch_batch
from laneway.broker.core.webhook_status import DeliveryStatus, StatusWriter
from laneway.broker.core.wire.notify import decode_notify, encode_notify
from laneway.broker.webhooks.deliveries import (
    Delivery,
    job_endpoint,
    matches,
    subscription_endpoint,
    subscription_label,
)
from laneway.v1 import job_pb2

__all__ = ["Fanout"]

log = structlog.get_logger("laneway.webhooks.fanout")

_CACHE = 100_000
_BATCH = 256


class Fanout:
    """Runs ``run()`` until cancelled; one or more per deployment share the consumer."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, config: WebhooksConfig) -> None:
        self._js = js
        self._kv = kv
        self._subs = [
            (subscription_endpoint(sub), subscription_label(i, sub), sub)
            for i, sub in enumerate(config.subscriptions)
        ]
        self._notify: OrderedDict[str, tuple[Notify, ...]] = OrderedDict()
        self._status = StatusWriter(kv)

    async def run(self) -> None:
        sub = await self._js.pull_subscribe_bind(t.WEBHOOK_FANOUT_CONSUMER, t.EVENTS_STREAM)
        try:
            while True:
                try:
                    msgs = await fetch_batch(sub, _BATCH, timeout=1.0)
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:  # reconnecting: try again shortly
                    log.warning("webhook fan-out cannot fetch events", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                try:
                    deliveries: list[Delivery] = []
                    for msg in msgs:
                        deliveries += await self._deliveries(msg)
                    await asyncio.gather(*(self._publish(d) for d in deliveries), *self._pending(deliveries))
                    for msg in msgs:
                        await msg.ack()
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    # Unacked: the events come back after ack_wait, and deliveries already
                    # stored are deduplicated by their webhook-id (Nats-Msg-Id).
                    log.warning("webhook fan-out failed; the events will be redelivered", error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _pending(self, deliveries: list[Delivery]) -> list[Awaitable[None]]:
        """Record the new deliveries as PENDING (GetJob), one write per job."""
        by_job: dict[str, list[DeliveryStatus]] = {}
        for d in deliveries:
            status = DeliveryStatus.new(
                webhook_id=d.id, url=d.url, source=d.label, event_seq=d.seq, state="pending"
            )
            by_job.setdefault(d.job_id, []).append(status)
        return [self._status.record(job_id, s, only_new=True) for job_id, s in by_job.items()]

    async def _publish(self, d: Delivery) -> None:
        await self._js.publish(
            t.webhook_subject(d.endpoint, d.job_id), d.encode(), headers={"Nats-Msg-Id": d.id}
        )

    async def _job_notify(self, job_id: str, seq: int, header: str | None) -> tuple[Notify, ...]:
        if header is not None:
            notify = decode_notify(header)
            if job_id not in self._notify and seq == 1:
                await self._kv.put(f"notify.{job_id}", encode_notify(notify).encode())
        elif job_id in self._notify:
            self._notify.move_to_end(job_id)
            return self._notify[job_id]
        elif seq == 1:
            notify = ()  # the first event always carries them: none
        else:
            try:
                entry = await self._kv.get(f"notify.{job_id}")
                notify = decode_notify((entry.value or b"").decode())
            except nats.js.errors.KeyNotFoundError:
                notify = ()
        self._notify[job_id] = notify
        if len(self._notify) > _CACHE:
            self._notify.popitem(last=False)
        return notify

    async def _deliveries(self, msg: Msg) -> list[Delivery]:
        headers = msg.headers or {}
        job_id = t.job_id_of(msg.subject)
        try:
            seq = int(headers.get(t.HDR_JOB_SEQ, "0"))
        except ValueError:
            return []
        notify = await self._job_notify(job_id, seq, headers.get(t.HDR_NOTIFY))
        if not notify and not self._subs:
            return []
        try:
            event = job_pb2.JobEvent.FromString(msg.data)
        except Exception:  # a malformed event is not the webhooks' business
            return []
        final = headers.get(t.HDR_JOB_STATE, "") in FINAL_NAMES
        delta = event.HasField("delta")
        targets: list[tuple[str, str, str, str, str, bool]] = [
            (job_endpoint(n), "job", n.url, n.secret, n.events, True) for n in notify
        ]
        targets += [
            (endpoint, label, sub.url, sub.secret, sub.events, False)
            for endpoint, label, sub in self._subs
            if sub.route == event.route
        ]
        wanted = [target for target in targets if matches(target[4], final, delta)]
        if not wanted:
            return []
        body = json.dumps(MessageToDict(event), separators=(",", ":"))
        now = time.time()
        return [
            Delivery.build(
                endpoint=endpoint,
                label=label,
                url=url,
                secret=secret,
                job_id=job_id,
                seq=seq,
                ordered=events == "all",
                created=now,
                body=body,
                per_job=per_job,
                tenant=event.tenant,
            )
            for endpoint, label, url, secret, events, per_job in wanted
        ]
