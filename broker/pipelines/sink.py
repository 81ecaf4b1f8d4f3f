"""The sink step: a map step's items delivered into a JetStream key-value bucket.

Item ``i`` of run ``r`` goes under the key ``<r>.<i>`` (``topology.sink_key``),
as JSON: the run, the index, the item the map step was given and its job's output.
A replayed delivery writes the same values under the same keys, so a crash
part-way and its redelivery leave each item in the bucket once. Items whose job
failed (a map step with ``on_failure: continue``) are left out.
"""

from __future__ import annotations

import asyncio
import json

from nats.js import JetStreamContext

from laneway.broker.config.pipelines import MapStep, SinkStep
from laneway.broker.core import topology as t
from laneway.broker.pipelines.outputs import Outputs
from laneway.broker.pipelines.state import RunState

__all__ = ["deliver"]

# Puts in flight at once: the bucket's stream takes them in one go, without one
# round trip each.
_WINDOW = 256


async def deliver(js: JetStreamContext, state: RunState, index: int, outputs: Outputs) -> int:
    """Put every item of sink step ``index``'s map step into its bucket; how many."""
    step = state.steps[index]
    assert isinstance(step, SinkStep) and step.bucket is not None
    source = state.index_of(step.from_)
    mapped = state.steps[source]
    assert isinstance(mapped, MapStep)
    items = await outputs.chunks(state.index_of(mapped.over))
    results = (await outputs.of(source))["items"]
    kv = await js.key_value(t.sink_bucket(step.bucket))
    puts = [
        (t.sink_key(state.run_id, i), {"run_id": state.run_id, "index": i, "item": items[i], "output": out})
        for i, out in enumerate(results)
        if out is not None
    ]
    for start in range(0, len(puts), _WINDOW):
        window = puts[start : start + _WINDOW]
        await asyncio.gather(*(kv.put(key, json.dumps(value).encode()) for key, value in window))
    return len(puts)
