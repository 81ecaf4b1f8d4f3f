"""Keepalive pings against a call that stays silent: the broker accepts a client's pings
down to one per 10 s, so a Run waiting minutes without an event is not cut with GOAWAY
"too_many_pings" (gRPC's default, one ping per 5 minutes while no data flows, cut such
calls after about 4 minutes; with on_disconnect CANCEL, the job went with them).

The client here pings every 12.5 s, so that the old limit fails this test within a
minute: gRPC sends GOAWAY at the fourth ping inside the limit."""

from __future__ import annotations

import asyncio

import laneway
from laneway.broker.server.process import MIN_CLIENT_PING_INTERVAL_MS, BrokerServer
from laneway.channel import CHANNEL_OPTIONS, channel_options_with
from laneway.v1 import job_pb2

_PING_MS = 12_500
_PINGS = (
    ("grpc.keepalive_time_ms", _PING_MS),
    ("grpc.http2.min_time_between_pings_ms", _PING_MS),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging while the call is silent
)


def test_channel_options_replace_the_clients_own_of_the_same_key() -> None:
    options = channel_options_with(_PINGS)
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys))  # gRPC would read the first of two
    assert dict(options)["grpc.keepalive_time_ms"] == _PING_MS
    assert set(CHANNEL_OPTIONS) - set(options) == {("grpc.keepalive_time_ms", 30_000)}


async def test_a_silent_run_outlives_the_clients_keepalive_pings(broker: BrokerServer) -> None:
    assert _PING_MS > MIN_CLIENT_PING_INTERVAL_MS  # the client pings as often as the broker allows
    spec = laneway.job("chat", laneway.chat("nobody runs this: no worker"))
    async with laneway.AsyncClient(broker.address, timeout=120, channel_options=_PINGS) as client:
        events = client.run_stream(spec, on_disconnect="cancel")
        first = await anext(events)
        assert first.state == job_pb2.JOB_STATE_QUEUED

        async def next_event() -> job_pb2.JobEvent:
            return await anext(events)

        # Waited on, never cancelled: cancelling it would end the call, and the job with it.
        waiting = asyncio.create_task(next_event())
        try:
            # Four pings go by; an event (a CANCELLED after a cut) or an error fails the test.
            done, _ = await asyncio.wait({waiting}, timeout=4 * _PING_MS / 1000 + 4)
            assert not done, f"the call ended: {waiting!r}"
            job = await client.get_job(first.job_id)  # the call still open
            assert job.state == job_pb2.JOB_STATE_QUEUED
        finally:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await events.aclose()  # leaves the call: on_disconnect CANCEL ends the job
