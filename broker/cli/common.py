"""What the client commands of the ``laneway`` CLI share: the broker address
option, error handling and output."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from laneway.errors import ApiError

__all__ = ["DEFAULT_ADDR", "AddrOpt", "JsonOpt", "client_call", "echo_json", "parse_when"]

DEFAULT_ADDR = os.environ.get("LANEWAY_ADDR", "127.0.0.1:50051")

AddrOpt = Annotated[
    str, typer.Option("--addr", help="Broker address (default: $LANEWAY_ADDR or 127.0.0.1:50051).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON lines.")]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def client_call(coro: Coroutine[Any, Any, bool]) -> None:
    """Run a client command: API errors print as ``error: ...`` (exit 2); a False
    result (a job that did not succeed) exits 1."""
    try:
        ok = asyncio.run(coro)
    except ApiError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if ok is False:
        raise typer.Exit(1)


def echo_json(message: Message) -> None:
    typer.echo(json.dumps(MessageToDict(message), separators=(",", ":")))


def parse_when(value: str, option: str) -> datetime:
    """An ISO-8601 time, or an age such as ``30m``, ``2h``, ``1d`` (that long ago)."""
    match = _RELATIVE.match(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{option}: expected an ISO time (2026-01-31T12:00:00Z) or an age (30m, 2h, 1d), got {value!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
