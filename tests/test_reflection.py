"""Server reflection answers on grpc.reflection.v1 (what current tools ask for first) as
well as v1alpha: raw calls on a live broker, and ``buf curl`` when it is installed."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from laneway.broker.server.process import BrokerServer

_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture
async def channel(broker: BrokerServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(broker.address) as ch:
        yield ch


async def _ask(
    channel: grpc.aio.Channel, method: str, *requests: rpb.ServerReflectionRequest
) -> list[rpb.ServerReflectionResponse]:
    # v1's messages are wire-identical to v1alpha's: the v1alpha classes (de)serialize both.
    call = channel.stream_stream(
        method,
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )(iter(requests), timeout=10)
    return [r async for r in call]  # type: ignore[attr-defined]


def _files(response: rpb.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("method", [_V1, _V1ALPHA])
async def test_reflection_lists_and_describes_the_broker(channel: grpc.aio.Channel, method: str) -> None:
    listed, broker, v1 = await _ask(
        channel,
        method,
        rpb.ServerReflectionRequest(list_services=""),
        rpb.ServerReflectionRequest(file_containing_symbol="laneway.v1.BrokerService"),
        rpb.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "laneway.v1.BrokerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names, names
    files = _files(broker)
    service = [s for f in files if f.package == "laneway.v1" for s in f.service]
    assert [s.name for s in service] == ["BrokerService"]
    assert "GetServerInfo" in {m.name for m in service[0].method}
    (reflection_file,) = _files(v1)
    assert reflection_file.package == "grpc.reflection.v1"
    (info,) = reflection_file.service[0].method
    assert info.input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_buf_curl_calls_the_broker_through_v1_reflection(broker: BrokerServer) -> None:
    buf = Path(sys.executable).with_name("buf")
    if not buf.exists():
        found = shutil.which("buf")
        if found is None:
            pytest.skip("buf is not installed")
        buf = Path(found)
    proc = await asyncio.create_subprocess_exec(
        str(buf),
        "curl",
        "--reflect-protocol",
        "grpc-v1",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        f"http://{broker.address}/laneway.v1.BrokerService/GetServerInfo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    assert '"routes"' in out.decode() and '"chat"' in out.decode(), out.decode()
