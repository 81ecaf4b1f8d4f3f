"""JetStream topology: created once, idempotent, and shared by any number of processes."""

from __future__ import annotations

import nats

from laneway.broker.core import topology as t
from laneway.broker.server.process import BrokerServer


async def _snapshot(url: str) -> dict[str, object]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        # KV streams' consumers are watchers that come and go with processes.
        streams = {
            s.config.name: (
                s.config.subjects,
                s.config.retention,
                0 if s.config.name.startswith("KV_") else s.state.consumer_count,
            )
            for s in await js.streams_info()
        }
        consumers = sorted(c.name for c in await js.consumers_info(t.JOBS_STREAM))
        created = {c.name: c.created for c in await js.consumers_info(t.JOBS_STREAM)}
        return {"streams": streams, "consumers": consumers, "created": created}
    finally:
        await nc.close()


async def test_topology_is_created_once_and_idempotent(nats_server, config) -> None:
    async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False):
        first = await _snapshot(nats_server.url)
    async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False):
        second = await _snapshot(nats_server.url)
    assert first == second
    assert first["consumers"] == sorted(
        t.consumer_name(route, lane) for route in config.routes for lane in ("high", "normal", "low")
    )
    streams = first["streams"]
    assert isinstance(streams, dict)
    assert streams[t.JOBS_STREAM][1] == "workqueue"
    assert f"KV_{t.IDEMPOTENCY_BUCKET}" in streams


async def test_changed_settings_update_the_stream(nats_server, config) -> None:
    async with BrokerServer(config, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False):
        pass
    longer = config.model_copy(update={"queue": config.queue.model_copy(update={"events_max_age_s": 7200})})
    async with BrokerServer(longer, nats_url=nats_server.url, grpc_addr="127.0.0.1:0", reuse_port=False):
        nc = await nats.connect(nats_server.url)
        info = await nc.jetstream().stream_info(t.EVENTS_STREAM)
        await nc.close()
    assert info.config.max_age == 7200
