"""How a client reaches the broker: the channel (plaintext or TLS, or the caller's
own), the credentials and metadata sent with every call, and per-call timeouts.

Both clients take the same connection arguments (``AsyncClient`` builds a
``grpc.aio`` channel, ``Client`` a blocking ``grpc`` one):

- ``tls=True`` for TLS with the system's root certificates; ``root_certificates``
  (PEM bytes) to trust another CA; ``certificate_chain`` and ``private_key`` (PEM)
  for mutual TLS; or ``tls=`` a ready ``grpc.ChannelCredentials``. Certificates
  imply TLS.
- ``api_key``: sent as ``authorization: Bearer <key>`` on every call, over TLS, or
  in plaintext only to a loopback target (``127.0.0.1``, ``::1``, ``localhost``, a
  unix socket), where nobody on the network can read it; a plaintext channel to
  any other address refuses an ``api_key`` (``ValueError``).
- ``call_credentials``: any ``grpc.CallCredentials`` (e.g. a
  ``grpc.metadata_call_credentials`` plugin), also TLS only.
- ``call_metadata``: gRPC metadata sent with every call; a method's own
  ``call_metadata`` is added to it (its values win for the same key).
- ``channel``: a channel the caller made and owns; the client then uses it as is
  (no TLS arguments) and never closes it.

A connection that fails because the TLS settings do not match the broker's (a
plaintext client and a TLS broker, an untrusted certificate, a missing client
certificate) raises ``Unavailable`` whose message says so (``laneway.transport_errors``).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_TARGET",
    "Connection",
    "Deadline",
    "channel_options_with",
    "connection",
    "is_loopback",
]

DEFAULT_TARGET = "127.0.0.1:50051"

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect soon after a broker restart: the default backoff (1 s, growing) refuses
    # new calls for a second or more after the broker is already serving again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""The options of a channel the client makes; ``channel_options`` replace those of the same keys."""

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Connection:
    """A client's connection settings, resolved and checked."""

    #: None for a plaintext channel.
    credentials: grpc.ChannelCredentials | None
    call_credentials: grpc.CallCredentials | None
    #: Not in ``repr``: it may hold ``authorization`` (the API key).
    metadata: Mapping[str, str] = field(repr=False)
    options: tuple[tuple[str, Any], ...]
    #: Seconds for a unary call when the method is given none.
    timeout: float
    #: Whether the channel uses TLS; None for the caller's own channel (unknown).
    tls: bool | None = None

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(target, options=self.options)
        return grpc.aio.secure_channel(target, self.credentials, options=self.options)

    def sync_channel(self, target: str) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(target, options=self.options)
        return grpc.secure_channel(target, self.credentials, options=self.options)

    def call_metadata(self, extra: Mapping[str, str] | None) -> Metadata:
        """The client's metadata with a call's own over it."""
        merged = {**self.metadata, **extra} if extra else self.metadata
        return tuple(merged.items())

    def unary_timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


def connection(
    *,
    tls: bool | grpc.ChannelCredentials,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    call_credentials: grpc.CallCredentials | None,
    api_key: str | None,
    call_metadata: Mapping[str, str] | None,
    channel_options: Sequence[tuple[str, Any]],
    timeout: float,
    callers_channel: bool,
    target: str = "",
) -> Connection:
    """Check the client's connection arguments and resolve them (``callers_channel``: the
    caller passed a channel, so nothing about making one may be given)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be more than 0 seconds, got {timeout}")
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    certificates = root_certificates is not None or certificate_chain is not None
    if isinstance(tls, grpc.ChannelCredentials) and certificates:
        raise ValueError("give either tls=<grpc.ChannelCredentials> or certificates, not both")
    if callers_channel and (tls is not False or certificates or channel_options):
        raise ValueError(
            "channel= is used as is: give the TLS settings and options to the channel you make, "
            "not to the client"
        )
    credentials: grpc.ChannelCredentials | None
    if isinstance(tls, grpc.ChannelCredentials):
        credentials = tls
    elif tls or certificates:
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    else:
        credentials = None
    if call_credentials and credentials is None and not callers_channel:
        raise ValueError(
            "call_credentials are sent only over TLS (tls=True or root_certificates=...); "
            "on a trusted plaintext network pass call_metadata={'authorization': 'Bearer ...'}"
        )
    metadata = dict(call_metadata or {})
    creds = [c for c in (call_credentials,) if c is not None]
    if api_key and credentials is None and not callers_channel:
        if not is_loopback(target):
            raise ValueError(
                f"api_key is sent only over TLS (tls=True or root_certificates=...) or in plaintext to "
                f"a loopback address (127.0.0.1, ::1, localhost); {target!r} is neither"
            )
        # gRPC sends call credentials only over TLS: on loopback the header goes as metadata.
        metadata.setdefault("authorization", f"Bearer {api_key}")
    elif api_key:
        creds.append(grpc.access_token_call_credentials(api_key))
    combined = creds[0] if len(creds) == 1 else grpc.composite_call_credentials(*creds) if creds else None
    return Connection(
        credentials=credentials,
        call_credentials=combined,
        metadata=metadata,
        options=channel_options_with(channel_options),
        timeout=timeout,
        tls=None if callers_channel else credentials is not None,
    )


def channel_options_with(overrides: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """``CHANNEL_OPTIONS`` with ``overrides`` in place of the same keys. gRPC reads the
    first of two options with one key, so appending an override would be ignored."""
    keys = {key for key, _ in overrides}
    return (*overrides, *(option for option in CHANNEL_OPTIONS if option[0] not in keys))


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine only: a loopback address or
    ``localhost`` (any port), or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:").lstrip("/")
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Deadline:
    """A streaming call's overall deadline, spread over its resumed tries."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        """Seconds left for the next try (None: no deadline)."""
        return None if self._at is None else max(0.0, self._at - time.monotonic())
