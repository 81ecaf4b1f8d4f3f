"""What the client commands of the ``laneway`` CLI share: the broker connection
options (``broker_options``), error handling and output."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar

import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

import laneway
from laneway.errors import ApiError, Unauthenticated

__all__ = [
    "DEFAULT_ADDR",
    "LOCAL_BROKER",
    "AddrOpt",
    "ApiKeyOpt",
    "Broker",
    "JsonOpt",
    "TlsArgs",
    "TlsCaOpt",
    "TlsCertOpt",
    "TlsKeyOpt",
    "broker_options",
    "client_call",
    "echo_json",
    "parse_when",
    "tls_args",
]

DEFAULT_ADDR = os.environ.get("LANEWAY_ADDR", "127.0.0.1:50051")

AddrOpt = Annotated[
    str, typer.Option("--addr", help="Broker address (default: $LANEWAY_ADDR or 127.0.0.1:50051).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON lines.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LANEWAY_API_KEY",
        show_envvar=False,
        help="API key for a broker with auth on (better: $LANEWAY_API_KEY, not shown by ps).",
    ),
]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        envvar="LANEWAY_TLS_CA",
        help="Connect with TLS, trusting this PEM CA (e.g. the one `laneway up --tls dev` prints).",
    ),
]
TlsCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert", envvar="LANEWAY_TLS_CERT", help="PEM client certificate, for a broker that wants mTLS."
    ),
]
TlsKeyOpt = Annotated[
    Path | None,
    typer.Option("--tls-key", envvar="LANEWAY_TLS_KEY", help="PEM private key of --tls-cert."),
]


class TlsArgs(TypedDict, total=False):
    """``laneway.AsyncClient`` keyword arguments for TLS."""

    root_certificates: bytes
    certificate_chain: bytes
    private_key: bytes


def tls_args(ca: Path | None, cert: Path | None, key: Path | None) -> TlsArgs:
    """The client's TLS arguments from ``--tls-ca``, ``--tls-cert`` and ``--tls-key``
    (none given: plaintext). Any one of them turns TLS on."""
    if (cert is None) != (key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together (mTLS)")
    args = TlsArgs()
    if ca is not None:
        args["root_certificates"] = _read(ca, "--tls-ca")
    if cert is not None and key is not None:
        args["certificate_chain"] = _read(cert, "--tls-cert")
        args["private_key"] = _read(key, "--tls-key")
    return args


@dataclass(frozen=True)
class Broker:
    """The broker a client command talks to, as its options name it."""

    addr: str
    """``--addr`` (default ``$LANEWAY_ADDR``)."""
    tls: TlsArgs
    """From ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (empty: plaintext)."""
    api_key: str | None
    """``--api-key`` or ``$LANEWAY_API_KEY``."""

    def client(self, **options: Any) -> laneway.AsyncClient:
        """A client for it (``options``: more ``AsyncClient`` arguments, e.g. ``timeout``)."""
        return laneway.AsyncClient(self.addr, **self.tls, api_key=self.api_key, **options)


LOCAL_BROKER = Broker(DEFAULT_ADDR, TlsArgs(), None)
"""A command's ``broker`` parameter's default (``broker_options`` always passes one)."""

_F = TypeVar("_F", bound=Callable[..., Any])
_BROKER_OPTIONS: dict[str, tuple[Any, Any]] = {
    "addr": (AddrOpt, DEFAULT_ADDR),
    "tls_ca": (TlsCaOpt, None),
    "tls_cert": (TlsCertOpt, None),
    "tls_key": (TlsKeyOpt, None),
    "api_key": (ApiKeyOpt, None),
}


def broker_options(command: _F) -> _F:
    """Give a typer command ``--addr``, ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and
    ``--api-key``; it receives them as one ``broker: Broker`` keyword argument (TLS
    files read and checked before the command runs)."""
    signature = inspect.signature(command, eval_str=True)  # typer reads the result as is
    kept = [p for p in signature.parameters.values() if p.name != "broker"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in _BROKER_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        addr, ca, cert, key, api_key = (kwargs.pop(name, None) for name in _BROKER_OPTIONS)
        broker = Broker(str(addr or DEFAULT_ADDR), tls_args(ca, cert, key), api_key)
        return command(*args, broker=broker, **kwargs)

    params = [*kept, *added]
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must see the new signature, not the command's
    return wrapper  # type: ignore[return-value]


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise typer.BadParameter(f"{option}: cannot read {path}: {err.strerror or err}") from None


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def client_call(coro: Coroutine[Any, Any, bool]) -> None:
    """Run a client command: API errors print as ``error: ...`` (exit 2); a False
    result (a job that did not succeed) exits 1."""
    try:
        ok = asyncio.run(coro)
    except Unauthenticated as err:
        typer.echo(f"error: {err} (pass --api-key or set LANEWAY_API_KEY)", err=True)
        raise typer.Exit(2) from None
    except ApiError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except ValueError as err:  # the client refused its arguments (e.g. an API key in clear)
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
