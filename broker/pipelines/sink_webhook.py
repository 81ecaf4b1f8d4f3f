"""The sink step's webhook: a map step's items POSTed to a URL by the webhook
machinery (``laneway.broker.webhooks``: Standard Webhooks signatures, retries by
redelivery, webhook dead letters, the address guard).

The result goes out as one delivery per **part** (1, 2, ...): the items in index
order, cut so each delivery fits one message of ``LANEWAY_WEBHOOKS`` (about
``broker.max_payload_bytes``). A part's body is JSON: ``type``
(``pipeline.sink``), ``run_id``, ``pipeline``, ``step``, ``part``, ``parts`` and
``items``, each item ``index``, ``item`` (the map step's input) and ``output``
(its text or vector); items whose job failed are left out. The same run log
always makes the same bodies.

Enqueued exactly once: part ``p`` of step ``s`` of run ``r`` has the derived
webhook-id ``msg_<r>_<s>_<p>_<endpoint>``, sent as the publish's ``Nats-Msg-Id``
(the stream drops a second copy within its two-minute window, and a replayed
``step_started`` comes back within the driver's lease), and recorded as pending in
the run's delivery record (``deliveries.<r>`` in ``laneway_webhooks``, which
``GetPipelineRun`` shows) right after; a replay later than the window finds the
record and queues nothing. Only a broker killed between the publish and that record,
and no broker replaying the step within two minutes, could queue a part twice; the
receiver then gets the same webhook-id twice and drops it (Standard Webhooks).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from laneway.broker.config.pipelines import MapStep, SinkStep, SinkWebhook
from laneway.broker.core import topology as t
from laneway.broker.core.webhook_delivery import Delivery, endpoint_digest
from laneway.broker.core.webhook_status import DeliveryStatus, StatusWriter, read_statuses
from laneway.broker.pipelines.outputs import Outputs
from laneway.broker.pipelines.state import RunState

__all__ = ["LABEL", "ResultTooLarge", "WebhookSink", "sink_parts", "sink_prefix"]

LABEL = "pipeline"
"""The deliveries' ``source`` and metrics label (``job`` for a job's own webhooks)."""
# Room left in a message for the delivery's own fields (its URL alone may be 2 KiB).
_ENVELOPE = 8192
# What the stream takes beyond broker.max_payload_bytes (``topology``: max_msg_size).
_STREAM_SLACK = 65_536


class ResultTooLarge(ValueError):
    """One item's output alone is too big for a webhook message."""


def sink_endpoint(hook: SinkWebhook) -> str:
    return "p" + endpoint_digest(hook.url, hook.secret)


def sink_prefix(run_id: str, step: int) -> str:
    """What the webhook-ids of step ``step``'s parts start with."""
    return f"msg_{run_id}_{step}_"


def sink_parts(
    state: RunState, index: int, items: list[str], outputs: list[Any], limit: int, created: float
) -> list[Delivery]:
    """The deliveries of sink step ``index``: its map step's items (``items``, their
    outputs ``outputs``, None for a failed one) cut into parts of about ``limit`` bytes.
    Pure: the same arguments (but ``created``) make the same deliveries."""
    step = state.steps[index]
    assert isinstance(step, SinkStep) and step.webhook is not None
    hook = step.webhook
    groups: list[list[str]] = [[]]
    size = 0
    for i, out in enumerate(outputs):
        if out is None:
            continue
        one = json.dumps({"index": i, "item": items[i], "output": out}, separators=(",", ":"))
        escaped = len(json.dumps(one))  # as it sits in the delivery's JSON string
        if groups[-1] and size + escaped > limit - _ENVELOPE:
            groups.append([])
            size = 0
        groups[-1].append(one)
        size += escaped
    if not groups[-1] and len(groups) > 1:
        groups.pop()
    endpoint = sink_endpoint(hook)
    deliveries = []
    for part, group in enumerate(groups, start=1):
        head = {
            "type": "pipeline.sink",
            "run_id": state.run_id,
            "pipeline": state.started.pipeline,
            "step": step.name,
            "part": part,
            "parts": len(groups),
        }
        body = json.dumps(head, separators=(",", ":"))[:-1] + ',"items":[' + ",".join(group) + "]}"
        d = Delivery(
            id=f"{sink_prefix(state.run_id, index)}{part}_{endpoint}",
            url=hook.url,
            secret=hook.secret,
            endpoint=endpoint,
            label=LABEL,
            job_id=state.run_id,
            seq=part,
            prev=0,
            ordered=False,
            created=created,
            body=body,
            disable_key=f"off.{endpoint}.{state.run_id}",
            tenant=state.started.tenant,
        )
        if len(d.encode()) > limit + _STREAM_SLACK:
            raise ResultTooLarge(
                f"step '{step.name}': part {part} of the result is {len(d.encode())} bytes even "
                f"alone, over the {limit}-byte limit of a webhook message (broker.max_payload_bytes)"
            )
        deliveries.append(d)
    return deliveries


class WebhookSink:
    """Queues sink steps' webhook deliveries for the driver (the bucket is opened on
    first use: a broker whose pipelines have no webhook sink never needs it)."""

    def __init__(self, js: JetStreamContext, limit: int) -> None:
        self._js = js
        self._limit = limit
        self._kv: KeyValue | None = None
        self._status: StatusWriter | None = None

    async def deliver(self, state: RunState, index: int, outputs: Outputs) -> int:
        """Queue sink step ``index``'s parts unless queued before; how many items they
        hold. Raises ResultTooLarge (the run cannot go on), or a NATS error (replayed)."""
        step = state.steps[index]
        assert isinstance(step, SinkStep)
        source = state.index_of(step.from_)
        mapped = state.steps[source]
        assert isinstance(mapped, MapStep)
        items = await outputs.chunks(state.index_of(mapped.over))
        results = (await outputs.of(source))["items"]
        parts = sink_parts(state, index, items, results, self._limit, time.time())
        if self._kv is None or self._status is None:
            self._kv = await self._js.key_value(t.WEBHOOKS_BUCKET)
            self._status = StatusWriter(self._kv)
        queued = {s.webhook_id for s in await read_statuses(self._kv, state.run_id)}
        fresh = [d for d in parts if d.id not in queued]
        await asyncio.gather(
            *(
                self._js.publish(
                    t.webhook_subject(d.endpoint, d.job_id), d.encode(), headers={"Nats-Msg-Id": d.id}
                )
                for d in fresh
            )
        )
        pending = [
            DeliveryStatus.new(webhook_id=d.id, url=d.url, source=LABEL, event_seq=d.seq, state="pending")
            for d in fresh
        ]
        await self._status.record(state.run_id, pending, only_new=True)
        return sum(out is not None for out in results)
