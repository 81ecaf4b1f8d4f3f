"""What every handler of the gateway shares: the broker connection (one gRPC channel,
used through the Python client and raw stubs) and the gateway's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from aiohttp import web

import laneway
from laneway.error_details import from_rpc_error
from laneway.v1 import broker_service_pb2_grpc as pb_grpc

__all__ = ["BACKEND", "STATIC_DIR", "Backend", "GatewaySettings"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The page served at ``/`` (and the files beside it), when the folder exists."""

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway behaves (``laneway gateway`` fills it from the ``gateway`` block)."""

    heartbeat_s: float = 15.0
    """Seconds between heartbeat comments on a Server-Sent Events stream."""
    max_wait_s: float = 30.0
    """Longest ``?wait=`` on a submit."""
    static_dir: Path | None = field(default=STATIC_DIR)
    """Folder served at ``/`` (its ``index.html`` at ``/``); None: no page."""
    unary_timeout_s: float = 30.0
    """Deadline of each unary broker call."""


@dataclass(frozen=True)
class Backend:
    """The broker, as the handlers call it."""

    client: laneway.AsyncClient
    stub: pb_grpc.BrokerServiceAsyncStub
    settings: GatewaySettings
    tls: bool

    @classmethod
    def on(cls, channel: grpc.aio.Channel, settings: GatewaySettings, *, tls: bool) -> Backend:
        client = laneway.AsyncClient(channel=channel, timeout=settings.unary_timeout_s)
        stub: pb_grpc.BrokerServiceAsyncStub = pb_grpc.BrokerServiceStub(channel)
        return cls(client, stub, settings, tls)

    async def unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        metadata: Mapping[str, str],
    ) -> _Resp:
        """One unary call with the caller's metadata; errors as ``laneway.errors``."""
        try:
            return await method(
                request, timeout=self.settings.unary_timeout_s, metadata=tuple(metadata.items())
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err, tls=self.tls) from None


BACKEND = web.AppKey("laneway_backend", Backend)
